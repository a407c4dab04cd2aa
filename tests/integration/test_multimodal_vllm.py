"""Every multimodal chain on real vLLM with the tiny LLaVA gives offline vLLM's greedy
answer for the same image and prompt, through the openai client (text and prompt
tokens) and the request plane (token ids):

- processor -> encode worker -> PD worker (embeddings from transformers' vision tower);
- processor -> encode worker -> PD worker (prefill) -> decode worker (KV through vLLM's
  ExampleConnector);
- processor -> encode+prefill worker (vLLM's own vision tower) -> decode worker;
- EC processor -> vLLM-native encoder (ECConnector producer) -> PD worker (consumer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from supervisor.client import Call
from tests.conftest import VLLM_TEST_ARGS
from tests.procs import REPO, Worker, free_port, wait_until, worker_fixture

pytestmark = pytest.mark.vllm

QUESTION = "What is in this image?"
PROMPT = f"USER: <image>\n{QUESTION} ASSISTANT:"  # the processors' default --mm-prompt-template
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("mm-images")
    red, gradient = root / "red.png", root / "gradient.png"
    Image.new("RGB", (80, 60), (200, 30, 40)).save(red)
    Image.linear_gradient("L").convert("RGB").resize((70, 90)).save(gradient)
    return [red, gradient]


@pytest.fixture(scope="module")
def reference(tiny_llava: Path, images: list[Path]) -> dict[str, Any]:
    """Offline vLLM (LLM.generate with the picture), in a process of its own."""
    out = subprocess.run([sys.executable, "-m", "tests.mm_reference", str(tiny_llava), PROMPT, str(MAX_TOKENS),
                          *map(str, images)], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"})
    line = next((x for x in out.stdout.splitlines() if x.startswith("REFERENCE ")), None)
    assert line is not None, out.stdout[-2000:] + out.stderr[-4000:]
    answers: dict[str, Any] = json.loads(line[len("REFERENCE "):])
    assert answers[str(images[0])]["token_ids"] != answers[str(images[1])]["token_ids"]
    return answers


class Deployment:
    def __init__(self, tmp: Path, model: Path, images: Path) -> None:
        self.env: dict[str, str | None] = {"DYN_FILE_DISCOVERY_DIR": str(tmp / "discovery"),
                                           "VLLM_CPU_KVCACHE_SPACE": None}
        self.model, self.images, self.tmp = model, images, tmp
        self._gens: list[Iterator[Worker]] = []
        self.workers: list[Worker] = []

    def start(self, *args: str, vllm: bool = True) -> Worker:
        engine = ("--engine", "vllm", *VLLM_TEST_ARGS) if vllm else ()
        # workers side by side must not fight over vLLM's KV event ports
        ports = {"DYN_VLLM_KV_EVENT_PORT": str(free_port()), "DYN_VLLM_KV_EVENT_REPLAY_PORT": str(free_port())}
        gen = worker_fixture(*engine, "--model", str(self.model), "--enable-multimodal", "--system-port", "0",
                             "--grace-period", "1", *args, env={**self.env, **ports})
        self._gens.append(gen)
        worker = next(gen)
        self.workers.append(worker)
        return worker

    def processor(self, flag: str = "--multimodal-processor") -> Worker:
        return self.start(flag, "--http-port", "0", "--allowed-local-media-path", str(self.images), vllm=False)

    def ready(self, processor: Worker, workers: int) -> None:
        for w in self.workers:
            w.wait_event("endpoint.registered", timeout=300)
        wait_until(lambda: len([e for e in processor.events() if e["event"] == "frontend.worker_added"]) >= workers,
                   30, "the processor to see its workers")

    def close(self) -> None:
        for gen in reversed(self._gens):
            gen.close()  # SIGTERM, and assert nothing is left behind


@pytest.fixture
def deployment(tmp_path: Path, tiny_llava: Path, images: list[Path]) -> Iterator[Deployment]:
    dep = Deployment(tmp_path, tiny_llava, images[0].parent)
    try:
        yield dep
    finally:
        dep.close()


def connector(storage: Path) -> str:
    return json.dumps({"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                       "kv_connector_extra_config": {"shared_storage_path": str(storage)}})


def check_answers(processor: Worker, images: list[Path], reference: dict[str, Any]) -> None:
    port = processor.wait_event("http.listening")["port"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    for image in images:
        want = reference[str(image)]
        messages: Any = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                      {"type": "image_url", "image_url": {"url": f"file://{image}"}}]}]
        out = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        assert out.choices[0].message.content == want["text"], image.name
        assert out.usage is not None and out.usage.prompt_tokens == want["prompt_tokens"]
    address = f"127.0.0.1:{processor.wait_event('request_plane.listening')['port']}"

    async def token_mode(image: Path) -> list[int]:
        payload = {"messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": str(image)}}]}],
            "stop_conditions": {"max_tokens": MAX_TOKENS}, "sampling_options": {"temperature": 0}}
        async with Call(address, "generate", payload) as call:
            items = await call.collect()
        return [t for item in items for t in item.get("token_ids") or []]

    for image in images:
        assert trio.run(token_mode, image) == reference[str(image)]["token_ids"], image.name


def test_processor_encode_worker_pd_worker(deployment: Deployment, images: list[Path],
                                           reference: dict[str, Any]) -> None:
    deployment.start("--multimodal-encode-worker", vllm=False)
    deployment.start("--multimodal-worker")
    processor = deployment.processor()
    deployment.ready(processor, 2)
    check_answers(processor, images, reference)


def test_processor_encode_worker_prefill_then_decode(deployment: Deployment, images: list[Path],
                                                     reference: dict[str, Any]) -> None:
    kv = connector(deployment.tmp / "kv")
    deployment.start("--multimodal-encode-worker", vllm=False)
    deployment.start("--multimodal-worker", "--role", "prefill", "--kv-transfer-config", kv)
    decode = deployment.start("--multimodal-decode-worker", "--kv-transfer-config", kv)
    processor = deployment.processor()
    deployment.ready(processor, 3)
    check_answers(processor, images, reference)
    # the decode worker served every request (it continued from the prefill worker's KV); it logs
    # request.finished just after its last frame, so the client can have its answer first
    def finished() -> int:
        return len([e for e in decode.events() if e["event"] == "request.finished" and e.get("status") == "ok"
                    and not str(e.get("request_id", "")).startswith("health")])
    wait_until(lambda: finished() >= 2 * len(images), 30,
               lambda: f"the decode worker to finish {2 * len(images)} requests (it finished {finished()})")


def test_encode_prefill_worker_then_decode(deployment: Deployment, images: list[Path],
                                           reference: dict[str, Any]) -> None:
    kv = connector(deployment.tmp / "kv")
    deployment.start("--multimodal-encode-prefill-worker", "--role", "prefill", "--kv-transfer-config", kv)
    deployment.start("--multimodal-decode-worker", "--kv-transfer-config", kv)
    processor = deployment.processor()
    deployment.ready(processor, 2)
    check_answers(processor, images, reference)


def test_ec_processor_native_encoder_pd_consumer(deployment: Deployment, images: list[Path],
                                                 reference: dict[str, Any]) -> None:
    storage = deployment.tmp / "ec"
    encoder = deployment.start("--vllm-native-encoder-worker", "--ec-storage-path", str(storage))
    deployment.start("--multimodal-worker", "--ec-consumer-mode", "--ec-storage-path", str(storage))
    processor = deployment.processor("--ec-processor")
    deployment.ready(processor, 2)
    check_answers(processor, images, reference)
    # the encoder's outputs went through the shared storage, named by the pictures' content
    import hashlib

    stored = {p.name for p in storage.iterdir()}
    assert {hashlib.sha256(i.read_bytes()).hexdigest() for i in images} <= stored, stored
    assert any(e["event"] == "request.finished" for e in encoder.events())


def test_a_text_only_model_behind_a_multimodal_role_is_refused_at_start(tiny_model: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "supervisor", "--engine", "vllm", "--model", str(tiny_model),
                          "--enable-multimodal", "--multimodal-worker", "--check-config"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--multimodal-worker: --model" in out.stderr and "no vision tower" in out.stderr, out.stderr
