"""What every engine backend offers the engine actor, and the values they exchange."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

__all__ = [
    "EngineBackend",
    "EngineInfo",
    "EngineRequest",
    "LoraAdapter",
    "MultiModalInput",
    "NoEngineControl",
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
    vocab_size: int = 0


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    lora_id: int
    path: str


@dataclass
class MultiModalInput:
    """The images of a request, in the form its engine takes them."""

    images: list[Any] = field(default_factory=list)  # PIL images: the engine runs the vision tower
    embeddings: Any = None  # or a tensor [n_images, tokens, hidden] an encode worker made
    uuids: list[str] | None = None  # the images' content hashes: name their encoder outputs

    @property
    def count(self) -> int:
        return len(self.images) if self.embeddings is None else int(self.embeddings.shape[0])


@dataclass
class EngineRequest:
    """A request the engine can run: tokens plus backend-ready sampling."""

    request_id: str  # unique among the engine's running requests
    token_ids: list[int]
    max_tokens: int
    sampling: Any = None  # SamplingParams keyword arguments (see actors.handlers.build_sampling)
    lora: LoraAdapter | None = None
    annotations: list[str] = field(default_factory=list)
    priority: int = 0
    dp_rank: int | None = None
    n: int = 1  # samples; each output says which one it belongs to (StepOutput.index)
    multi_modal: MultiModalInput | None = None
    # the token-mode request as it came, for an engine that forwards requests (a processor's chain)
    payload: dict[str, Any] | None = None


@dataclass
class StepOutput:
    """One engine step's worth of output for one sample of one request.

    A request with ``n`` samples yields outputs of every sample, interleaved;
    ``index`` says which. ``finish_reason`` ends that sample; ``final`` marks the
    request's last output, which carries the usage of the whole request.
    """

    token_ids: list[int]
    index: int = 0
    log_probs: list[float] | None = None
    # per token: the top candidates (and the sampled one), {"token_id", "logprob", "rank", "token"}
    top_logprobs: list[list[dict[str, Any]]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or token that ended the sample
    final: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None
    text: str | None = None  # the engine's own detokenization of token_ids, when it does that
    # on a request's first output, when asked: per prompt token (the first is None), as top_logprobs
    prompt_logprobs: list[list[dict[str, Any]] | None] | None = None


# What a per-request stream carries: outputs, then possibly an error instead of more.
Stream = trio.MemoryReceiveChannel[StepOutput | BaseException]


class EngineBackend(Protocol):
    """An engine the :class:`~actors.engine.actor.EngineActor` can drive.

    ``run`` loads the engine, calls ``task_status.started(info)`` and runs until
    cancelled (then shuts the engine down, bounded) or until the engine dies
    (then raises :class:`~actors.errors.EngineDead` after failing every open stream).
    Every other method raises ``EngineDead`` when the engine is gone, and
    :class:`~actors.errors.RequestFailed` when it refuses one operation.
    """

    name: str

    async def run(self, *, task_status: trio.TaskStatus[EngineInfo] = ...) -> None: ...

    async def submit(self, request: EngineRequest) -> Stream:
        """Start a request; outputs arrive on the returned channel, which is
        closed after the last one (``final`` set) or after an error."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Return if healthy; raise ``EngineDead`` if not."""
        ...

    async def reset_prefix_cache(self) -> None: ...

    async def sleep(self, level: int) -> None:
        """Stop scheduling (and free what the platform can) until :meth:`wake_up`."""
        ...

    async def wake_up(self, tags: list[str] | None) -> None: ...

    async def add_lora(self, adapter: LoraAdapter) -> None: ...

    async def remove_lora(self, lora_id: int) -> None: ...

    async def encode(self, images: list[Any]) -> Any:
        """Images (PIL) -> their embeddings, a tensor [n_images, tokens, hidden] (an encode
        worker's engine; the others raise ``RequestFailed``)."""
        ...


class NoEngineControl:
    """For the engines of workers that run no generating model of their own (an encode worker,
    a processor): the control operations answer, each with a clear refusal naming ``kind``."""

    kind = "this worker"

    async def reset_prefix_cache(self) -> None:
        return None

    async def sleep(self, level: int) -> None:
        from ..errors import RequestFailed

        raise RequestFailed(f"{self.kind} does not sleep")

    async def wake_up(self, tags: list[str] | None) -> None:
        from ..errors import RequestFailed

        raise RequestFailed(f"{self.kind} does not sleep")

    async def add_lora(self, adapter: LoraAdapter) -> None:
        from ..errors import RequestFailed

        raise RequestFailed(f"{self.kind} takes no LoRA adapters")

    async def remove_lora(self, lora_id: int) -> None:
        from ..errors import RequestFailed

        raise RequestFailed(f"{self.kind} takes no LoRA adapters")
