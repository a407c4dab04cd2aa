"""vLLM's engine flags: parsed by vLLM's own parser (``AsyncEngineArgs.add_cli_args``)
and passed through to ``AsyncEngineArgs(**config.engine_args)``.

Importing vLLM costs ~10 s, so it is only imported when something needs it: the
vLLM engine, a flag our parser does not know, a config-file key that is not ours,
or ``--help``. ``--model`` and ``--served-model-name`` alone (all the synthetic
engine uses) are read by a small parser of our own instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
from pathlib import Path
from typing import Any, NoReturn

from ..errors import ConfigError
from .options import _SHADOWED_VLLM_FLAGS, _SHARED_FLAGS, G_VLLM, _one_line, _Parser, build_parser
from .sources import Source


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _raise_vllm_error(message: str) -> NoReturn:
    raise ConfigError(_one_line(message))


@functools.cache
def _vllm_parser() -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser_class: Any = FlexibleArgumentParser  # vLLM's annotations are partial
    parser: Any = AsyncEngineArgs.add_cli_args(parser_class(prog="python -m supervisor", add_help=False))
    parser.error = _raise_vllm_error  # an instance attribute wins over the class's sys.exit
    return parser


@functools.cache
def _engine_arg_fields() -> frozenset[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def _vllm_option_strings(parser: Any) -> dict[str, argparse.Action]:
    return {opt: action for action in parser._actions for opt in action.option_strings}


def _parse_vllm(parser: Any, tokens: list[str], *, explicit_only: bool) -> dict[str, Any]:
    """Parse with vLLM's parser. ``explicit_only``: only the dests the tokens set."""
    if not explicit_only:
        return dict(vars(parser.parse_args(list(tokens))))
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return dict(vars(parser.parse_args(list(tokens))))
    finally:
        for action, default in saved:
            action.default = default


def _cpu_platform() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # platform detection failing is vLLM's error to report at engine start
        return False


# -- help -----------------------------------------------------------------------------------------


def format_help(*, vllm_installed: bool) -> str:
    parser = build_parser()
    if vllm_installed:
        vparser = _vllm_parser()
        group = parser.add_argument_group(G_VLLM)
        for action in vparser._actions:
            if not action.option_strings or set(action.option_strings) & _SHADOWED_VLLM_FLAGS:
                continue
            group._group_actions.append(action)
    else:
        parser.add_argument_group(G_VLLM, "vLLM is not installed here: only the synthetic engine is available.")
    return parser.format_help()


# -- engine flags from the command line and the config file -----------------------------------------


def _file_engine_tokens(flag: str, value: Any, vparser: Any, path: Path) -> list[str]:
    """A file value for a vLLM flag -> command-line tokens for vLLM's parser."""
    actions = _vllm_option_strings(vparser)
    if flag not in actions:
        raise ConfigError(f"--config {path}: unknown key {flag[2:]!r} (neither a worker nor a vLLM flag)")
    if value is None:
        return []
    if isinstance(value, bool):
        negative = "--no-" + flag[2:]
        if value:
            return [flag]
        return [negative] if negative in actions else []
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if isinstance(value, list):
        action = actions[flag]
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            return [flag, *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
        return [flag, json.dumps(value)]
    return [flag, str(value)]


def _engine_flags(
    rest: list[str], file_engine: list[tuple[str, Any]], file_path: Path | None, *, wants_vllm: bool,
    vllm_installed: bool,
) -> tuple[dict[str, Any], dict[str, Source], bool]:
    """The engine arguments the user set (command line over file), with sources,
    and whether vLLM was imported to parse them."""
    engine_args: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    shared_ns, vllm_only = _shared_parser().parse_known_args(rest)
    file_vllm_only = [flag for flag, _ in file_engine if flag not in _SHARED_FLAGS]
    if not (vllm_only or file_vllm_only or wants_vllm):
        for flag, value in file_engine:  # only --model / --served-model-name get here
            dest = flag[2:].replace("-", "_")
            if value is not None:
                many = dest == "served_model_name"
                engine_args[dest] = [str(v) for v in value] if isinstance(value, list) else \
                    [str(value)] if many else str(value)
                sources[dest] = "file"
        for dest, value in vars(shared_ns).items():
            engine_args[dest], sources[dest] = value, "cli"
        return engine_args, sources, False

    if not vllm_installed:
        unknown = " ".join(vllm_only) or ", ".join(flag[2:] for flag in file_vllm_only)
        raise ConfigError(f"unrecognized arguments: {unknown} (vLLM is not installed, so no engine flags)")
    vparser = _vllm_parser()
    from_cli = _parse_vllm(vparser, rest, explicit_only=True)
    actions = _vllm_option_strings(vparser)
    file_tokens = [  # the command line wins; dropping what it overrides keeps vLLM from warning twice
        token for flag, value in file_engine
        if not (flag in actions and actions[flag].dest in from_cli)
        for token in _file_engine_tokens(flag, value, vparser, file_path or Path())
    ]
    from_file = _parse_vllm(vparser, file_tokens, explicit_only=True)
    merged = _parse_vllm(vparser, file_tokens + rest, explicit_only=False)
    fields = _engine_arg_fields()
    for dest in [*from_file, *from_cli]:
        if dest in fields:
            engine_args[dest] = merged[dest]
            sources[dest] = "cli" if dest in from_cli else "file"
    # No --model: left out, so the worker's own default (roles.py) or vLLM's applies.
    return engine_args, sources, True


@functools.cache
def _shared_parser() -> argparse.ArgumentParser:
    """``--model`` and ``--served-model-name`` without vLLM: the synthetic engine
    uses them, and importing vLLM for a name would cost ~10 s per worker."""
    parser = _Parser(add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    parser.add_argument("--model")
    parser.add_argument("--served-model-name", nargs="+")
    return parser
