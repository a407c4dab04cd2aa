"""Role -> the root supervisor's children. The one place that wires actors together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.endpoint import EndpointServer, Registration
from actors.engine.actor import EngineActor, EngineRef
from actors.engine.base import EngineBackend
from actors.engine.synthetic import SyntheticEngine
from actors.handlers import Handlers, Inflight
from actors.health import HealthMonitor, HealthStatus
from actors.system import SystemRoutes, SystemServer

from .config import Config
from .errors import ConfigError
from .http import BoundSocket
from .planes.discovery import Discovery, FileDiscovery, MemDiscovery
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
    inflight: Inflight
    registration: Registration
    endpoint: EndpointServer | None = None


def make_backend(config: Config) -> EngineBackend:
    if config.engine == "synthetic":
        return SyntheticEngine(
            step_s=config.synthetic_step_ms / 1000.0,
            die_after_s=config.synthetic_die_after,
            hang_after_s=config.synthetic_hang_after,
            load_s=config.synthetic_load_s,
            model=config.model or "synthetic",
        )
    if config.engine == "vllm":
        try:
            from actors.engine.vllm_backend import VllmEngine
        except ImportError as exc:
            raise ConfigError(f"--engine vllm: vLLM is not importable ({exc}); install the [vllm] extra") from None
        return VllmEngine(engine_args(config))
    raise ConfigError(f"--engine {config.engine}: unknown engine (vllm, synthetic)")


def engine_args(config: Config) -> dict[str, Any]:
    """The AsyncEngineArgs for this worker; the demo model when none was named."""
    args = dict(config.engine_args)
    model = config.model or args.get("model")
    if not model:
        from actors.engine.models import demo_model_path

        model = str(demo_model_path())
        args.setdefault("served_model_name", ["SmolLM2-135M-Instruct"])
    args["model"] = model
    return args


def make_discovery(config: Config) -> Discovery:
    backend = getattr(config, "discovery_backend", "file")
    if backend == "mem":
        return MemDiscovery()
    if backend == "file":
        return FileDiscovery()
    raise ConfigError(f"--discovery-backend {backend}: not available yet (file, mem)")


def serves_endpoints(config: Config) -> bool:
    """Non-leader data-parallel ranks run a degraded tree: no endpoints, no registration."""
    rank = getattr(config, "data_parallel_rank", None)
    return not rank


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
    inflight = Inflight()
    registration = Registration()
    endpoint: EndpointServer | None = None
    if serves_endpoints(config):
        endpoint = EndpointServer(
            Handlers(engine, role=config.role),
            BoundSocket(config.system_host, getattr(config, "request_plane_port", 0) or 0),
            lifecycle,
            inflight,
            discovery=make_discovery(config),
            namespace=config.namespace,
            component=config.component,
            endpoint=config.endpoint,
            engine=engine,
            registration=registration,
        )
        children.append(endpoint.spec())
        routes.checks["registered"] = lambda: (registration.registered, "not registered in discovery")
    # Non-engine children may restart often under chaos; a genuinely broken
    # one (crash loop) still escalates: 20 restarts within 1 s.
    root = Supervisor(children, Strategy.ONE_FOR_ONE, intensity=20, period=1.0)
    spec = ChildSpec(ROOT, root.run, shutdown="infinity")
    return Tree(root, spec, registry, lifecycle, engine, system_socket, health, inflight, registration, endpoint)
