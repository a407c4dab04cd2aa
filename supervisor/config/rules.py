"""The validation rules: each reads merged settings and either returns the
resolved value or raises :class:`~supervisor.errors.ConfigError` with one line
naming the flag(s), and the variable or file a value came from.

Single values are checked as they are read (their parsers live in
:mod:`supervisor.envs` and :mod:`.options`); the rules here are the ones that
look at several settings at once (roles and their legacy spellings, identity,
multimodal roles) or at something outside the command line (a template file).

:func:`check_startable` is the last rule: what the worker accepts (Dynamo's whole
set of roles and planes) but cannot start yet, and a model it would not find.
``--check-config`` and the start of the worker both call it, so the one says
"valid" exactly when the other starts.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import envs
from ..errors import ConfigError
from .options import OPTIONS_BY_DEST
from .schema import DEFAULT_ENDPOINT, Config
from .sources import _RANK, Source, _Settings, expand_path

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

# -- multimodal roles: flag dest -> (name, tree roles it can run as) ----------------------------
MULTIMODAL_FLAGS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "multimodal_processor": ("processor", ("processor",)),
    "ec_processor": ("ec_processor", ("processor",)),
    "multimodal_encode_worker": ("encode_worker", ("encode",)),
    "multimodal_worker": ("pd_worker", ("agg", "prefill")),
    "multimodal_decode_worker": ("decode_worker", ("decode",)),
    "multimodal_encode_prefill_worker": ("encode_prefill_worker", ("agg", "prefill")),
    "vllm_native_encoder_worker": ("native_encoder", ("encode",)),
}
_ROLE_MULTIMODAL = {"encode": "encode_worker", "processor": "processor"}

CONNECTORS = ("nixl", "lmcache", "kvbm", "none", "null")


def parse_endpoint(text: str) -> tuple[str, str, str]:
    """``dyn://ns.component.endpoint`` or ``ns.component.endpoint`` -> the three parts."""
    body = text[len("dyn://"):] if text.startswith("dyn://") else text
    parts = body.split(".")
    if len(parts) != 3 or not all(_NAME.match(part) for part in parts):
        raise ValueError(
            f"{text!r} is not an endpoint: expected dyn://namespace.component.endpoint "
            "(or namespace.component.endpoint), exactly three parts of letters, digits, '-' or '_'"
        )
    return parts[0], parts[1], parts[2]


# -- role and identity ------------------------------------------------------------------------------


def _resolve_role(s: _Settings, warnings: list[str]) -> tuple[str, Source, str | None]:
    """--role, its legacy spellings and the multimodal role flags -> (role, source, multimodal role)."""
    claims: list[tuple[str, str]] = []  # (dest, role it asks for)
    if s.explicit("role"):
        claims.append(("role", s["role"]))
    for dest, implied in (("is_prefill_worker", "prefill"), ("is_decode_worker", "decode")):
        if s.explicit(dest) and s[dest]:
            warnings.append(f"{s.name(dest)} is deprecated: use --role {implied}")
            claims.append((dest, implied))
        elif s.explicit(dest):
            warnings.append(f"{s.spelled(dest)} is deprecated: leave it out and use --role")
    if s.explicit("disaggregation_mode"):
        warnings.append(f"{s.name('disaggregation_mode')} is deprecated: use --role {s['disaggregation_mode']}")
        claims.append(("disaggregation_mode", s["disaggregation_mode"]))
    for (dest_a, role_a), (dest_b, role_b) in itertools.pairwise(claims):
        if role_a != role_b:
            raise ConfigError(f"{s.spelled(dest_a)} contradicts {s.spelled(dest_b)}: give one role")
    role: str | None = claims[0][1] if claims else None
    role_dest = claims[0][0] if claims else None
    for dest, refused in (("is_prefill_worker", "prefill"), ("is_decode_worker", "decode")):
        if s.explicit(dest) and not s[dest] and role == refused and role_dest is not None:
            raise ConfigError(f"{s.spelled(dest)} contradicts {s.spelled(role_dest)}")

    chosen = [dest for dest in MULTIMODAL_FLAGS if s[dest]]
    if len(chosen) > 1:
        raise ConfigError("only one multimodal role at a time: got "
                          + ", ".join(s.name(dest) for dest in chosen))
    multimodal_role: str | None = None
    source: Source = s.sources[role_dest] if role_dest else "default"
    if chosen:
        dest = chosen[0]
        multimodal_role, allowed = MULTIMODAL_FLAGS[dest]
        if role is None:
            role, source = allowed[0], s.sources[dest]
        elif role not in allowed:
            assert role_dest is not None
            raise ConfigError(f"{s.spelled(dest)} contradicts {s.spelled(role_dest)} "
                              f"(it runs as --role {' or '.join(allowed)})")
    role = role or "agg"
    if multimodal_role is None:
        multimodal_role = _ROLE_MULTIMODAL.get(role)
    return role, source, multimodal_role


