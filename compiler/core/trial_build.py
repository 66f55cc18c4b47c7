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
import threading
from typing import Sequence

# a hang is a reason too: in a later run on MobileViT-xxs the trial of its int8 graph hung past 300 s instead
# of crashing; a timeout is not kept, so a slow machine only loses OpenVINO for that build
TRIAL_TIMEOUT_S = 120.0

# The child: the ONNX model on stdin, the compile config and the input shapes as JSON in argv[1]; exit 0 once a
# call on zeros returned.
_CHILD = """
import json, sys
settings = json.loads(sys.argv[1])
sys.path[:] = settings["path"]
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
    settings = json.dumps({"config": config, "shapes": [list(s) for s in shapes]}, sort_keys=True)
    digest = hashlib.sha256(model)
    digest.update(settings.encode())
    key = digest.hexdigest()
    with _LOCK:
        if key in _SEEN:
            return _SEEN[key]
    if getattr(sys, "frozen", False) or not sys.executable or not os.path.isfile(sys.executable):
        return "no Python interpreter to try it in first (a frozen or embedded program)"
    keep = True
    try:
        child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps({**json.loads(settings), "path": sys.path})],
                               input=model, capture_output=True, timeout=TRIAL_TIMEOUT_S)
        if child.returncode == 0:
            problem = None
        elif child.returncode < 0:
            name = signal.Signals(-child.returncode).name if -child.returncode in signal.valid_signals() else ""
            problem = (f"it crashed (signal {-child.returncode}{', ' + name if name else ''}) compiling or running "
                       "this graph in a trial process")
            keep = -child.returncode != getattr(signal, "SIGKILL", 9)  # (the OOM killer's: perhaps not the graph)
        else:
            last = (child.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1][:160]
            problem = f"its trial process failed on this graph: {last}"
    except subprocess.TimeoutExpired:
        problem, keep = f"its trial process took over {TRIAL_TIMEOUT_S:.0f} s on this graph", False
    if keep:
        with _LOCK:
            _SEEN[key] = problem
    return problem
