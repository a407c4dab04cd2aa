"""What every engine backend offers the engine actor, and the values they exchange."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from supervisor.errors import EngineDead

__all__ = [
    "EngineBackend",
    "EngineInfo",
    "EngineRequest",
    "RequestFailed",
    "StepOutput",
    "Stream",
]


@dataclass(frozen=True)
class EngineInfo:
    """What the engine reports once loaded; it goes into the registration."""

    model: str
    total_kv_blocks: int
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    load_time_s: float
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    backend: str = "synthetic"
    # the model's sampling defaults (generation_config.json), as SamplingParams kwargs
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    lora_enabled: bool = False
    max_loras: int = 0


@dataclass
class EngineRequest:
    """A request the engine can run: tokens plus backend-ready sampling."""

    request_id: str
    token_ids: list[int]
    max_tokens: int
    sampling: Any = None  # backend specific (vllm.SamplingParams for vLLM)
    lora: Any = None
    annotations: list[str] = field(default_factory=list)
    priority: int = 0
    dp_rank: int | None = None
    kv_transfer_params: dict[str, Any] | None = None


@dataclass
class StepOutput:
    """One engine step's worth of output for one request."""

    token_ids: list[int]
    log_probs: list[float] | None = None
    top_logprobs: list[list[dict[str, Any]]] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None
    text: str | None = None


class RequestFailed(Exception):
    """The engine refused or failed one request; the engine itself is fine."""


# What a per-request stream carries: outputs, then possibly an error instead of more.
Stream = trio.MemoryReceiveChannel[StepOutput | BaseException]


class EngineBackend(Protocol):
    """An engine the :class:`~actors.engine.actor.EngineActor` can drive.

    ``run`` loads the engine, calls ``task_status.started(info)`` and runs until
    cancelled (then shuts the engine down, bounded) or until the engine dies
    (then raises :class:`EngineDead` after failing every open stream).
    """

    name: str

    async def run(self, *, task_status: trio.TaskStatus[EngineInfo] = ...) -> None: ...

    async def submit(self, request: EngineRequest) -> Stream:
        """Start a request; outputs arrive on the returned channel, which is
        closed after the last one (``finish_reason`` set) or after an error."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Return if healthy; raise :class:`EngineDead` if not."""
        ...

    async def reset_prefix_cache(self) -> None: ...


def dead(reason: str) -> EngineDead:
    return EngineDead(reason)
