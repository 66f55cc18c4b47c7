"""Build a library's session once in a child process before building it in the user's.

A crash inside a native library cannot be caught: OpenVINO 2026.4's ``compile_model`` segfaults on graphopt's int8
graph of timm's MobileViT-xxs (every layer int8), which ended the user's process inside ``optimize()`` without a
word. So before OpenVINO compiles a graph in this process, a child process (this interpreter, the same library,
the same settings) compiles it and runs it once on zeros; a child that dies, fails or takes longer than
TRIAL_TIMEOUT_S makes the library a rejected candidate with the reason, as any other failure to build is. Where
it ran, the session is built here as before.

Which graphs: in ``optimize()``, OpenVINO's int8 graphs (its fp32 graphs and ONNX Runtime's sessions have not
crashed on any model graphopt was run on: the model zoos in the README); in ``load()``, every graph OpenVINO is
to run (a saved folder may come from anyone, and a crafted graph must not end the loading process either). The
child costs time: 3.3-3.4 s for each of ResNet-18's int8 graphs (an interpreter start, the imports, a second
compile), about 7 s added to its int8 ``optimize()`` of 27 s. The results are kept per graph and settings (input
shapes, threads: their sha256) for the process's life, so a graph checked once (a reload of the same module) is
not checked again (two threads checking one graph at once may each start a child). A timeout or a kill (the OOM
killer's) is not kept: the next build tries again.

The protection is partial: the child compiles the graph and runs it once on zeros; a crash that depends on the
data of a later call is not caught. The child is this Python (``sys.executable``) with the parent's ``sys.path``;
in a frozen or embedded program, where that is no Python, OpenVINO is not tried (a reason says so).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Sequence

# a hang is a reason too: in a later run on MobileViT-xxs the trial of its int8 graph hung past 300 s instead
# of crashing; a timeout is not kept, so a slow machine only loses OpenVINO for that build
TRIAL_TIMEOUT_S = 120.0

# TELEMETRY: ``import openvino`` sends a usage event (openvino.tools.ovc: "ov", "import") where the
# ``openvino_telemetry`` package is installed, from a thread that starts a multiprocessing process by fork. In the
# child, that fork copied a lock another thread held, and the forked process blocked forever closing stdin while
# holding the child's output pipes open: the trial waited out its timeout on graphs that had compiled and run
# (timm's ReXNet: two int8 graphs, 242 s of int8 optimize()), and every trial left a sleeping process behind. The
# child takes OpenVINO's own stub instead (what it uses where the package is absent), writes its messages to a
# file, not a pipe, and whatever it leaves behind in its process group is killed when it ends.

# The child: the ONNX model on stdin, the compile config and the input shapes as JSON in argv[1]; exit 0 once a
# call on zeros returned.
_CHILD = """
import json, sys
settings = json.loads(sys.argv[1])
sys.path[:] = settings["path"]
sys.modules["openvino_telemetry"] = None  # (see TELEMETRY above)
import signal
if hasattr(signal, "alarm"):  # (ends itself if the parent died without killing it)
    signal.alarm(settings["alarm"])
import numpy as np
import openvino as ov
core = ov.Core()
compiled = core.compile_model(core.read_model(sys.stdin.buffer.read()), "CPU", settings["config"])
request = compiled.create_infer_request()
request.infer([np.zeros(shape, np.float32) for shape in settings["shapes"]])
"""

_LOCK = threading.Lock()
_SEEN: dict[str, str | None] = {}  # sha256 of (model, settings) -> None (it ran) or why not


def _int8(model: bytes) -> bool:
    """Whether the serialized model holds a QuantizeLinear node: its op type is stored as those bytes (weights that
    happen to hold them too only cost a trial)."""
    return b"QuantizeLinear" in model


def openvino_problem(model: bytes, config: dict, shapes: Sequence[tuple], every_graph: bool = False) -> str | None:
    """Why OpenVINO must not compile ``model`` in this process (its child crashed, failed or hung), or None.
    ``every_graph``: fp32 graphs too (load(): a saved folder may come from anyone)."""
    if not every_graph and not _int8(model):
        return None
    settings = {"config": config, "shapes": [list(s) for s in shapes]}
    digest = hashlib.sha256(model)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    key = digest.hexdigest()
    with _LOCK:
        if key in _SEEN:
            return _SEEN[key]
    if getattr(sys, "frozen", False) or not sys.executable or not os.path.isfile(sys.executable):
        return "no Python interpreter to try it in first (a frozen or embedded program)"
    problem, keep = _trial(model, json.dumps({**settings, "path": sys.path, "alarm": int(TRIAL_TIMEOUT_S) + 30}))
    if keep:
        with _LOCK:
            _SEEN[key] = problem
    return problem


def _trial(model: bytes, settings: str) -> tuple[str | None, bool]:
    """(why the child did not compile and run the model, or None; whether that answer is the graph's to keep)."""
    group = {"start_new_session": True} if hasattr(os, "killpg") else {}
    with tempfile.TemporaryFile() as messages, \
            subprocess.Popen([sys.executable, "-c", _CHILD, settings], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=messages, **group) as child:
        try:
            child.communicate(model, timeout=TRIAL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"its trial process took over {TRIAL_TIMEOUT_S:.0f} s on this graph", False
        finally:
            _end(child, bool(group))  # (after communicate reaped the child, its group lives on only in what it left)
        messages.seek(0)
        last = (messages.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1][:160]
    code = child.returncode
    if code == 0:
        return None, True
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else ""
        return (f"it crashed (signal {-code}{', ' + name if name else ''}) compiling or running this graph in a "
                "trial process"), -code != getattr(signal, "SIGKILL", 9)  # (the OOM killer's: perhaps not the graph)
    return f"its trial process failed on this graph: {last}", True


def _end(child: subprocess.Popen, grouped: bool) -> None:
    """Kill the child if it still runs, and whatever it started in its process group; reap it."""
    if grouped:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # (nothing left in the group)
    else:
        child.kill()
    child.wait()
