"""One error family. Each error says what went wrong, where (fx node, module, the user's source
line, when known) and what to do about it."""

from __future__ import annotations

import os
import traceback
from types import TracebackType

import torch.fx as fx


class GraphoptError(Exception):
    def __init__(self, message: str, *, node: str | None = None, module: str | None = None,
                 source: str | None = None, hint: str | None = None):
        self.message, self.node, self.module, self.source, self.hint = message, node, module, source, hint
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [self.message]
        for label, value in (("node", self.node), ("module", self.module), ("source", self.source),
                             ("hint", self.hint)):
            if value:
                lines.append(f"  {label}: {value}")
        return "\n".join(lines)


class CaptureError(GraphoptError):
    """The model cannot be turned into a graph (untraceable, training mode, bad example inputs)."""


class PassError(GraphoptError):
    """A pass broke the graph or changed its numbers; the graph was rolled back."""

    def __init__(self, message: str, *, pass_name: str, passes_before: list[str], **kw):
        self.pass_name, self.passes_before = pass_name, passes_before
        super().__init__(message, **kw)


class LoadError(GraphoptError):
    """A saved artifact is missing, malformed or tampered with."""


class InputError(GraphoptError):
    """An optimized module was called with inputs unlike the ones it was optimized for."""


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the graphopt package


def first_line(e: BaseException, width: int = 120) -> str:
    """``e``'s type and the first line of its message, for a reason or an error message (the message may be empty: a
    bare MemoryError)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:width]}" if lines else type(e).__name__


def is_internal(filename: str) -> bool:
    """Is this a frame of torch, of graphopt itself, or of generated code (not the user's)?"""
    import torch

    skip = (os.path.dirname(torch.__file__) + os.sep,) + tuple(
        os.path.join(_ROOT, pkg) + os.sep for pkg in ("compiler", "passes", "kernels"))
    return filename.startswith(skip) or filename.startswith("<")


def user_frame(tb: TracebackType | None) -> str | None:
    """'file:line: code' of the innermost frame outside torch and graphopt."""
    found = None
    for frame in traceback.extract_tb(tb):
        if not is_internal(frame.filename):
            found = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return found


def node_source(node: fx.Node) -> str | None:
    """The user's source line recorded when the node was traced."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{lines[i][5:]}: {code}"
    return None
