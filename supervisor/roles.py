"""Role -> the root supervisor's children. The one place that wires actors together."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from actors.endpoint import EndpointServer, Registration
from actors.engine.actor import EngineActor, EngineRef
from actors.engine.base import EngineBackend, EngineInfo
from actors.engine.synthetic import SyntheticEngine
from actors.frontend.instances import DiscoveryWatcher, Instances
from actors.frontend.kv_index import KvIndex
from actors.frontend.metrics import FrontendMetrics
from actors.frontend.models import FrontendModels, FrontendOptions
from actors.frontend.router import Router, RouterConfig
from actors.frontend.subscriber import EventSubscriber
from actors.handlers import Handlers
from actors.health import Canary, HealthMonitor, HealthStatus
from actors.http_front import WorkerModels
from actors.kv_events import KvEventsRelay, KvEventsState, kv_event_sources
from actors.metrics import MetricsActor, WorkerMetrics, vllm_metrics_source
from actors.model_card import ModelCard, card_files
from actors.multimodal.chain import ENCODER_ROLES, GENERATOR_ROLES, ChainOptions, MultimodalChain
from actors.multimodal.encoder import EncodeEndpoint, VisionEncoder
from actors.multimodal.inputs import MediaAccept
from actors.multimodal.media import MediaFetcher
from actors.multimodal.model import model_facts
from actors.multimodal.prompt import MultimodalPrompts
from actors.openai import ByteTokenizer, HfTokenizer, OpenAIServer, Tokenizer
from actors.openai.parsing import ChatParsers
from actors.pipeline import Inflight, RequestPipeline
from actors.system import SystemRoutes, SystemServer

from .config import Config, check_startable
from .errors import ConfigError
from .http import BoundSocket
from .planes.discovery import Discovery, FileDiscovery, MemDiscovery
from .planes.events import EventPublisher, ZmqEventPublisher, make_event_publisher
from .planes.events_nats import NatsEventPublisher
from .planes.servers import etcd_endpoints_for, nats_servers_for
from .signals import Lifecycle
from .tree import ActorRegistry, ChildSpec, Restart, Strategy, Supervisor

ROOT = "root"
_log = structlog.get_logger("supervisor.roles")


@dataclass
class Tree:
    """Everything one process runs, and the state that outlives actor restarts."""

    root: Supervisor
    root_spec: ChildSpec
    registry: ActorRegistry
    lifecycle: Lifecycle
    system_socket: BoundSocket
    inflight: Inflight
    pipeline: RequestPipeline
    engine: EngineRef | None = None
    health: HealthStatus | None = None
    registration: Registration | None = None
    endpoint: EndpointServer | None = None
    metrics: WorkerMetrics | None = None
    events: EventPublisher | None = None
    kv_events: KvEventsState | None = None
    instances: Instances | None = None  # the frontend's

    def close(self) -> None:
        """Release what the process owns outside the actors (after the tree stopped)."""
        self.system_socket.close()
        if self.kv_events is not None:
            self.kv_events.close()
        if self.events is not None:
            self.events.close()


def make_backend(config: Config,
                 stats_listener: Callable[[Any, Any, int], None] | None = None) -> EngineBackend:
    if config.engine == "synthetic":
        shape = synthetic_model_shape(config.model)
        kv_events: tuple[str, str | None] | None = None
        if config.synthetic_kv_events and config.publishes_kv_events and config.kv_events_config:
            [source] = kv_event_sources(config.kv_events_config, [0])
            kv_events = (source.endpoint, source.replay_endpoint)
        return SyntheticEngine(
            step_s=config.synthetic_step_ms / 1000.0,
            die_after_s=config.synthetic_die_after,
            hang_after_s=config.synthetic_hang_after,
            load_s=config.synthetic_load_s,
            model=config.served_model_name or config.model or "synthetic",
            block_size=config.block_size or 16,
            prefill_s_per_token=config.synthetic_prefill_us_per_token / 1e6,
            kv_events=kv_events,
            **shape,
        )
    if config.engine == "vllm":
        try:
            from actors.engine.vllm_backend import VllmEngine
        except ImportError as exc:
            raise ConfigError(f"--engine vllm: vLLM is not importable ({exc}); install the [vllm] extra") from None
        return VllmEngine(engine_args(config), stats_listener=stats_listener)
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
    if backend == "etcd":
        from .planes.discovery_etcd import EtcdDiscovery

        try:
            return EtcdDiscovery(etcd_endpoints_for(config))
        except ValueError as exc:
            raise ConfigError(f"--discovery-backend etcd: {exc} (set ETCD_ENDPOINTS)") from None
    if backend == "nats":
        from .planes.discovery_nats import NatsDiscovery

        return NatsDiscovery(nats_servers_for(config))
    raise ConfigError(f"--discovery-backend {backend}: unknown (mem, file, etcd, nats)")


def request_plane(config: Config) -> str:
    """The request plane the endpoint server serves (NATS servers from NATS_SERVER)."""
    return str(getattr(config, "request_plane", "tcp") or "tcp")


def _has_tokenizer(model: str | None) -> bool:
    return model is not None and Path(model, "tokenizer_config.json").is_file()


def synthetic_model_shape(model: str | None) -> dict[str, Any]:
    """A synthetic engine given a real model directory takes its vocabulary size (so
    the model's tokenizer can render every token it emits)."""
    if model is None or not Path(model, "config.json").is_file():
        return {}
    import json

    cfg = json.loads(Path(model, "config.json").read_text())
    vocab = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    return {"vocab_size": int(vocab)} if vocab else {}


def tokenizer_factory(config: Config) -> Callable[[], Tokenizer]:
    """The model's tokenizer (and chat template); for a synthetic engine without a
    model directory, bytes as tokens."""
    if config.engine != "vllm" and not _has_tokenizer(config.model):
        return ByteTokenizer
    template_path = getattr(config, "custom_jinja_template", None)

    def load() -> Tokenizer:
        template = Path(template_path).read_text() if template_path else None
        model = engine_args(config)["model"] if config.engine == "vllm" else config.model
        assert model is not None
        return HfTokenizer(model, template)

    return load


def engine_version(config: Config) -> str:
    """What /version reports: vLLM's version on a vLLM worker (as vllm serve does)."""
    if config.engine == "vllm":
        from actors.engine.vllm_backend import vllm_version

        return vllm_version()
    return ""


def advertise_host(config: Config, bound_host: str) -> str:
    """The address other hosts reach this worker at: ``--advertise-host``, else the bind
    address, or a detected routable address when bound to every interface."""
    if config.advertise_host:
        return config.advertise_host
    if bound_host in ("0.0.0.0", "::"):
        from .config import detect_side_channel_host

        return detect_side_channel_host() or "127.0.0.1"
    return bound_host


def model_dir(config: Config) -> str | None:
    if config.engine == "vllm":
        return str(engine_args(config)["model"])
    return config.model if _has_tokenizer(config.model) else None


def card_source(config: Config) -> Callable[[EngineInfo], tuple[ModelCard, dict[str, Path]]]:
    """The worker's model card and the tokenizer files a frontend fetches (``model_card``)."""
    directory = model_dir(config)
    template = getattr(config, "custom_jinja_template", None)

    def source(info: EngineInfo) -> tuple[ModelCard, dict[str, Path]]:
        files = card_files(directory, template) if directory else {}
        card = ModelCard(name=info.model, context_length=info.max_model_len, block_size=info.block_size,
                         total_kv_blocks=info.total_kv_blocks, tokenizer="hf" if files else "bytes",
                         vocab_size=info.vocab_size, files=tuple(files), tool_call_parser=config.tool_call_parser,
                         reasoning_parser=config.reasoning_parser)
        return card, files

    return source


# -- multimodal roles ---------------------------------------------------------------------------

PROCESSOR_ROLES = ("processor", "ec_processor")


def multimodal_chain(config: Config) -> tuple[MultimodalChain, DiscoveryWatcher]:
    """A processor's engine (the encode and generating workers it finds in discovery)
    and the watcher that keeps their lists current."""
    ec = config.multimodal_role == "ec_processor"
    encoder_roles = ("native_encoder",) if ec else ("encode_worker",)
    generators = Instances(lambda r: r.runtime_config.get("multimodal_role") in GENERATOR_ROLES, fetch_cards=False)
    encoders = Instances(lambda r: r.runtime_config.get("multimodal_role") in encoder_roles, fetch_cards=False)
    nats = nats_servers_for(config)
    router = Router(RouterConfig(mode="round-robin"), KvIndex())
    models = FrontendModels(generators, router, FrontendMetrics(generators, router),
                            FrontendOptions(migration_limit=config.migration_limit, nats_servers=nats))
    model = str(engine_args(config)["model"])
    facts = model_facts(model)
    max_len = int(config.engine_args.get("max_model_len") or facts.max_position_embeddings)
    options = ChainOptions(served_name=config.served_model_name or model, max_model_len=max_len,
                           vocab_size=facts.vocab_size, eos_token_ids=facts.eos_token_ids,
                           transfer_mode=config.embedding_transfer_mode, encoder_cache=ec, nats_servers=nats)
    watcher = DiscoveryWatcher([generators, encoders], make_discovery(config), config.namespace, nats_servers=nats)
    return MultimodalChain(models, encoders, options), watcher


def configure_multimodal(config: Config, handlers: Handlers, engine: EngineRef, metrics: WorkerMetrics) -> None:
    """What a multimodal role's endpoints take: images or embeddings, chat messages with
    images (a processor), or images to encode (an encode worker)."""
    role = config.multimodal_role
    model = str(engine_args(config)["model"])
    facts = model_facts(model)
    if role in PROCESSOR_ROLES:
        fetcher = MediaFetcher(config.engine_args.get("allowed_local_media_path"))
        handlers.prompts = MultimodalPrompts(config.mm_prompt_template, tokenizer_factory(config), fetcher,
                                             image_token=facts.image_token, image_seq_length=facts.image_seq_length)
        handlers.media = MediaAccept(facts.image_token_id)
        handlers.forwards = True
    elif role == "encode_worker":
        endpoint = EncodeEndpoint(engine, metrics.registry, transfer_mode=config.embedding_transfer_mode)
        handlers.endpoints["encode"] = endpoint.encode
    else:
        embeddings = bool(config.engine_args.get("enable_mm_embeds")) or config.engine != "vllm"
        handlers.media = MediaAccept(facts.image_token_id, embeddings=embeddings)


def serves_endpoints(config: Config) -> bool:
    """Non-leader data-parallel ranks run a degraded tree: no endpoints, no registration."""
    rank = getattr(config, "data_parallel_rank", None)
    return not rank


def dp_ranks(config: Config) -> list[int]:
    """The data-parallel ranks whose engines run in this process."""
    rank = getattr(config, "data_parallel_rank", None)
    if rank is not None:
        return [int(rank)]
    return list(range(max(1, int(getattr(config, "data_parallel_size", 1) or 1))))


def build_tree(config: Config, registry: ActorRegistry | None = None,
               lifecycle: Lifecycle | None = None) -> Tree:
    check_startable(config)  # what --check-config refuses, start refuses
    registry = registry or ActorRegistry()
    lifecycle = lifecycle or Lifecycle(grace_period=config.grace_period)
    if config.role == "frontend":
        return build_frontend_tree(config, registry, lifecycle)
    system_socket = BoundSocket(config.system_host, config.system_port)
    engine = EngineRef(f"{ROOT}/engine", registry)
    health = HealthStatus()
    routes = SystemRoutes()
    routes.checks["engine"] = lambda: (engine.alive and health.healthy,
                                       "engine healthy" if health.healthy else "engine not healthy yet")
    system = SystemServer(system_socket, registry, lifecycle, routes, enable_chaos=config.enable_chaos)
    # Owned here, above the actors, so their restarts lose nothing: the event
    # plane socket, the metrics registry, the KV event positions and index.
    instance_id = uuid.uuid4().hex[:16]
    ranks = dp_ranks(config)
    events = make_event_publisher(config)
    sources = kv_event_sources(config.kv_events_config, ranks) if config.publishes_kv_events else []
    kv_state = KvEventsState.for_sources(sources, namespace=config.namespace, worker_id=instance_id,
                                         enable_index=config.enable_local_indexer) if sources else None
    fallback_model = config.served_model_name or config.model or ""
    metrics = WorkerMetrics(
        namespace=config.namespace, component=config.component, endpoint=config.endpoint,
        worker_id=instance_id, model=lambda: engine.info.model if engine.info is not None else fallback_model,
        vllm_source=vllm_metrics_source() if config.engine == "vllm" else None, kv_events=kv_state,
    )
    registry.subscribe(metrics.on_actor_event)
    metrics_actor = MetricsActor(metrics, engine, events, ranks=ranks)
    metrics_actor.install(routes)

    def engine_ready(info: EngineInfo) -> None:
        try:
            metrics.engine_ready(info, ranks)
        except Exception:  # metrics must never take the engine down
            _log.exception("metrics.engine_ready_failed")

    inflight = Inflight()
    pipeline = RequestPipeline(lifecycle, inflight, observer=metrics)
    routes.pipeline = pipeline
    handlers = Handlers(engine, pipeline, role=config.role, enable_lora=bool(config.engine_args.get("enable_lora")))
    mm_role = config.multimodal_role
    if mm_role is not None:
        configure_multimodal(config, handlers, engine, metrics)
    monitor = HealthMonitor(engine, health, interval=config.health_check_interval,
                            timeout=config.health_check_timeout, asleep=lambda: handlers.asleep)
    routes.checks["awake"] = lambda: (not handlers.asleep, "engine asleep (POST /engine/wake_up)")
    routes.details["health"] = lambda: dataclasses.asdict(health)
    # the canary goes through the endpoint's handlers (not for a processor, whose requests need its
    # workers, nor an encode worker, which does not generate)
    if serves_endpoints(config) and mm_role not in (*PROCESSOR_ROLES, "encode_worker"):
        monitor.canary = Canary(handlers, pipeline, wait=config.canary_wait_time,
                                timeout=config.health_check_timeout, payload=config.health_check_payload)
    backend: EngineBackend
    watcher: DiscoveryWatcher | None = None
    if mm_role in PROCESSOR_ROLES:
        backend, watcher = multimodal_chain(config)
    elif mm_role == "encode_worker":
        backend = VisionEncoder(str(engine_args(config)["model"]), config.served_model_name)
    else:
        backend = make_backend(config, metrics.engine_stats)
    children = [
        # first up, last down: /live answers while everything else starts and stops
        ChildSpec("system", system.run, Restart.PERMANENT, shutdown=1.0),
    ]
    if isinstance(events, NatsEventPublisher):  # its connection (what is published queues in the process)
        children.append(ChildSpec("event_plane", events.run, Restart.PERMANENT, shutdown=2.0))
    children += [
        ChildSpec("engine", EngineActor(backend, engine, on_ready=engine_ready).run, Restart.TEMPORARY,
                  shutdown=10.0, significant=True),
        ChildSpec("health", monitor.run, Restart.PERMANENT, shutdown="brutal"),
        ChildSpec("metrics", metrics_actor.run, Restart.PERMANENT, shutdown=1.0),
    ]
    if watcher is not None:  # a processor's view of its workers
        children.append(ChildSpec("watcher", watcher.run, Restart.PERMANENT, shutdown=1.0))
    if kv_state is not None:
        children.append(ChildSpec("kv_events", KvEventsRelay(kv_state, events).run, Restart.PERMANENT, shutdown=1.0))
    registration = Registration()
    endpoint: EndpointServer | None = None
    if serves_endpoints(config):
        if kv_state is not None and config.enable_local_indexer:
            handlers.endpoints["kv_index"] = kv_state.kv_index
        plane = request_plane(config)
        request_host = getattr(config, "request_plane_host", None) or config.system_host
        handlers.card_source = card_source(config)
        if config.use_vllm_tokenizer:
            from actors.text_mode import TextMode

            handlers.text_mode = TextMode(handlers, tokenizer_factory(config))
        advertised = advertise_host(config, request_host)

        def runtime_extra() -> dict[str, Any]:
            info = engine.info
            # the data-parallel ranks this process serves (a router addresses them by dp_rank)
            extra: dict[str, Any] = {"role": config.role, "data_parallel_start_rank": ranks[0],
                                     "data_parallel_size": len(ranks), "endpoint_types": list(config.endpoint_types)}
            if config.sources.get("migration_limit") != "default":  # the worker's own limit wins for its model
                extra["migration_limit"] = config.migration_limit
            if mm_role is not None:  # a frontend routes to processors only; processors to the rest
                extra["multimodal_role"] = mm_role
            if mm_role in PROCESSOR_ROLES:
                extra["input"] = "messages"  # it builds the prompt from the chat messages
            if isinstance(events, ZmqEventPublisher):
                host = events.host if events.host not in ("0.0.0.0", "::") else advertised
                extra["event_plane"] = f"tcp://{host}:{events.port}"
            elif isinstance(events, NatsEventPublisher):
                extra["event_plane"] = "nats"  # the namespace's subjects on the NATS servers
            if info is not None:
                extra["model_card"] = handlers.card_source(info)[0].to_json() if handlers.card_source else None
            return extra

        endpoint = EndpointServer(
            handlers,
            BoundSocket(request_host, getattr(config, "request_plane_port", 0) or 0) if plane != "nats" else None,
            lifecycle,
            pipeline,
            discovery=make_discovery(config),
            namespace=config.namespace,
            component=config.component,
            endpoint=config.endpoint,
            engine=engine,
            registration=registration,
            instance_id=instance_id,
            request_plane=plane,
            nats_servers=nats_servers_for(config),
            advertise_host=advertised,
            runtime_extra=runtime_extra,
        )
        children.append(endpoint.spec())
        handlers.on_sleep, handlers.on_wake = endpoint.suspend, endpoint.resume
        handlers.on_lora_change = endpoint.announce
        routes.add_handler("/engine/sleep", handlers.sleep, ["POST"])
        routes.add_handler("/engine/wake_up", handlers.wake_up, ["POST"])
        if "list_loras" in handlers.endpoints:
            routes.add_handler("/loras", handlers.list_loras, ["GET"])
            routes.add_handler("/loras", handlers.load_lora, ["POST"])
            routes.add_handler("/loras/{lora_name}", handlers.unload_lora, ["DELETE"], payload_from_path="lora_name")
        routes.checks["registered"] = lambda: (registration.registered, "not registered in discovery")
        http_port = getattr(config, "http_port", None)
        if http_port is not None:
            http_host = getattr(config, "http_host", None) or config.system_host
            parsers = ChatParsers(config.tool_call_parser, config.reasoning_parser)
            front = OpenAIServer(BoundSocket(http_host, http_port), WorkerModels(handlers, parsers), pipeline,
                                 tokenizer_factory(config), ready=engine.wait_ready,
                                 endpoint_types=config.endpoint_types, version=engine_version(config))
            children.append(front.spec())
    # Non-engine children may restart often under chaos; a genuinely broken
    # one (crash loop) still escalates: 20 restarts within 1 s.
    root = Supervisor(children, Strategy.ONE_FOR_ONE, intensity=20, period=1.0)
    spec = ChildSpec(ROOT, root.run, shutdown="infinity")
    return Tree(root, spec, registry, lifecycle, system_socket, inflight, pipeline, engine=engine, health=health,
                registration=registration, endpoint=endpoint, metrics=metrics, events=events, kv_events=kv_state)


def build_frontend_tree(config: Config, registry: ActorRegistry, lifecycle: Lifecycle) -> Tree:
    """``--role frontend``: the OpenAI API over every worker discovery knows::

        root
        ├── system    /live /ready /health /metrics (dynamo_frontend_*) /debug/tree
        ├── watcher   discovery -> the instances and their models' cards (tokenizers)
        ├── events    the workers' KV events and load metrics -> the router (kv mode)
        └── http      OpenAI API: route, prefill -> decode, migrate

    The instances, the router (with its KV index) and the in-flight table are owned
    here, above the actors: killing any of them loses nothing.
    """
    system_socket = BoundSocket(config.system_host, config.system_port)
    routes = SystemRoutes()
    # the multimodal processors' own workers are theirs to route to
    instances = Instances(lambda r: r.runtime_config.get("multimodal_role") not in (*ENCODER_ROLES, *GENERATOR_ROLES))
    index = KvIndex()
    router = Router(RouterConfig(mode=config.router_mode, overlap_weight=config.kv_overlap_score_weight,
                                 temperature=config.router_temperature, use_kv_events=config.kv_events,
                                 decode_blocks_threshold=config.active_decode_blocks_threshold,
                                 prefill_tokens_threshold=config.active_prefill_tokens_threshold), index)
    instances.on_removed.append(lambda inst: index.forget(inst.id))
    metrics = FrontendMetrics(instances, router)
    routes.add("/metrics", metrics.metrics_page, ["GET"])
    inflight = Inflight()
    pipeline = RequestPipeline(lifecycle, inflight, observer=metrics)
    routes.pipeline = pipeline
    routes.checks["workers"] = lambda: (any(m.tokenizer is not None for m in instances.models.values()),
                                        "no worker with a loaded model yet")
    routes.details["workers"] = lambda: {i.id: {"model": i.model, "role": i.role, "active_requests":
                                                i.active_requests, "active_blocks": i.active_blocks}
                                         for i in instances.by_id.values()}
    system = SystemServer(system_socket, registry, lifecycle, routes, enable_chaos=config.enable_chaos)
    nats = nats_servers_for(config)
    watcher = DiscoveryWatcher(instances, make_discovery(config), config.namespace, nats_servers=nats)
    backend = FrontendModels(instances, router, metrics, FrontendOptions(
        migration_limit=config.migration_limit, enforce_disagg=config.enforce_disagg, nats_servers=nats))
    http_port = config.http_port if config.http_port is not None else 8000
    http = OpenAIServer(BoundSocket(config.http_host, http_port), backend, pipeline, ByteTokenizer)
    children = [
        ChildSpec("system", system.run, Restart.PERMANENT, shutdown=1.0),
        ChildSpec("watcher", watcher.run, Restart.PERMANENT, shutdown=1.0),
    ]
    if config.router_mode == "kv" and config.kv_events:
        subscriber = EventSubscriber(instances, index, config.namespace, nats_servers=nats,
                                     transport=config.event_plane, durable=config.durable_kv_events)
        children.append(ChildSpec("events", subscriber.run, Restart.PERMANENT, shutdown=1.0))
    children.append(http.spec())
    root = Supervisor(children, Strategy.ONE_FOR_ONE, intensity=20, period=1.0)
    spec = ChildSpec(ROOT, root.run, shutdown="infinity")
    return Tree(root, spec, registry, lifecycle, system_socket, inflight, pipeline, instances=instances)
