"""What vLLM 0.32 needs on this CPU build that the packages do not give it.

vLLM's LLaVA support imports its Pixtral module, which imports transformers' Pixtral
image processor, which needs torchvision; the torchvision wheels a CPU machine can get
here are CUDA builds that break on CPU torch, so it is not installed. vLLM only uses
``_num_image_tokens`` from that module, and transformers' PIL-backed Pixtral processor
has the same function: :func:`install` makes the torchvision module name resolve to the
PIL one (only while torchvision is missing).

It must run in every process that imports vLLM's models, including the ones vLLM starts
itself (its engine core, its workers, and the subprocess that inspects a model's
architecture): the worker installs it in its own process, and the logging configuration
vLLM applies in each process it starts installs it there (:func:`install_filter`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from collections.abc import Sequence

__all__ = ["install", "install_filter"]

_TARGET = "transformers.models.pixtral.image_processing_pixtral"
_STANDIN = "transformers.models.pixtral.image_processing_pil_pixtral"


class _Alias(importlib.abc.Loader):
    def __init__(self, real: str) -> None:
        self.real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return importlib.import_module(self.real)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _PixtralWithoutTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET or importlib.util.find_spec("torchvision") is not None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(_STANDIN))


def install() -> None:
    """Idempotent; cheap (nothing is imported until the module is asked for)."""
    if not any(isinstance(f, _PixtralWithoutTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _PixtralWithoutTorchvision())


class _InstallOnConfigure(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return True


def install_filter() -> logging.Filter:
    """A logging filter factory for vLLM's logging configuration: building it installs the
    compatibility in that process; the filter itself passes everything."""
    install()
    return _InstallOnConfigure()
