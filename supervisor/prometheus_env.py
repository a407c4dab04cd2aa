"""``PROMETHEUS_MULTIPROC_DIR``, decided before anything imports prometheus_client.

prometheus_client picks how it stores values (in process, or in mmap files
under ``PROMETHEUS_MULTIPROC_DIR``, shared by every process that writes there)
once, when it is first imported. vLLM expects the multiprocess mode (``vllm
serve`` sets it up the same way), and configuration parsing imports vLLM, so
the worker settles the directory first thing in ``main``:

- unset: a fresh temporary directory, removed when the process exits;
- set but missing: created (with parents);
- set and present: used as it is; at exit this process is marked dead in it
  (its live gauges removed), as prometheus_client asks of every writer.

No prometheus_client import at module level here, on purpose.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MultiprocDir", "prepare_multiproc_dir"]

VAR = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class MultiprocDir:
    path: Path
    created: bool  # made by us (temporary, or a missing directory the user named)
    temporary: bool
    late: bool  # prometheus_client was imported before: this process keeps in-process values


_prepared: MultiprocDir | None = None


def prepare_multiproc_dir(environ: MutableMapping[str, str] | None = None, *,
                          cleanup_at_exit: bool = True) -> MultiprocDir:
    """Settle the directory (see the module docstring). For the process
    environment, only the first call acts; later ones return its result."""
    global _prepared
    if environ is None:
        if _prepared is None:
            _prepared = _prepare(os.environ, cleanup_at_exit)
        return _prepared
    return _prepare(environ, cleanup_at_exit)


def _prepare(env: MutableMapping[str, str], cleanup_at_exit: bool) -> MultiprocDir:
    late = "prometheus_client" in sys.modules
    value = env.get(VAR)
    if not value:
        path = Path(tempfile.mkdtemp(prefix="dynamo-prometheus-"))
        env[VAR] = str(path)
        if cleanup_at_exit:
            atexit.register(shutil.rmtree, path, ignore_errors=True)
        return MultiprocDir(path, created=True, temporary=True, late=late)
    path = Path(value).expanduser()
    created = not path.is_dir()
    path.mkdir(parents=True, exist_ok=True)
    if cleanup_at_exit:
        atexit.register(_mark_dead, path)
    return MultiprocDir(path, created=created, temporary=False, late=late)


def _mark_dead(path: Path) -> None:
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), str(path))  # type: ignore[no-untyped-call]
    except Exception:  # exiting anyway: never fail the exit over metrics files
        pass
