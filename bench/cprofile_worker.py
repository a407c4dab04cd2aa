"""Run the worker under cProfile with a CPU-time clock (this thread's CPU time, so being
preempted by other processes on our two cores is not charged to whatever was running).

    python -m bench.cprofile_worker OUT.prof <worker flags...>

SIGUSR2 starts the profiler, a second SIGUSR2 stops it (so only the load is profiled, not the
imports); stats are written when the worker exits (SIGTERM it). Used by
``python -m bench.profile --cprofile``.
"""

from __future__ import annotations

import cProfile
import signal
import sys
import time


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    from supervisor.cli import main as worker_main

    prof = cProfile.Profile(time.thread_time_ns, 1e-9)
    toggles = 0

    def toggle(signum: int, frame: object) -> None:
        nonlocal toggles
        toggles += 1
        if toggles == 1:
            prof.enable()
        elif toggles == 2:
            prof.disable()

    signal.signal(signal.SIGUSR2, toggle)
    try:
        status = worker_main(argv)
    finally:
        prof.disable()
        prof.dump_stats(out)
    return status


if __name__ == "__main__":
    sys.exit(main())
