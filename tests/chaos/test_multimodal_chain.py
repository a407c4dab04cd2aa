"""The multimodal chain over real processes: a processor, two encode workers (the tiny
LLaVA's real vision tower, in transformers) and a synthetic PD worker, plus a frontend
that routes chat requests with images to the processor. The synthetic engine answers
from the prompt and the images' content, so the same image gives the same answer on any
worker and another image another answer; vLLM's own answers are compared in
tests/integration/test_multimodal_vllm.py."""

from __future__ import annotations

import base64
import io
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from supervisor.client import Call, CallError
from tests.procs import Worker, wait_until, worker_fixture

MM = ("--enable-multimodal",)


def png(color: tuple[int, int, int], size: tuple[int, int] = (80, 60)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_message(url: str, text: str = "What is in this image?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


class Chain:
    def __init__(self, tmp: Path, model: Path) -> None:
        self.tmp = tmp
        self.model = model
        self.images = tmp / "images"
        self.images.mkdir()
        self.env = {"DYN_FILE_DISCOVERY_DIR": str(tmp / "discovery")}
        self._gens: list[Iterator[Worker]] = []

    def start(self, *args: str) -> Worker:
        gen = worker_fixture(*args, "--model", str(self.model), "--grace-period", "1", env=self.env)
        self._gens.append(gen)
        return next(gen)

    def encoder(self) -> Worker:
        return self.start(*MM, "--multimodal-encode-worker", "--enable-chaos")

    def processor(self, *args: str) -> Worker:
        return self.start(*MM, "--multimodal-processor", "--http-port", "0",
                          "--allowed-local-media-path", str(self.images), *args)

    def close(self) -> None:
        for gen in reversed(self._gens):
            gen.close()  # SIGTERM, and assert nothing is left behind


def client_of(worker: Worker) -> openai.OpenAI:
    port = worker.wait_event("http.listening")["port"]
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chain(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    c = Chain(tmp_path_factory.mktemp("mm-chain"), tiny_llava)
    try:
        encoders = [c.encoder(), c.encoder()]
        pd = c.start("--engine", "synthetic", *MM, "--multimodal-worker", "--synthetic-step-ms", "5")
        processor = c.processor()
        frontend = c.start("--role", "frontend", "--engine", "synthetic", "--http-port", "0")
        for w in (*encoders, pd, processor):
            w.wait_event("endpoint.registered", timeout=120)
        wait_until(lambda: len([e for e in processor.events() if e["event"] == "frontend.worker_added"]) >= 3, 30,
                   "the processor to see its encode and PD workers")
        frontend.wait_ready(60)
        yield {"chain": c, "encoders": encoders, "pd": pd, "processor": processor, "frontend": frontend}
    finally:
        c.close()


def ask(client: openai.OpenAI, url: str, text: str = "What is in this image?", max_tokens: int = 12) -> str:
    out = client.chat.completions.create(model=str(_model(client)), messages=image_message(url, text),  # type: ignore[arg-type]
                                         max_tokens=max_tokens, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == max_tokens
    return out.choices[0].message.content or ""


def _model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_an_image_decides_the_answer_through_the_processor_and_the_frontend(chain: dict[str, Any]) -> None:
    c: Chain = chain["chain"]
    red, green = png((200, 30, 40)), png((10, 200, 40))
    (c.images / "red.png").write_bytes(red)
    direct, routed = client_of(chain["processor"]), client_of(chain["frontend"])
    first = ask(direct, data_url(red))
    assert ask(direct, data_url(red)) == first  # again: the same answer
    assert ask(direct, f"file://{c.images / 'red.png'}") == first  # the same picture from a file
    assert ask(direct, data_url(green)) != first  # another picture: another answer
    assert ask(direct, data_url(red), text="Describe it.") != first  # another question too
    # the frontend sends chat requests with images to the processor (never to its workers)
    assert [m.id for m in routed.models.list().data] == [str(c.model)]
    assert ask(routed, data_url(red)) == first
    # a multimodal model takes chat requests: a completion is refused, naming why
    with pytest.raises(openai.BadRequestError, match="takes chat requests"):
        direct.completions.create(model=str(c.model), prompt="hello", max_tokens=2)
    # the encoders' cache: red was encoded once per encode worker at most, then served from the cache
    hits = sum(_metric(e, "dynamo_component_encoder_cache_hits_total") for e in chain["encoders"])
    misses = sum(_metric(e, "dynamo_component_encoder_cache_misses_total") for e in chain["encoders"])
    assert hits >= 3 and misses <= 4, (hits, misses)


def _metric(worker: Worker, name: str) -> float:
    for line in worker.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


BAD_CONTENT: dict[str, tuple[Any, str]] = {
    "more markers than images": ([{"type": "text", "text": "two <image> markers"}, "small"], "2 <image> marker"),
    "no image": ("no image at all", "1 <image> marker"),
    "unreachable url": ([_part("http://127.0.0.1:9/x.png")], "cannot fetch image"),
    "not an image": ([_part(data_url(b"not a picture"))], "is not an image"),
    "file outside the allowed directory": ([_part("file:///etc/hostname")], "outside --allowed-local-media-path"),
    "too many pixels": ([ "huge"], "too large"),
    "audio": ([{"type": "input_audio", "input_audio": {}}], "not supported"),
}


@pytest.mark.parametrize("case", list(BAD_CONTENT))
def test_bad_images_get_a_clear_error_and_nothing_stops(chain: dict[str, Any], case: str) -> None:
    client = client_of(chain["processor"])
    content, message = BAD_CONTENT[case]
    pictures = {"small": _part(data_url(png((1, 2, 3)))), "huge": _part(data_url(png((4, 5, 6), (9000, 9000))))}
    if isinstance(content, list):
        content = [pictures[p] if isinstance(p, str) else p for p in content]
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model=_model(client), messages=[{"role": "user", "content": content}],
                                       max_tokens=4)
    assert ask(client, data_url(png((7, 8, 9))))  # and the next request is served


def test_a_pd_worker_refuses_images_that_do_not_match_the_prompt(chain: dict[str, Any]) -> None:
    """Straight to the PD worker (as a processor calls it): vLLM would answer these wrong
    without a word, so the worker refuses them."""
    import trio

    pd: Worker = chain["pd"]
    address = f"127.0.0.1:{pd.wait_event('request_plane.listening')['port']}"
    image = {"data": png((1, 1, 1)), "sha256": "0" * 64}

    async def refused(payload: dict[str, Any]) -> str:
        with pytest.raises(CallError) as caught:
            async with Call(address, "generate", payload) as call:
                await call.collect()
        assert caught.value.code == "invalid_request"
        return caught.value.message

    async def main() -> None:
        base = {"stop_conditions": {"max_tokens": 2}}
        # token 4 is the tiny LLaVA's image token: none here, one image given
        assert "places 0 image" in await refused({**base, "token_ids": [1, 5, 6], "multi_modal": {"images": [image]}})
        bad = {"dtype": "bfloat16", "shape": [1, 16, 64], "data": b"\0" * 10}
        assert "10 bytes" in await refused({**base, "token_ids": [1, 4, 6], "multi_modal": {"embeddings": bad}})
        shm = {"dtype": "bfloat16", "shape": [1, 16, 64], "shm": "../../etc/passwd", "nbytes": 2048}
        assert "not a shared-memory name" in await refused({**base, "token_ids": [1, 4, 6],
                                                             "multi_modal": {"embeddings": shm}})

    trio.run(main)


def test_shared_memory_transfer_gives_the_same_answer_and_leaves_nothing(chain: dict[str, Any]) -> None:
    c: Chain = chain["chain"]
    shm_processor = c.processor("--embedding-transfer-mode", "shm")
    shm_processor.wait_event("endpoint.registered", timeout=60)
    wait_until(lambda: len([e for e in shm_processor.events() if e["event"] == "frontend.worker_added"]) >= 3, 30,
               "the second processor to see its workers")
    blue = data_url(png((20, 20, 220)))
    inline_answer = ask(client_of(chain["processor"]), blue)
    assert ask(client_of(shm_processor), blue) == inline_answer
    transfers = [e for e in _events(chain["encoders"]) if e["event"] == "encoder.encoded" and e["transfer"] == "shm"]
    assert transfers, "no encode went through shared memory"
    assert not list(Path("/dev/shm").glob("dynamo-mm-*")), "shared memory left behind"


def _events(workers: list[Worker]) -> list[dict[str, Any]]:
    return [e for w in workers for e in w.events()]


def test_an_encode_worker_killed_mid_request_costs_no_answer(chain: dict[str, Any]) -> None:
    """One encode worker hangs with requests on it (SIGSTOP), then dies (SIGKILL): the
    processor gives those requests to the other one; every answer is right. With no encode
    worker left, requests fail at once with a clear error."""
    client = client_of(chain["processor"])
    encoders: list[Worker] = chain["encoders"]
    victim, survivor = encoders
    images = [png((i * 9 % 256, 100, 50 + i)) for i in range(12)]  # new pictures: no cache hits
    victim.proc.send_signal(signal.SIGSTOP)
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        try:
            results[i] = ask(client, data_url(images[i]))
        except Exception as exc:  # reported below, with which request it was
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(images))]
    try:
        for t in threads:
            t.start()
        processor: Worker = chain["processor"]
        wait_until(lambda: sum(1 for e in survivor.events() if e["event"] == "encoder.encoded"
                               and str(e.get("request_id", "")).startswith("chatcmpl")) >= 1, 30,
                   "the survivor to encode some of them")
    finally:
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.send_signal(signal.SIGCONT)
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    failed = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert not failed, failed
    retried = [e for e in processor.events() if e["event"] == "chain.encoder_failed"]
    assert retried, "no request was on the killed encode worker"
    for i in range(len(images)):  # asked again, now all from the survivor: the same answers
        assert ask(client, data_url(images[i])) == results[i]
    # no encode worker left: a clear, immediate error; the processor keeps serving
    survivor.signal(signal.SIGTERM)
    assert survivor.wait(30) == 0
    wait_until(lambda: any(e["event"] == "frontend.worker_removed" for e in processor.events()), 30,
               "the processor to see the encode workers gone")
    with pytest.raises(openai.APIStatusError, match="no encode worker") as caught:
        ask(client, data_url(png((3, 3, 3))))
    assert caught.value.status_code == 503
    assert client.models.list().data
