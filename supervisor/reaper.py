"""No process outlives the worker: on every exit path, and even when the worker is SIGKILLed.

On its own exits (SIGTERM, engine death, a failed start) the worker reaps its
descendants itself before it exits (:func:`reap_descendants`): it is a child
subreaper (``PR_SET_CHILD_SUBREAPER``), so processes orphaned inside its tree
(vLLM's VLLM::Worker once its EngineCore died, their resource trackers) are
re-parented to the worker instead of to init, and it can find and wait for them.

vLLM 0.32 has no parent watch: its EngineCore, VLLM::Worker and resource
tracker processes live on when the worker dies abruptly. PR_SET_PDEATHSIG is
unreliable here (it fires when the creating *thread* exits, and trio retires
idle worker threads). So the worker starts this small reaper process first.

The reaper polls its parent. While the worker lives, it keeps a snapshot of the
worker's descendants (once a worker dies, its children are re-parented and the
tree is lost). Once the worker is gone, for whatever reason, it terminates the
last snapshot, everything those processes started since, and every process
still carrying the worker's instance id in its environment (vLLM renames its
processes with setproctitle, which can clobber the environment, so the id alone
is not enough), then exits.

    python -m supervisor.reaper WORKER_PID INSTANCE_ID
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

INSTANCE_VAR = "LLM_SUPERVISOR_INSTANCE"


def _environ_has(pid: int, needle: bytes) -> bool:
    try:
        data = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return needle in data.split(b"\0")


def instance_processes(instance: str, exclude: set[int]) -> list[int]:
    needle = f"{INSTANCE_VAR}={instance}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in exclude:
            continue
        if _environ_has(pid, needle):
            pids.append(pid)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


Snapshot = dict[int, float]  # pid -> create time (guards against pid reuse)


def descendants(pid: int) -> Snapshot:
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    found: Snapshot = {}
    for child in children:
        try:
            found[child.pid] = child.create_time()
        except psutil.Error:
            continue
    return found


def _still(snapshot: Snapshot) -> list[int]:
    import psutil

    alive = []
    for pid, created in snapshot.items():
        try:
            if psutil.Process(pid).create_time() == created:
                alive.append(pid)
        except psutil.Error:
            continue
    return alive


def reap(instance: str, known: Snapshot | None = None, grace: float = 3.0) -> list[int]:
    """SIGTERM every process of ``instance`` (and the ``known`` ones and their
    descendants), SIGKILL what is left after ``grace``."""
    me = {os.getpid()}
    targets = set(instance_processes(instance, me))
    for pid in _still(known or {}):
        targets.add(pid)
        targets.update(descendants(pid))
    targets.discard(os.getpid())
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in targets):
        time.sleep(0.05)
    for pid in [p for p in targets if _alive(p)] + instance_processes(instance, me):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(targets)


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphans of this process's descendants its children (Linux); False where that fails."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _stop_own_resource_tracker() -> None:
    """Python's multiprocessing resource tracker ignores SIGTERM; asked nicely (its pipe
    closed) it cleans up what it tracks and exits at once."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker  # the process-wide instance
    stop = getattr(tracker, "_stop", None)
    if stop is not None and getattr(tracker, "_pid", None) is not None:
        try:
            stop()
        except (OSError, ChildProcessError):
            pass


def _reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def reap_descendants(settle: float = 3.0, grace: float = 2.0) -> list[int]:
    """Wait for every descendant to exit: ``settle`` seconds on their own (vLLM's
    processes end once the engine shut down), then SIGTERM, ``grace`` seconds, then
    SIGKILL. Returns the pids that had to be signalled. Call it when nothing of the
    worker runs any more (after the tree stopped)."""
    import psutil

    _stop_own_resource_tracker()
    me = psutil.Process()
    signalled: list[int] = []
    deadline = time.monotonic() + settle
    while True:
        _reap_zombies()
        alive = [p for p in me.children(recursive=True) if _alive(p.pid)]
        if not alive:
            return signalled
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    for proc in alive:
        try:
            proc.terminate()
            signalled.append(proc.pid)
        except psutil.Error:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap_zombies()
        alive = [p for p in me.children(recursive=True) if _alive(p.pid)]
        if not alive:
            return signalled
        time.sleep(0.02)
    for proc in me.children(recursive=True):
        try:
            proc.kill()
        except psutil.Error:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and [p for p in me.children(recursive=True) if _alive(p.pid)]:
        _reap_zombies()
        time.sleep(0.02)
    _reap_zombies()
    return signalled


def main(argv: list[str]) -> int:
    worker_pid, instance = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the worker, not for us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    known: Snapshot = {}
    while os.getppid() == worker_pid:
        known.update(descendants(worker_pid))
        known.pop(os.getpid(), None)
        time.sleep(0.2)
    reap(instance, known)
    return 0


def start_reaper() -> subprocess.Popen[bytes]:
    """Mark this process's environment with a new instance id and start its reaper."""
    instance = uuid.uuid4().hex
    os.environ[INSTANCE_VAR] = instance
    env = {k: v for k, v in os.environ.items() if k != INSTANCE_VAR}  # the reaper must not match itself
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor.reaper", str(os.getpid()), instance],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=None,
        close_fds=True,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
