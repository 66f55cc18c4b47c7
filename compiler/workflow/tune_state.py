"""What tune() keeps on disk and in the study, so that kill -9 at any point loses nothing
(the invariant and the steps are in tune.py's docstring).

    publish_best     save a new best to out/best-<trial>, point out/best.json at it, drop older folders
    read_best        out/best.json, checked
    remove_stale     what a killed run left: best folders best.json does not name, temporaries
    fail_interrupted RUNNING trials whose process is gone -> FAIL, their recipe queued once more
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
from pathlib import Path

from graphopt.compiler.core.errors import GraphoptError
from graphopt.compiler.deploy.save import fsync, sha256

GRACE_S = 120  # a RUNNING trial with no heartbeat (or no owner) for this long was interrupted
_BEST_NAME = re.compile(r"best-[0-9]+(-[0-9a-f]+)?")




def read_best(out: Path) -> dict | None:
    """out/best.json, checked; None where there is none."""
    try:
        best = json.loads((out / "best.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise GraphoptError(f"{out / 'best.json'} is unreadable: {e}", hint="remove it (and run tune() again)") from e
    best.setdefault("path", "best")  # (written by a graphopt before best-<trial> folders)
    if not isinstance(best.get("latency_ms"), (int, float)) or not (
            best["path"] == "best" or _BEST_NAME.fullmatch(str(best["path"]))):
        raise GraphoptError(f"{out / 'best.json'} is not a tune() record", hint="remove it (and run tune() again)")
    return best


def publish_best(out: Path, opt, record: dict) -> Path:
    """Save ``opt`` to a fresh ``out/best-<trial>``, then point ``out/best.json`` at it (both atomic), then
    remove the older best folders. A kill at any point leaves best.json naming a complete module."""
    current = read_best(out)
    name = f"best-{record['trial']}"
    if current is not None and current["path"] == name:  # (another study's trial of that number is the best)
        name += "-" + os.urandom(4).hex()
    folder = opt.save(out / name)
    record = {**record, "path": name, "manifest_sha256": sha256(folder / "manifest.json")}
    tmp = out / f".best.json.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(record, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / "best.json")
    fsync(out)
    remove_stale(out, record)
    return folder


def remove_stale(out: Path, best: dict | None) -> None:
    """Remove best folders (and save()'s temporaries) that best.json does not name."""
    keep = best["path"] if best else None
    for path in out.iterdir():
        stale_folder = _BEST_NAME.fullmatch(path.name) and path.name != keep
        leftover = path.name.startswith((".best-", ".best.json.")) and path.name != f".best.json.{os.getpid()}.tmp"
        if not (stale_folder or leftover):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _started(os.getpid())}


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart); None off Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _gone(worker: dict) -> bool:
    """Is the process that ran a trial gone? Only a process on this host can be asked."""
    if worker.get("host") != socket.gethostname() or not isinstance(worker.get("pid"), int):
        return False
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        pass
    started = _started(worker["pid"])
    return started is not None and worker.get("start") is not None and started != worker["start"]


def fail_interrupted(study) -> list[int]:
    """Mark FAIL the RUNNING trials whose process is gone; queue each one's recipe to run once more."""
    import optuna

    failed = []
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker is None:  # (killed before it said whose it is)
            stale = t.datetime_start is None or (now - t.datetime_start).total_seconds() > GRACE_S
        else:
            stale = _gone(worker)
        if not stale:
            continue
        if study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True).state != \
                optuna.trial.TrialState.FAIL:
            continue
        failed.append(t.number)
        if "retry_of" not in t.user_attrs and t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return failed
