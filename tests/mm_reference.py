"""Offline vLLM's answers for the multimodal tests: ``python -m tests.mm_reference MODEL
PROMPT MAX_TOKENS IMAGE...`` prints ``{"<image path>": {"token_ids": [...], "text": ...,
"prompt_tokens": n}}``, greedy, one request per image, with the engine settings the tests'
workers use. It runs vLLM in this one process (no engine-core process), so the import
compatibility the worker installs in every vLLM process is installed here once."""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    model, prompt, max_tokens, *images = argv
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # as the worker runs vLLM on this CPU
    from actors.engine.vllm_compat import install
    from actors.engine.vllm_worker import WorkerSetup  # noqa: F401  (this CPU's AMX permission)

    install()
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(model, max_model_len=2048, block_size=32, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=16 * 2**20, worker_extension_cls="actors.engine.vllm_worker.WorkerSetup")
    params = SamplingParams(max_tokens=int(max_tokens), temperature=0)
    answers = {}
    for path in images:
        with Image.open(path) as image:
            out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image.convert("RGB")}}, params)[0]
        answers[path] = {"token_ids": list(out.outputs[0].token_ids), "text": out.outputs[0].text,
                         "prompt_tokens": len(out.prompt_token_ids or [])}
    print("REFERENCE " + json.dumps(answers), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