def _resolve_identity(s: _Settings, role: str) -> tuple[tuple[str, Source], tuple[str, Source], tuple[str, Source]]:
    for dest in ("namespace", "component"):
        if s.explicit(dest) and not _NAME.match(s[dest]):
            raise ConfigError(f"{s.name(dest)}: {s[dest]!r} may only hold letters, digits, '-' and '_'")
    namespace: tuple[str, Source] = (s["namespace"], s.sources["namespace"])
    role_component = {"prefill": "prefill", "encode": "encode", "processor": "processor"}.get(role, "backend")
    component: tuple[str, Source] = (s["component"], s.sources["component"]) if s.explicit("component") \
        else (role_component, "default")
    endpoint: tuple[str, Source] = (DEFAULT_ENDPOINT, "default")
    if s.explicit("endpoint"):
        try:
            parts = parse_endpoint(s["endpoint"].strip())
        except ValueError as exc:
            raise ConfigError(f"{s.name('endpoint')}: {exc}") from None
        src = s.sources["endpoint"]
        for index, dest in ((0, "namespace"), (1, "component")):
            current = namespace if dest == "namespace" else component
            if current[0] == parts[index] or current[1] == "default" or _RANK[src] > _RANK[current[1]]:
                current = (parts[index], src)
            elif _RANK[src] == _RANK[current[1]]:
                raise ConfigError(f"{s.spelled('endpoint')} names {dest} {parts[index]!r} but "
                                  f"{s.spelled(dest)}: give one")
            if dest == "namespace":
                namespace = current
            else:
                component = current
        endpoint = (parts[2], src)
    return namespace, component, endpoint


def _check_served_model_name(served: Any) -> str | None:
    served_list = [served] if isinstance(served, str) else list(served or [])
    if len(served_list) > 1:
        raise ConfigError(
            f"--served-model-name: only one served model name is supported, got {len(served_list)} "
            f"({', '.join(map(str, served_list))})"
        )
    return str(served_list[0]) if served_list else None


# -- single-flag rules ------------------------------------------------------------------------------


def _check_jinja_template(s: _Settings, environ: Mapping[str, str]) -> str | None:
    raw = s["custom_jinja_template"]
    if not raw:
        return None
    path = Path(expand_path(raw, environ))
    if not path.is_file():
        what = "is not a file" if path.exists() else "file not found"
        raise ConfigError(f"{s.name('custom_jinja_template')}: {what}: {path}")
    return str(path)


def _check_endpoint_types(s: _Settings) -> tuple[str, ...]:
    """chat and/or completions; ``none`` alone for a worker that serves no OpenAI route
    (and registers none: it only takes token-mode requests)."""
    types = tuple(t.lower() for t in s["endpoint_types"])
    if types == ("none",):
        return ()
    bad = [t for t in types if t not in ("chat", "completions")]
    if bad or not types:
        raise ConfigError(f"{s.name('endpoint_types')}: expected a comma-separated list of chat, completions; "
                          f"got {','.join(s['endpoint_types']) or 'nothing'}")
    return tuple(dict.fromkeys(types))


