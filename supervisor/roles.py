"""Role -> the root supervisor's children. The one place that wires actors together."""

from __future__ import annotations

from dataclasses import dataclass

from actors.engine.actor import EngineActor, EngineRef
from actors.engine.base import EngineBackend
from actors.engine.synthetic import SyntheticEngine
from actors.health import HealthMonitor, HealthStatus
from actors.system import SystemRoutes, SystemServer

from .config import Config
from .errors import ConfigError
from .http import BoundSocket
from .signals import Lifecycle
from .tree import ActorRegistry, ChildSpec, Restart, Strategy, Supervisor

ROOT = "root"


@dataclass
class Tree:
    """Everything one process runs, and the state that outlives actor restarts."""

    root: Supervisor
    root_spec: ChildSpec
    registry: ActorRegistry
    lifecycle: Lifecycle
    engine: EngineRef
    system_socket: BoundSocket
    health: HealthStatus


def make_backend(config: Config) -> EngineBackend:
    if config.engine == "synthetic":
        return SyntheticEngine(
            step_s=config.synthetic_step_ms / 1000.0,
            die_after_s=config.synthetic_die_after,
            hang_after_s=config.synthetic_hang_after,
            load_s=config.synthetic_load_s,
            model=config.model or "synthetic",
        )
    raise ConfigError(f"--engine {config.engine}: not available in this build")


def build_tree(config: Config, registry: ActorRegistry | None = None,
               lifecycle: Lifecycle | None = None) -> Tree:
    if config.role not in ("agg", "decode", "prefill"):
        raise ConfigError(f"--role {config.role}: not implemented yet (agg, decode and prefill are)")
    registry = registry or ActorRegistry()
    lifecycle = lifecycle or Lifecycle(grace_period=config.grace_period)
    system_socket = BoundSocket(config.system_host, config.system_port)
    engine = EngineRef(f"{ROOT}/engine", registry)
    health = HealthStatus()
    routes = SystemRoutes()
    routes.checks["engine"] = lambda: (engine.alive and health.healthy,
                                       "engine healthy" if health.healthy else "engine not healthy yet")
    system = SystemServer(system_socket, registry, lifecycle, routes, enable_chaos=config.enable_chaos)
    children = [
        # first up, last down: /live answers while everything else starts and stops
        ChildSpec("system", system.run, Restart.PERMANENT, shutdown=1.0),
        ChildSpec("engine", EngineActor(make_backend(config), engine).run, Restart.TEMPORARY,
                  shutdown=10.0, significant=True),
        ChildSpec("health", HealthMonitor(engine, health, interval=config.health_check_interval,
                                          timeout=config.health_check_timeout).run,
                  Restart.PERMANENT, shutdown="brutal"),
    ]
    # Non-engine children may restart often under chaos; a genuinely broken
    # one (crash loop) still escalates: 20 restarts within 1 s.
    root = Supervisor(children, Strategy.ONE_FOR_ONE, intensity=20, period=1.0)
    spec = ChildSpec(ROOT, root.run, shutdown="infinity")
    return Tree(root, spec, registry, lifecycle, engine, system_socket, health)
