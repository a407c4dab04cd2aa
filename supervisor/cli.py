"""``python -m supervisor``: argv -> Config -> the role's tree -> trio.run.

Exit status: 0 after a clean shutdown (SIGTERM/SIGINT), 1 after an escalated
failure (engine death), 2 for bad command-line input (nothing started).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import structlog
import trio

from .aio import open_asyncio_loop
from .config import Config, parse_args
from .errors import ConfigError, Escalation, StartFailed
from .logs import OutputCapture, route_vllm_logs, setup_logging
from .prometheus_env import prepare_multiproc_dir
from .reaper import become_subreaper, reap_descendants, start_reaper
from .roles import Tree, build_tree
from .signals import watch_signals
from .tree import run_supervised

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_log = structlog.get_logger("supervisor.cli")


def _apply_process_defaults(config: Config) -> None:
    os.environ.setdefault("PYTHONHASHSEED", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    for name, value in config.engine_env.items():  # e.g. the detected NIXL side-channel host
        os.environ.setdefault(name, value)
    if config.engine == "vllm":
        # CPU vLLM on this kind of machine: no hub, loopback only, a bounded KV cache.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        route_vllm_logs(config.log_level)
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        # oneDNN's AMX bf16 matrix products give wrong numbers on AMX machines here (the demo model
        # answers "L'Étoile, la Marseillaise" for the capital of France); capped at AVX-512 BF16
        # they are right (measured: "The capital of France is Paris."). Only a cap: a CPU without
        # AMX is unaffected, and a value the user set wins.
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
        if "kv_cache_memory_bytes" not in config.engine_args:
            # whole GiB; unset, vLLM takes 7 GiB and 15 s to set it up. It overrides
            # kv_cache_memory_bytes, so only when that is not given.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


async def run_tree(tree: Tree) -> int:
    """Run until a signal (exit 0) or an escalation (exit 1)."""
    status = EXIT_OK
    async with open_asyncio_loop(), trio.open_nursery() as nursery:
        with trio.CancelScope() as tree_scope:
            await nursery.start(watch_signals, tree.lifecycle, tree_scope)
            nursery.start_soon(_log_task_tree_on_sigusr1)
            try:
                await run_supervised(tree.root_spec, tree.registry)
            except (Escalation, StartFailed) as exc:  # StartFailed: e.g. a plane's server unreachable at start
                cause = exc.root_cause() if isinstance(exc, Escalation) else exc.__cause__
                _log.error("worker.failed", error=str(exc),
                           cause=f"{type(cause).__name__}: {cause}" if cause else None)
                await tree.lifecycle.fail(str(exc))
                status = EXIT_FAILED
        if tree_scope.cancelled_caught:
            _log.info("worker.stopped", phase=tree.lifecycle.phase.value)
        nursery.cancel_scope.cancel(reason="worker exiting")
    tree.close()
    return status


async def _log_task_tree_on_sigusr1() -> None:
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            _log.info("debug.task_tree", tree=_task_tree())


def _task_tree() -> list[str]:
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        lines.append("  " * depth + task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)  # type: ignore[arg-type]
    return lines


def _early_format(args: Sequence[str]) -> str:
    """The log format, before the full parse (which imports vLLM, and vLLM prints while it
    loads): ``--log-format`` on the command line, else DYN_LOG_FORMAT, else by the terminal."""
    fmt = os.environ.get("DYN_LOG_FORMAT", "auto")
    for i, arg in enumerate(args):
        if arg == "--log-format" and i + 1 < len(args):
            fmt = args[i + 1]
        elif arg.startswith("--log-format="):
            fmt = arg.partition("=")[2]
    if fmt not in ("json", "console"):
        fmt = "console" if sys.stderr.isatty() else "json"
    return fmt


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    capture: OutputCapture | None = None
    if _early_format(args) == "json" and not {"-h", "--help", "--check-config"} & set(args):
        # every byte on stdout/stderr leaves as an event, whoever wrote it (vLLM's processes inherit)
        capture = OutputCapture("json")
        capture.start()
    usage = capture.streams["stderr"] if capture is not None else sys.stderr
    try:
        return _parse_and_run(args, usage, capture)
    finally:
        if capture is not None:
            capture.stop()


def _parse_and_run(args: list[str], usage: Any, capture: OutputCapture | None) -> int:
    """``usage``: where a refusal's one line goes (the real stderr: it is for the person who ran us)."""
    from actors.engine.vllm_compat import install

    install()  # before anything imports vLLM's models (parsing may)
    # before parsing: parsing imports vLLM, which imports prometheus_client
    metrics_dir = prepare_multiproc_dir()
    try:
        config: Config = parse_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=usage)
        return EXIT_USAGE
    except SystemExit as exc:  # --help printed both groups of flags
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    setup_logging(config.log_level, config.log_format,  # type: ignore[arg-type]
                  stream=capture.streams["stderr"] if capture is not None else None)
    return _main(config, metrics_dir, usage)


def _main(config: Config, metrics_dir: Any, usage: Any) -> int:
    from .config import run_config_actions

    _log.debug("metrics.multiproc_dir", path=str(metrics_dir.path), created=metrics_dir.created,
               temporary=metrics_dir.temporary, too_late=metrics_dir.late)
    for warning in config.warnings:
        _log.warning("config.warning", detail=warning)
    try:
        if run_config_actions(config):  # --check-config: valid, dumped if asked, nothing started
            _log.info("config.valid", role=config.role, engine=config.engine, dump=config.dump_config_to)
            return EXIT_OK
    except ConfigError as exc:
        print(f"error: {exc}", file=usage)
        return EXIT_USAGE
    _apply_process_defaults(config)
    try:
        tree = build_tree(config)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=usage)
        return EXIT_USAGE
    become_subreaper()  # orphans inside our tree come back to us, so we can wait for them
    reaper = start_reaper() if config.engine == "vllm" else None  # vLLM's processes go even if we are SIGKILLed
    _log.info("worker.starting", role=config.role, engine=config.engine, namespace=config.namespace,
              component=config.component, pid=os.getpid())
    status = EXIT_FAILED
    try:
        status = trio.run(run_tree, tree)
    finally:
        # No descendant outlives this exit, whichever way we got here.
        if reaper is not None:
            reaper.kill()  # it ignores SIGTERM; it holds nothing
            reaper.wait()
        signalled = reap_descendants()
        _log.info("worker.exit", status=status, **({"killed_descendants": signalled} if signalled else {}))
    return status
