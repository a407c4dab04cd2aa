"""``python -m supervisor``: argv -> Config -> the role's tree -> trio.run.

Exit status: 0 after a clean shutdown (SIGTERM/SIGINT), 1 after an escalated
failure (engine death), 2 for bad command-line input (nothing started).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

import structlog
import trio

from .config import Config, parse_args
from .errors import ConfigError, Escalation
from .logs import setup_logging
from .roles import Tree, build_tree
from .signals import watch_signals
from .tree import run_supervised

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_log = structlog.get_logger("supervisor.cli")


def _apply_process_defaults() -> None:
    os.environ.setdefault("PYTHONHASHSEED", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


async def run_tree(tree: Tree) -> int:
    """Run until a signal (exit 0) or an escalation (exit 1)."""
    status = EXIT_OK
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as tree_scope:
            await nursery.start(watch_signals, tree.lifecycle, tree_scope)
            nursery.start_soon(_log_task_tree_on_sigusr1)
            try:
                await run_supervised(tree.root_spec, tree.registry)
            except Escalation as exc:
                cause = exc.root_cause()
                _log.error("worker.failed", error=str(exc),
                           cause=f"{type(cause).__name__}: {cause}" if cause else None)
                await tree.lifecycle.fail(str(exc))
                status = EXIT_FAILED
        if tree_scope.cancelled_caught:
            _log.info("worker.stopped", phase=tree.lifecycle.phase.value)
        nursery.cancel_scope.cancel(reason="worker exiting")
    tree.system_socket.close()
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


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config: Config = parse_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(config.log_level, config.log_format)  # type: ignore[arg-type]
    _apply_process_defaults()
    try:
        tree = build_tree(config)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _log.info("worker.starting", role=config.role, engine=config.engine, namespace=config.namespace,
              component=config.component, pid=os.getpid())
    status = trio.run(run_tree, tree)
    _log.info("worker.exit", status=status)
    return status
