"""What SREs see: JSON logs, and the HTTP endpoints /metrics, /healthz and /readyz.

Health tells the truth about progress, not just liveness of the event loop:

- `/readyz` fails until the consumer has joined its group and a session token was obtained, while Kafka
  does not answer a metadata request (probed every 5 s) or no session token is valid (Stripe unreachable),
  whenever lag exists but nothing was delivered or committed for INGESTOR_STUCK_AFTER_S, and while one
  partition's commit has not moved for INGESTOR_STUCK_AFTER_S with records pending (the others may flow).
- `/healthz` fails when the worker is wedged: lag exists and nothing was delivered or committed for
  twice INGESTOR_STUCK_AFTER_S (a restart may help), or the main loop stopped.

Every site (these endpoints and the webhook) is served by `start_site`, whose server logs through
`ingestor.http`: a request that is not valid HTTP is answered 400 by aiohttp and logged there as one
warning line, not as aiohttp's error with a traceback (the webhook port faces the internet).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingestor.timefmt import format_ms

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from ingestor.metrics import Metrics

_REFUSAL_CHARS = 200


class MalformedRequestFilter(logging.Filter):
    """Turns aiohttp's "Error handling request" for a request that is not valid HTTP (answered 400) into
    one warning line naming the client and the problem; any other error keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "malformed HTTP request from %s refused with %d: %s"
            record.args = (remote, exc.code or 400, " ".join(str(exc.message).split())[:_REFUSAL_CHARS])
            record.exc_info = None
            record.exc_text = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


#: The logger of every HTTP server the worker runs (see `MalformedRequestFilter`).
http_log = logging.getLogger("ingestor.http")
http_log.addFilter(MalformedRequestFilter())

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra=` context."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": format_ms(int(record.created) * 1000 + int(record.msecs)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_"))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))


@dataclass
class HealthState:
    """Facts the worker keeps current; the endpoints judge them."""

    stuck_after: float
    #: monotonic seconds (a `Clock`'s `monotonic`)
    monotonic: Callable[[], float] = time.monotonic
    joined: bool = False
    stripe_ok: bool = False
    kafka_ok: bool = True
    running: bool = True
    last_progress: float = field(default_factory=time.monotonic)
    lag: Callable[[], int] = lambda: 0
    #: the partition stalled longest ("topic/partition", seconds), or None
    stalled_partition: Callable[[], tuple[str, float] | None] = lambda: None

    def progressed(self) -> None:
        self.last_progress = self.monotonic()

    def progress_age(self) -> float:
        return self.monotonic() - self.last_progress

    lag_since: float | None = None

    def stuck_for(self) -> float:
        """Seconds without progress while lag existed (0 when there is no lag): counted from the later of
        the last progress and the moment lag appeared, so an idle worker is not stuck when traffic resumes."""
        if self.lag() <= 0:
            self.lag_since = None
            return 0.0
        now = self.monotonic()
        if self.lag_since is None:
            self.lag_since = now
        return now - max(self.last_progress, self.lag_since)

    def readiness(self) -> tuple[bool, str]:
        for failing, reason in self._readiness_checks():
            if failing:
                return False, reason
        return True, "ok"

    def _readiness_checks(self) -> Iterator[tuple[bool, str]]:
        """(failing, why) for each condition in order; evaluated lazily, first failure wins."""
        yield not self.running, "stopping"
        yield not self.joined, "not a member of the consumer group yet"
        yield not self.kafka_ok, "Kafka unreachable"
        yield not self.stripe_ok, "no valid Stripe session"
        stalled = self.stalled_partition()  # before the worker-wide check: it names the partition
        if stalled is not None:
            name, seconds = stalled
            yield seconds >= self.stuck_after, f"partition {name} has records pending and no commit for {seconds:.0f}s"
        stuck = self.stuck_for()
        yield stuck >= self.stuck_after, f"lag but no delivery or commit for {stuck:.0f}s"

    def liveness(self) -> tuple[bool, str]:
        if self.stuck_for() >= 2 * self.stuck_after:
            return False, f"wedged: lag but no delivery or commit for {self.stuck_for():.0f}s"
        return True, "ok"


def http_app(metrics: Metrics, health: HealthState) -> web.Application:
    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def judge(check: Callable[[], tuple[bool, str]]) -> Callable[[web.Request], Any]:
        async def handler(_: web.Request) -> web.Response:
            ok, reason = check()
            return web.json_response({"ok": ok, "reason": reason}, status=200 if ok else 503)

        return handler

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", judge(health.liveness))
    app.router.add_get("/readyz", judge(health.readiness))
    return app


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app`; return the runner (to clean up) and the bound port."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=http_log)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # noqa: SLF001 - the only way to learn an ephemeral port
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
