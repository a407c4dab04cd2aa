"""argv + environment + config file -> a validated, frozen :class:`Config`.

Two groups of flags reach the worker:

* the worker's own (Dynamo's) flags, each with a ``DYN_*`` environment fallback
  (see :mod:`supervisor.envs`), booleans with a ``--no-X`` form;
* every vLLM engine flag (``AsyncEngineArgs.add_cli_args``), parsed by vLLM's
  own parser and passed through to ``AsyncEngineArgs(**config.engine_args)``.

Precedence, per setting: command line > environment > ``--config FILE`` (TOML
or YAML) > the worker's defaults > vLLM's defaults. Every invalid input is a
:class:`~supervisor.errors.ConfigError` with one line naming the flag(s) (and
the variable or file it came from); the CLI turns it into exit status 2 before
anything starts.

Where things are:

* :mod:`.options` -- the worker's flags (:class:`Option`, the ``OPTIONS`` table, help groups)
  and the argparse parser built from them;
* :mod:`.sources` -- reading the command line, the environment and config files, and the
  precedence merge;
* :mod:`.vllm_args` -- vLLM's flags through vLLM's own parser, imported only when needed;
* :mod:`.rules` -- the rules that refuse a configuration (roles, identity, multimodal...),
  and :func:`check_startable`, what the worker cannot start (``NOT_AVAILABLE_YET``);
* :mod:`.engine_defaults` -- what the worker writes into vLLM's engine arguments (prefix
  caching, block size, ``enforce_eager``, KV transfer and KV events configs);
* :mod:`.schema` -- :class:`Config` itself;
* :mod:`.parse` -- :func:`parse_args`, which runs the above in order;
* :mod:`.dump` -- ``--dump-config-to`` and ``--check-config``.

Everything is importable from here; ``vllm_available`` and
``detect_side_channel_host`` are looked up here at each parse, so replacing them
on this package takes effect.
"""

from __future__ import annotations

from ..envs import ROLES
from ..errors import ConfigError
from .dump import config_dump, run_config_actions
from .engine_defaults import (
    CPU_BLOCK_SIZE,
    ENGINELESS_ROLES,
    GPU_BLOCK_SIZE,
    KV_EVENTS_REPLAY_OFFSET,
    SYNTHETIC_BLOCK_SIZE,
    _is_routable,
    detect_side_channel_host,
    kv_transfer_config_for,
)
from .options import (
    G_HEALTH,
    G_LEGACY,
    G_MULTIMODAL,
    G_PROCESS,
    G_SYNTHETIC,
    G_VLLM,
    G_WORKER,
    OPTIONS,
    OPTIONS_BY_DEST,
    Kind,
    Option,
    build_parser,
)
from .parse import FRONTEND_HTTP_PORT, parse_args
from .rules import CONNECTORS, MULTIMODAL_FLAGS, NOT_AVAILABLE_YET, check_startable, parse_endpoint
from .schema import DEFAULT_ENDPOINT, Config
from .sources import Source, expand_path
from .vllm_args import format_help, vllm_available

__all__ = [
    "CONNECTORS",
    "CPU_BLOCK_SIZE",
    "DEFAULT_ENDPOINT",
    "ENGINELESS_ROLES",
    "FRONTEND_HTTP_PORT",
    "GPU_BLOCK_SIZE",
    "G_HEALTH",
    "G_LEGACY",
    "G_MULTIMODAL",
    "G_PROCESS",
    "G_SYNTHETIC",
    "G_VLLM",
    "G_WORKER",
    "KV_EVENTS_REPLAY_OFFSET",
    "MULTIMODAL_FLAGS",
    "NOT_AVAILABLE_YET",
    "OPTIONS",
    "OPTIONS_BY_DEST",
    "ROLES",
    "SYNTHETIC_BLOCK_SIZE",
    "Config",
    "ConfigError",
    "Kind",
    "Option",
    "Source",
    "_is_routable",
    "build_parser",
    "check_startable",
    "config_dump",
    "detect_side_channel_host",
    "expand_path",
    "format_help",
    "kv_transfer_config_for",
    "parse_args",
    "parse_endpoint",
    "run_config_actions",
    "vllm_available",
]
