"""`gqtok serve --engine ray`: the same FastAPI app as a Ray Serve deployment, past one machine.

Each replica builds the app itself (serve.ingress with a builder: models load on the replica, not in the driver)
and runs its lifespan, so a replica is exactly one `gqtok serve` process: its own runtime, batcher, limits,
/health, /metrics. Ray Serve's proxy on every node takes HTTP on --host/--port and routes each request to a
replica; replicas are Ray actors, restarted by Ray when they die. With --max-replicas, Ray Serve autoscales on
requests in flight per replica (the same count the service's own in-flight limit admits).
"""

from __future__ import annotations

import logging
import signal
import threading

from gqtok.service.app import create_app
from gqtok.service.settings import ServiceSettings

log = logging.getLogger("gqtok.ray")
APP_NAME = "gqtok"
# Requests in flight per replica that autoscaling aims at: a CPU replica answers one tokenize at a time per
# core; two keep it busy without letting a queue build up on it.
TARGET_ONGOING_REQUESTS = 2


def autoscales(settings: ServiceSettings) -> bool:
    return bool(settings.max_replicas and settings.max_replicas > settings.replicas)


def deployment(settings: ServiceSettings):
    """The Ray Serve deployment of the tokenizer app for these settings (bind() it to run it)."""
    from ray import serve

    def build_app():  # runs on each replica
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return create_app(settings)

    @serve.ingress(build_app)
    class TokenizerReplica:
        def check_health(self) -> None:
            """Ray Serve's health check: a replica whose models stopped being ready is replaced. (_asgi_app is where
            Ray Serve's ingress wrapper keeps the built app: a private name; renamed, every replica turns unhealthy.)"""
            state = self._asgi_app.state.service
            if state.models and not all(m.ready for m in state.models.values()):
                raise RuntimeError("a model is not ready")

    scaling = ({"autoscaling_config": {"min_replicas": settings.replicas, "max_replicas": settings.max_replicas,
                                       "target_ongoing_requests": TARGET_ONGOING_REQUESTS}}
               if autoscales(settings) else {"num_replicas": settings.replicas})
    return serve.deployment(TokenizerReplica, name="tokenizer",
                            ray_actor_options={"num_cpus": max(1, settings.threads)},
                            max_ongoing_requests=settings.max_concurrent_requests,
                            health_check_period_s=2, graceful_shutdown_timeout_s=settings.drain_timeout_s,
                            **scaling)


def serve_on_ray(settings: ServiceSettings) -> None:
    """Join (or start) a Ray cluster, deploy the app, serve HTTP until SIGTERM or SIGINT, then shut it down."""
    import ray
    from ray import serve

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ray.init(address=settings.ray_address, logging_level=logging.WARNING, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(deployment(settings).bind(), name=APP_NAME, route_prefix="/")
    log.info("serving on Ray at http://%s:%d: %s", settings.host, settings.port,
             f"{settings.replicas}-{settings.max_replicas} replicas (autoscaling)" if autoscales(settings)
             else f"{settings.replicas} replica(s)")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down: draining the replicas for up to %g s", settings.drain_timeout_s)
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
