"""How the ``graphopt`` command fails: one line on stderr and a non-zero exit, never a traceback
(unless ``--debug``):

    graphopt: error: <what> (<where>) hint: <what to do>

Exit status 2 for a bad command line (argparse's own errors, a malformed --input-shape, a missing
file or class), 1 for everything else, 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from graphopt.compiler.core.errors import GraphoptError

# where bench/ and tests/fuzz/ are in a source checkout; an installed wheel has neither
SOURCE_ROOT = Path(__file__).resolve().parents[2]


class UsageError(GraphoptError):
    """The command line itself is wrong (exit status 2)."""


def _flat(text: object) -> str:
    return " ".join(str(text).split())


def one_line(what: str, where: str, hint: str) -> str:
    return f"graphopt: error: {_flat(what)} ({_flat(where)}) hint: {_flat(hint)}"


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its usage errors in the same one-line form."""

    def error(self, message: str) -> NoReturn:
        print(one_line(message, self.prog, f"see {self.prog} --help"), file=sys.stderr)
        sys.exit(2)


def report_error(e: BaseException, where: str) -> int:
    """Print ``e`` as one line on stderr; return the exit status."""
    if isinstance(e, KeyboardInterrupt):
        print(one_line("interrupted", where, "run the command again to start over"), file=sys.stderr)
        return 130
    if isinstance(e, GraphoptError):
        place = "; ".join(f"{label} {value}" for label, value in (("node", e.node), ("module", e.module),
                                                                   ("at", e.source)) if value)
        print(one_line(e.message, place or where, e.hint or "add --debug for the full traceback"), file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    if isinstance(e, OSError):
        what = e.strerror or str(e) or type(e).__name__
        print(one_line(what, e.filename or where, "check the path, its permissions and the free disk space"),
              file=sys.stderr)
        return 1
    hint = ("check the arguments; add --debug for the full traceback" if isinstance(e, ValueError)
            else "this may be a bug in graphopt: run again with --debug and report the traceback")
    print(one_line(f"{type(e).__name__}: {e}", where, hint), file=sys.stderr)
    return 1


def source_checkout_file(command: str, *parts: str) -> Path:
    """A file that only a source checkout has (bench/, tests/fuzz/); UsageError where graphopt was installed
    from a wheel."""
    path = SOURCE_ROOT.joinpath(*parts)
    if not path.is_file():
        raise UsageError(f"graphopt {command} needs a source checkout of graphopt: {'/'.join(parts)} is not part "
                         f"of an installed package", source=str(path),
                         hint=f"clone the graphopt repository, pip install -e . inside it, and run graphopt {command} "
                              "from the clone")
    return path