def _check_connectors(s: _Settings) -> tuple[str, ...]:
    given = tuple(c.lower() for c in s["connector"])
    if not given:
        return ()
    unknown = [c for c in given if c not in CONNECTORS]
    if unknown:
        raise ConfigError(f"{s.name('connector')}: unknown connector {unknown[0]!r} "
                          f"(expected {', '.join(CONNECTORS)})")
    repeated = sorted({c for c in given if given.count(c) > 1})
    if repeated:
        raise ConfigError(f"{s.name('connector')}: {repeated[0]} given more than once")
    nothing = [c for c in given if c in ("none", "null")]
    if nothing and len(given) > 1:
        raise ConfigError(f"{s.name('connector')}: {nothing[0]} means no connector and cannot be combined "
                          f"with others (got {' '.join(given)})")
    return () if nothing else given


def _resolve_discovery_backend(s: _Settings, warnings: list[str]) -> tuple[str, Source]:
    """--discovery-backend, or its deprecated name --store-kv."""
    if s.sources["discovery_backend"] == "default" and s.explicit("store_kv"):
        backend: tuple[str, Source] = (s["store_kv"], s.sources["store_kv"])
    else:
        backend = (s["discovery_backend"], s.sources["discovery_backend"])
    if s.explicit("store_kv"):
        warnings.append(f"{s.name('store_kv')} is deprecated: use --discovery-backend {s['store_kv']}")
        if s.explicit("discovery_backend") and s["discovery_backend"] != s["store_kv"]:
            raise ConfigError(f"{s.spelled('store_kv')} contradicts {s.spelled('discovery_backend')}")
    return backend


def _check_multimodal(s: _Settings, role: str, multimodal_role: str | None) -> bool:
    """Multimodal roles need --enable-multimodal, and an ECConnector its storage.
    True when this worker shares encoder outputs through an ECConnector."""
    if multimodal_role is not None and not s["enable_multimodal"]:
        flag = next((OPTIONS_BY_DEST[d].flag for d, (name, _) in MULTIMODAL_FLAGS.items()
                     if name == multimodal_role and s[d]), f"--role {role}")
        raise ConfigError(f"{flag} needs --enable-multimodal (multimodal roles are off unless enabled)")
    uses_ec = multimodal_role == "native_encoder" or bool(s["ec_consumer_mode"])
    if uses_ec and s["ec_connector_backend"] == "ECExampleConnector" and not s["ec_storage_path"]:
        who = "--vllm-native-encoder-worker" if multimodal_role == "native_encoder" else "--ec-consumer-mode"
        raise ConfigError(f"{who}: --ec-storage-path is required by the ECExampleConnector backend "
                          "(the shared directory encoder outputs are written to and read from)")
    return uses_ec


# -- what can start -----------------------------------------------------------------------------------

# Values the parser accepts (they are Dynamo's) but the worker cannot start yet, by
# Config field. The one list both --check-config and start read: shrink it as roles
# and planes get built.
NOT_AVAILABLE_YET: Mapping[str, tuple[str, ...]] = {
    "role": (),
    "request_plane": (),
    "event_plane": (),
}
_ALL_VALUES: Mapping[str, tuple[str, ...]] = {
    "role": envs.ROLES, "request_plane": envs.REQUEST_PLANES, "event_plane": envs.EVENT_PLANES,
}
_HF_TRUE = frozenset({"1", "ON", "YES", "TRUE"})  # how huggingface_hub reads HF_HUB_OFFLINE


