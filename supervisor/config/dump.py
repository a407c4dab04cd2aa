"""``--dump-config-to FILE`` and ``--check-config``: the merged configuration as
JSON, each value with its source (``cli``, ``env``, ``file`` or ``default``), and
:func:`run_config_actions`, which the CLI calls once the configuration is parsed,
before anything starts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .rules import check_startable
from .schema import Config, _jsonable

_DUMP_SKIP = frozenset({"engine_args", "sources", "engine_arg_sources", "warnings"})


def config_dump(config: Config) -> dict[str, Any]:
    """The merged configuration as JSON-ready data, each value with its source."""
    return {
        "config": {
            f.name: {"value": _jsonable(getattr(config, f.name)), "source": config.sources.get(f.name, "default")}
            for f in dataclasses.fields(config) if f.name not in _DUMP_SKIP
        },
        "engine_args": {
            key: {"value": _jsonable(value), "source": config.engine_arg_sources.get(key, "default")}
            for key, value in sorted(config.engine_args.items())
        },
        "config_file": config.config_file,
        "warnings": list(config.warnings),
    }


def run_config_actions(config: Config) -> bool:
    """Refuse what the worker could not start (:func:`~.rules.check_startable`), so
    --check-config says "valid" exactly when the worker would start; write the dump
    if asked; True when the process must exit 0 now (--check-config)."""
    check_startable(config)
    if config.dump_config_to:
        path = Path(config.dump_config_to)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(config_dump(config), indent=2, sort_keys=False) + "\n")
            tmp.replace(path)
        except OSError as exc:
            raise ConfigError(f"--dump-config-to {path}: cannot write it ({exc.strerror or exc})") from None
    return config.check_config
