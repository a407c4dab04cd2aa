import atexit
import os
import sys

from .prometheus_env import prepare_multiproc_dir

prepare_multiproc_dir()  # before anything imports prometheus_client (see prometheus_env)

from .cli import main  # noqa: E402

status = main()
# The worker is done: run the exit handlers (logging, multiprocessing, the metrics directory,
# vLLM's finalizers), then skip the interpreter's teardown of every module's objects, which
# with torch and vLLM loaded took 2-4 s of CPU between the last log line and the exit
# (bench/RESULTS.md: engine death -> exit, SIGTERM -> exit).
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(status)