def check_startable(config: Config, environ: Mapping[str, str] | None = None) -> None:
    """Refuse, with one line naming the flag, a configuration the worker cannot start:
    a role or plane that is not available yet (:data:`NOT_AVAILABLE_YET`), or, with
    ``--engine vllm``, a ``--model`` that is neither a path that exists nor a model in
    the local Hugging Face cache (the worker runs with HF_HUB_OFFLINE=1 unless told
    otherwise)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    for field_name, missing in NOT_AVAILABLE_YET.items():
        value = getattr(config, field_name)
        if value in missing:
            available = [v for v in _ALL_VALUES[field_name] if v not in missing]
            raise ConfigError(f"{_named(config, field_name)} {value}{_origin(config, field_name)}: not available "
                              f"yet (available: {', '.join(available)})")
    if config.durable_kv_events and config.event_plane != "nats":
        raise ConfigError(f"--durable-kv-events{_origin(config, 'durable_kv_events')}: needs the NATS event plane "
                          f"(JetStream): add --event-plane nats")
    if config.tool_call_parser or config.reasoning_parser:
        _check_parsers(config)
    if config.multimodal_role is not None:
        _check_vision_model(config)
    if config.engine == "vllm" and config.model is not None:
        _check_model(config, env)


def _check_vision_model(config: Config) -> None:
    """A multimodal role needs a model with a vision tower (and, read from its directory,
    its image token)."""
    from actors.multimodal.model import vision_config_error

    flag = config.multimodal_flag or f"--role {config.role}"
    if flag == "--role":
        flag = f"--role {config.role}"
    if config.model is None:
        raise ConfigError(f"{flag}: needs --model, a vision-language model's directory (the demo model is "
                          "text only)")
    model = os.path.expanduser(str(config.model))
    if not Path(model).is_dir():
        raise ConfigError(f"{flag}: --model {config.model} must be a model directory (a vision-language model)")
    why = vision_config_error(model)
    if why is not None:
        raise ConfigError(f"{flag}: --model {config.model} cannot serve images: {why}")


def _check_parsers(config: Config) -> None:
    """The parser names must be vLLM's (this imports vLLM, as serving them will)."""
    try:
        from actors.openai.parsing import known_parsers

        tools, reasoning = known_parsers()
    except ImportError as exc:
        raise ConfigError(f"{_named(config, 'tool_call_parser')}: vLLM's parsers are not importable ({exc})") from None
    for field_name, known in (("tool_call_parser", tools), ("reasoning_parser", reasoning)):
        name = getattr(config, field_name)
        if name and name not in known:
            raise ConfigError(f"{_named(config, field_name)} {name}{_origin(config, field_name)}: unknown; vLLM's "
                              f"are: {', '.join(known)}")


def _named(config: Config, field_name: str) -> str:
    return OPTIONS_BY_DEST[field_name].flag


def _origin(config: Config, field_name: str) -> str:
    """`` (from DYN_X)`` or `` (in FILE)`` when the value did not come from the command line."""
    source = config.sources.get(field_name, "default")
    opt = OPTIONS_BY_DEST.get(field_name)
    if source == "env" and opt is not None and opt.env and field_name != "role":
        return f" (from {opt.env})"  # a role may come from several variables: not named
    if source == "env":
        return " (from the environment)"
    if source == "file":
        return f" (in {config.config_file})"
    return ""


def _check_model(config: Config, env: Mapping[str, str]) -> None:
    model = str(config.model)
    where = f"--model {model}{_origin(config, 'model')}"
    if Path(os.path.expanduser(model)).exists():
        return  # a model directory (or a GGUF file): vLLM says whether it can load it
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # comes with vLLM; without it there is no cache to look in
        raise ConfigError(f"{where}: no such file or directory") from None
    offline = env.get("HF_HUB_OFFLINE", "1").strip().upper() in _HF_TRUE  # the worker's default is 1
    args = config.engine_args
    try:
        # Only reads the cache (and checks the name is a repo id): never the network.
        snapshot_download(model, revision=args.get("revision"), cache_dir=args.get("download_dir"),
                          local_files_only=True)
    except HFValidationError:  # not a repo id either: a path that is not there
        raise ConfigError(f"{where}: no such file or directory") from None
    except Exception:  # LocalEntryNotFoundError, or a cache it cannot read: either way not there
        if offline:
            raise ConfigError(f"{where}: no such directory, and not a model in the local Hugging Face cache "
                              "(the worker runs offline, HF_HUB_OFFLINE=1): give a model directory") from None
        # HF_HUB_OFFLINE is off: vLLM may download it
