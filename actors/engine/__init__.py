"""The engine actor and its backends."""

from .actor import EngineActor, EngineRef, EngineStream
from .base import EngineBackend, EngineInfo, EngineRequest, LoraAdapter, StepOutput

__all__ = [
    "EngineActor",
    "EngineBackend",
    "EngineInfo",
    "EngineRef",
    "EngineRequest",
    "EngineStream",
    "LoraAdapter",
    "StepOutput",
]
