"""Running the app under uvicorn with a graceful drain.

On SIGTERM or SIGINT the server stops taking work (new requests get 503
shutting_down, health probes still answer), waits until in-flight requests
have finished, then lets uvicorn close. The whole shutdown fits in
`drain_timeout_s`: the wait for in-flight requests ends CLOSING_S before it,
and uvicorn then gets CUT_S to cancel what is left (a slow upload) before the
models stop. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

from gqtok.service.app import create_app
from gqtok.service.settings import ServiceSettings
from gqtok.service.state import ServiceState

log = logging.getLogger("gqtok.server")
CUT_S = 2.0  # uvicorn's graceful-shutdown timeout: what is still running after the drain is cancelled
CLOSING_S = 4.0  # the drain's wait ends this long before drain_timeout_s: CUT_S, then the batchers' last calls


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServiceState, drain_timeout_s: float):
        super().__init__(config)
        self.app_state, self.drain_timeout_s = state, drain_timeout_s

    def handle_exit(self, sig, frame) -> None:
        if self.app_state.draining:  # second signal: stop now
            return super().handle_exit(sig, frame)
        self.app_state.draining = True
        log.info("draining: %d request(s) in flight", self.app_state.inflight)
        asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + max(0.0, self.drain_timeout_s - CLOSING_S)
        while self.app_state.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.app_state.inflight:
            log.warning("drain timeout: %d request(s) still running", self.app_state.inflight)
        self.should_exit = True


def serve(settings: ServiceSettings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=CUT_S, access_log=False)
    # uvicorn installs handle_exit for SIGINT and SIGTERM; ours drains first.
    DrainingServer(config, app.state.service, settings.drain_timeout_s).run()
