"""The emulator server: one aiohttp low-level `web.Server`, a route table, faults, background work.

Connections start on the fast path (`fastpath.StreamProtocol`), which serves plain stream requests
itself while no fault is set and hands the connection to the aiohttp server on anything else.

Usable in-process::

    async with Emulator(EmulatorConfig(session_ttl=3.0), host="127.0.0.1", port=0) as emu:
        emu.url, emu.state, emu.set_faults(error_retry_true=0.5), await emu.stats()

Every unexpected exception becomes a Stripe `api_error` 500 without a traceback (and is logged).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Self

from aiohttp import web

from ingestor_dev.emulator.arrival import ARRIVAL_HEADER, arrival_time, is_loopback
from ingestor_dev.emulator.config import EmulatorConfig
from ingestor_dev.emulator.context import Call, Context
from ingestor_dev.emulator.errors import ApiError, rate_limited, server_error
from ingestor_dev.emulator.fastpath import FastPath
from ingestor_dev.emulator.faults import NO_DECISION, Decision, FaultPlanner, Faults, Outcome
from ingestor_dev.emulator.ids import IdFactory
from ingestor_dev.emulator.listener import Listener
from ingestor_dev.emulator.responses import error_response
from ingestor_dev.emulator.routes import Route, Router
from ingestor_dev.emulator.state import EmulatorState
from ingestor_dev.emulator.stats import RESET
from ingestor_dev.emulator.webhooks import WebhookSender
from ingestor_dev.emulator.windows import FixedWindowLimiter

if TYPE_CHECKING:
    from types import TracebackType

    from ingestor_dev.emulator.config import Clock

logger = logging.getLogger(__name__)

UNMATCHED = "<unmatched>"
SHUTDOWN_GRACE_S = 0.5


class Emulator:
    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.time,
    ) -> None:
        self.config = config or EmulatorConfig()
        self._clock = clock
        ids = IdFactory(self.config.seed)
        self.state = EmulatorState(self.config, clock, ids)
        self._planner = FaultPlanner(self.config.faults, self.config.seed)
        self._ctx = Context(self.config, self.state, clock, self._planner, FixedWindowLimiter(), self)
        self._router = Router()
        self._web = web.Server(self._handle, access_log=None)
        #: serves plain stream requests without aiohttp (its `connections` are those not handed over)
        self.fast_path = FastPath(self._ctx, self._web)
        self._listener = Listener(self.fast_path, host, port)
        self._host = host
        self._tasks: set[asyncio.Task[None]] = set()
        self._webhooks: WebhookSender | None = None
        self._refuse_timer: asyncio.TimerHandle | None = None
        self._started = False
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self._listener.start()
        self._spawn(self._validate_forever())
        config = self.config
        if config.webhook_url and config.webhook_secret:
            self._webhooks = WebhookSender(
                config.webhook_url, config.webhook_secret, self._clock, self.state.ids, self.state
            )
            self.state.report_listeners.append(self._webhooks.enqueue)
            self._spawn(self._webhooks.run())
        if config.faults.active:
            self._planner.set(Faults())
            self.set_faults(config.faults)

    async def stop(self) -> None:
        """Stop listening, close connections, stop background work. Safe to call twice."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        if self._refuse_timer is not None:
            self._refuse_timer.cancel()
        await self._listener.close()
        self.fast_path.close()
        await self._web.shutdown(SHUTDOWN_GRACE_S)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _validate_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.validation_interval)
            self.state.flush()

    # -- the in-process API ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def faults(self) -> Faults:
        return self._planner.faults

    def set_faults(self, faults: Faults | None = None, /, **changes: Any) -> Faults:
        """Replace the faults (`set_faults(Faults(...))`) or change some (`set_faults(latency_s=0.1)`).

        `set_faults()` with nothing switches every fault off. Takes effect at once; the port comes
        back (listening) before this returns when `refuse_connections` is switched off.
        """
        if faults is None:
            faults = dataclasses.replace(self._planner.faults, **changes) if changes else Faults()
        previous = self._planner.faults
        self._planner.set(faults)
        if faults.refuse_connections and not previous.refuse_connections:
            self._listener.pause()
            if faults.refuse_for_s:
                loop = asyncio.get_running_loop()
                self._refuse_timer = loop.call_later(faults.refuse_for_s, self._stop_refusing)
        elif previous.refuse_connections and not faults.refuse_connections:
            if self._refuse_timer is not None:
                self._refuse_timer.cancel()
                self._refuse_timer = None
            self._listener.resume()
        return faults

    def _stop_refusing(self) -> None:
        self._refuse_timer = None
        if not self._stopped:
            self.set_faults(refuse_connections=False)

    async def settle(self) -> None:
        """Wait until a reopened listening socket is served by the loop."""
        await self._listener.settle()

    async def stats(self) -> dict[str, Any]:
        return self.state.stats_json()

    async def wait_webhooks(self) -> None:
        """Flush validation and wait until every resulting webhook was delivered."""
        self.state.flush()
        if self._webhooks is not None:
            await self._webhooks.drain()

    def revoke_sessions(self, token: str | None = None) -> int:
        return self.state.sessions.revoke(token)

    # -- dispatch -------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # raw_path avoids decoding a URL object per request; no route needs percent-decoding
        route, params = self._router.match(request.method, request.raw_path.partition("?")[0])
        if route is None:
            self.state.stats.count_request(UNMATCHED, 404)
            return error_response(_unrecognized(request))
        arrival = None
        if route.is_stream:
            arrival = self._arrival(request)
            self.state.stats.stream_window.add(self._clock() if arrival is None else arrival)
        if not route.control and self._planner.faults.refuse_connections:
            return self._abort(request)
        decision = NO_DECISION if route.control else self._planner.decide(route.is_stream, route.is_session)
        try:
            response = await self._run(route, Call(request, params, decision.latency_s, arrival), decision)
        except ApiError as error:
            response = error_response(error)
        except Exception:
            logger.exception("emulator: unexpected error handling %s %s", request.method, route.name)
            response = error_response(ApiError(500, None, "An unknown error occurred.", type="api_error"))
        if request.transport is None or request.transport.is_closing():
            self.state.stats.count_request(route.name, RESET)
        else:
            self.state.stats.count_request(route.name, response.status)
        return response

    def _arrival(self, request: web.BaseRequest) -> float | None:
        """The wire tap's arrival time of a stream request, when trusted (see `arrival`)."""
        if not self.config.trust_arrival_header:
            return None
        value = request.headers.get(ARRIVAL_HEADER)
        transport = request.transport
        if value is None or transport is None or not is_loopback(transport.get_extra_info("peername")):
            return None
        return arrival_time(value, self._clock())

    async def _run(self, route: Route, call: Call, decision: Decision) -> web.StreamResponse:
        outcome = decision.outcome
        if outcome is not Outcome.NONE:
            self.state.stats.faults_injected += 1
            early = self._early_fault(outcome)
            if early is not None:
                await call.serve_latency()
                raise early
            if outcome is Outcome.RESET_BEFORE:
                await call.serve_latency()
                return self._abort(call.request)
        if not route.latency_inside:
            await call.serve_latency()
        try:
            response = await route.handler(self._ctx, call)
        finally:
            await call.serve_latency()
        if outcome is Outcome.SLOW:
            await asyncio.sleep(self._planner.faults.slow_response_s)
        elif outcome is Outcome.RESET_AFTER:
            return self._abort(call.request)
        return response

    def _early_fault(self, outcome: Outcome) -> ApiError | None:
        faults = self._planner.faults
        errors = {
            Outcome.ERROR_RETRY_TRUE: lambda: server_error(faults.error_status, "true"),
            Outcome.ERROR_RETRY_FALSE: lambda: server_error(faults.error_status, "false"),
            Outcome.ERROR_NO_HEADER: lambda: server_error(faults.error_status, None),
            Outcome.RATE_LIMIT: lambda: rate_limited(faults.rate_limit_reason),
            Outcome.LOCK_TIMEOUT: lambda: rate_limited(None, code="lock_timeout"),
        }
        make = errors.get(outcome)
        return make() if make is not None else None

    @staticmethod
    def _abort(request: web.BaseRequest) -> web.StreamResponse:
        """Drop the connection without an answer (the response object is never written)."""
        transport = request.transport
        if transport is not None:
            transport.abort()
        return web.Response(status=499)


def _unrecognized(request: web.BaseRequest) -> ApiError:
    return ApiError(404, None, f"Unrecognized request URL ({request.method}: {request.path}).")
