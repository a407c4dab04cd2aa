"""Where settings come from, and which one wins.

Per setting: command line > environment (``DYN_*``, see :mod:`supervisor.envs`) >
``--config FILE`` (TOML or YAML) > the worker's defaults > vLLM's defaults.
This module reads the three sources for the worker's own flags and merges them
into :class:`_Settings`, which remembers each value's source so an error can say
where a bad value came from ("--role (from DYN_ROLE)", "--role (in w.yaml)").
vLLM's flags in a config file are handed on as (flag, value) pairs for vLLM's
parser (:mod:`.vllm_args`).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from .. import envs
from ..errors import ConfigError
from .options import _OPTIONS_BY_FLAG, OPTIONS, OPTIONS_BY_DEST, Option, _one_line

Source = Literal["cli", "env", "file", "default"]
_RANK: Mapping[str, int] = {"default": 0, "file": 1, "env": 2, "cli": 3}


# -- the command line -----------------------------------------------------------------------------


def _normalize_argv(argv: Iterable[str]) -> list[str]:
    """``--max_model_len`` -> ``--max-model-len`` (as ``vllm serve`` allows), up to
    the first ``.`` (vLLM's ``--json-arg.key value``) or ``=``."""
    out = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            key, eq, value = token.partition("=")
            head, dot, tail = key.partition(".")
            token = head.replace("_", "-") + dot + tail + eq + value
        out.append(token)
    return out


_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(text: str, environ: Mapping[str, str]) -> str:
    """``$VAR``/``${VAR}`` from ``environ`` (unknown ones left as they are), then ``~``."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1).strip("{}")
        return environ.get(name, match.group(0))

    return os.path.expanduser(_VAR.sub(sub, text))


# -- config files ---------------------------------------------------------------------------------


def _load_config_file(path_text: str, environ: Mapping[str, str]) -> tuple[Path, dict[str, Any]]:
    path = Path(expand_path(path_text, environ))
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"--config {path_text}: expected a .toml, .yaml or .yml file")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"--config {path_text}: file not found ({path})") from None
    except OSError as exc:
        raise ConfigError(f"--config {path_text}: cannot read it ({exc.strerror or exc})") from None
    try:
        data: Any = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path_text}: invalid {suffix[1:].upper()}: {_one_line(str(exc))}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path_text}: expected a mapping of flag: value, got {type(data).__name__}")
    return path, data


def _file_key_to_flag(key: Any, path: Path) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ConfigError(f"--config {path}: key {key!r} is not a flag name")
    return "--" + key.strip().lstrip("-").replace("_", "-")


def _file_value_text(opt: Option, value: Any, path: Path) -> Any:
    """A file value for one of our flags -> its typed value."""
    where = f"{opt.flag} in {path}"
    try:
        if opt.kind in ("bool", "flag"):
            if isinstance(value, bool):
                return value
            if isinstance(value, (str, int)):
                return envs.parse_bool(str(value))
        elif opt.kind == "list":
            if isinstance(value, str):
                return envs.parse_list(value)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return tuple(p for v in value for p in envs.parse_list(v))
        elif opt.kind in ("json", "payload"):
            if isinstance(value, dict):
                return value
            if isinstance(value, str):
                return opt.parse_text(value)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return opt.parse_text(str(value))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    raise ConfigError(f"{where}: unsupported value {value!r}")


def _split_config_file(
    path_text: str | None, env: Mapping[str, str]
) -> tuple[Path | None, dict[str, Any], list[tuple[str, Any]]]:
    """--config FILE -> (path, our settings by dest, vLLM's (flag, value) pairs)."""
    if path_text is None:
        return None, {}, []
    path, data = _load_config_file(path_text, env)
    ours: dict[str, Any] = {}
    engine: list[tuple[str, Any]] = []
    for key, value in data.items():
        flag = _file_key_to_flag(key, path)
        if flag in ("--config", "--help"):
            raise ConfigError(f"--config {path}: {flag} cannot be set in a config file")
        opt = _OPTIONS_BY_FLAG.get(flag)
        if opt is None:
            engine.append((flag, value))
        else:
            ours[opt.dest] = _file_value_text(opt, value, path)
    return path, ours, engine


# -- merging --------------------------------------------------------------------------------------


class _Settings:
    """Every one of our settings after the precedence merge, with its source."""

    def __init__(self, cli: Mapping[str, Any], environ: Mapping[str, str], file_values: Mapping[str, Any],
                 file_path: Path | None) -> None:
        self.values: dict[str, Any] = {}
        self.sources: dict[str, Source] = {}
        self.environ = environ
        self.file_path = file_path
        for opt in OPTIONS:
            if opt.dest in cli:
                self.values[opt.dest], self.sources[opt.dest] = cli[opt.dest], "cli"
            elif opt.env and envs.is_set(opt.env, environ):
                try:
                    value = envs.get(opt.env, environ)  # validates, names the variable on error
                    if opt.kind == "loglevel":  # keep the per-module levels the variable may carry
                        value = opt.parse_text(environ[opt.env])
                    self.values[opt.dest], self.sources[opt.dest] = value, "env"
                except ConfigError as exc:
                    raise ConfigError(f"{opt.flag}: {exc}") from None
                except ValueError as exc:
                    raise ConfigError(f"{opt.flag} (from {opt.env}): {exc}") from None
            elif opt.dest in file_values:
                self.values[opt.dest], self.sources[opt.dest] = file_values[opt.dest], "file"
            else:
                self.values[opt.dest], self.sources[opt.dest] = opt.default_value(), "default"

    def __getitem__(self, dest: str) -> Any:
        return self.values[dest]

    def explicit(self, dest: str) -> bool:
        return self.sources[dest] != "default"

    def name(self, dest: str) -> str:
        """How to name a setting in an error: the flag, and where it came from."""
        opt = OPTIONS_BY_DEST[dest]
        source = self.sources[dest]
        if source == "env":
            return f"{opt.flag} (from {opt.env})"
        if source == "file":
            return f"{opt.flag} (in {self.file_path})"
        return opt.flag

    def spelled(self, dest: str) -> str:
        """The setting as the user wrote it: ``--role decode``, ``--is-prefill-worker``."""
        opt = OPTIONS_BY_DEST[dest]
        value = self.values[dest]
        negated = "--no-" + opt.flag[2:]
        text = (opt.flag if value else negated) if opt.kind == "bool" else f"{opt.flag} {value}"
        source = self.sources[dest]
        if source == "env":
            return f"{text} (from {opt.env})"
        if source == "file":
            return f"{text} (in {self.file_path})"
        return text
