"""Start-up fails fast and clearly: `ingestor run` as a process, exit code 2 and one line naming the variable.

And a signal during start-up ends it cleanly (exit 0, no traceback), as does Ctrl-C once running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import web

from ingestor import settings as settings_mod
from ingestor.worker import Worker
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.integration.harness import API_KEY, ensure_topic, worker_env

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from tests.conftest import TopicFactory

#: Each case waits at most this long for the process (a bounded wait, not a timing assertion).
PROCESS_LIMIT_S = 60.0


async def start_run(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    """`ingestor run ARGS` with exactly `env` (and PATH/HOME), its output (stderr too) on a pipe."""
    full = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), **env}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingestor", "run", *args, env=full, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """`ingestor run ARGS` with exactly `env` (and PATH/HOME): its exit code and its output."""
    proc = await start_run(env, *args)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), PROCESS_LIMIT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def assert_one_clear_line(code: int, output: str, *names: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("ingestor: configuration error:")]
    assert len(errors) == 1, output
    for name in names:
        assert name in errors[0], output


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def signal_after(env: dict[str, str], marker: str, signum: signal.Signals) -> tuple[int, list[str], str]:
    """`ingestor run` with exactly `env` (and PATH/HOME), sent `signum` once a line holding `marker` is logged:
    its exit code, the lines before that one, and the rest of its output."""
    proc = await start_run(env)
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(PROCESS_LIMIT_S):
            while marker not in (line := (await proc.stdout.readline()).decode()):
                assert line, "".join(seen)  # the process ended before it logged the marker
                seen.append(line)
            proc.send_signal(signum)
            rest, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, seen, rest.decode()


@contextlib.contextmanager
def listening_socket() -> Iterator[socket.socket]:
    """A port in use: a socket listening on it that never accepts (a request to it hangs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


def offline_env(**overrides: str) -> dict[str, str]:
    """Settings that pass validation; nothing listens at the addresses they name."""
    env = worker_env(f"127.0.0.1:{closed_port()}", "events", f"http://127.0.0.1:{closed_port()}")
    env.update(overrides)
    return env


# --- settings found wrong before anything is contacted (no broker needed) --------------------------------


@pytest.mark.parametrize("check_config", [False, True], ids=["run", "check-config"])
async def test_static_catalog_that_is_not_json_stops_start_up(check_config: bool) -> None:
    env = offline_env(INGESTOR_METER_CATALOG="static", INGESTOR_METERS="not json")
    code, output = await run_cli(env, *(["--check-config"] if check_config else []))
    assert_one_clear_line(code, output, "INGESTOR_METERS", "not valid JSON")


@pytest.mark.parametrize("variable", ["INGESTOR_TOPICS", "KAFKA_BOOTSTRAP_SERVERS"])
@pytest.mark.parametrize("check_config", [False, True], ids=["run", "check-config"])
async def test_a_required_variable_set_empty_stops_start_up(variable: str, check_config: bool) -> None:
    code, output = await run_cli(offline_env(**{variable: " "}), *(["--check-config"] if check_config else []))
    assert_one_clear_line(code, output, variable, "must be set (it is empty)")


async def test_metrics_port_in_use_stops_start_up() -> None:
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        code, output = await run_cli(offline_env(INGESTOR_METRICS_PORT=str(port)))
    assert_one_clear_line(code, output, "INGESTOR_METRICS_PORT", f"127.0.0.1:{port}")


async def test_check_config_with_a_missing_key_file_names_it() -> None:
    env = offline_env(STRIPE_API_KEY="", STRIPE_API_KEY_FILE="/nonexistent/stripe-key")
    code, output = await run_cli(env, "--check-config")
    assert_one_clear_line(code, output, "STRIPE_API_KEY_FILE", "/nonexistent/stripe-key")


# --- a signal during start-up ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_during_start_up_exits_cleanly(signum: signal.Signals) -> None:
    # Stripe accepts the connection and never answers: start-up waits on the first session.
    with listening_socket() as stripe:
        url = f"http://127.0.0.1:{stripe.getsockname()[1]}"
        env = offline_env(INGESTOR_STRIPE_API_BASE=url, INGESTOR_REQUEST_TIMEOUT_S="100", INGESTOR_LOG_FORMAT="text")
        code, seen, rest = await signal_after(env, "serving", signum)
    output = "".join(seen) + rest
    assert code == 0, output
    assert "Traceback" not in output
    assert "KeyboardInterrupt" not in output
    assert "stopped during start-up" in output


# --- with the real broker and the emulator --------------------------------------------------------------


@contextlib.asynccontextmanager
async def emulator(**config: object) -> AsyncIterator[Emulator]:
    async with Emulator(EmulatorConfig(**config), host="127.0.0.1", port=0) as emu:  # type: ignore[arg-type]
        yield emu


@pytest.mark.kafka
async def test_a_key_stripe_refuses_stops_start_up_without_showing_it(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    wrong = "sk_test_wrongKey0123456789abcdefXYZ"
    topic = await topic_factory()
    async with emulator(api_keys=(API_KEY,)) as emu:
        env = worker_env(kafka_bootstrap, topic, emu.url, STRIPE_API_KEY=wrong)
        await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        code, output = await run_cli(env)
    assert_one_clear_line(code, output, "STRIPE_API_KEY/STRIPE_API_KEY_FILE", "401")
    assert wrong not in output
    assert wrong[8:20] not in output


@pytest.mark.kafka
async def test_webhook_port_in_use_stops_start_up(kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = await topic_factory()
    async with emulator() as emu:
        with listening_socket() as taken:
            port = taken.getsockname()[1]
            env = worker_env(
                kafka_bootstrap, topic, emu.url, INGESTOR_WEBHOOK_PORT=str(port), STRIPE_WEBHOOK_SECRET="whsec_test"
            )
            await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
            code, output = await run_cli(env)
    assert_one_clear_line(code, output, "INGESTOR_WEBHOOK_PORT", f"127.0.0.1:{port}")


@pytest.mark.kafka
async def test_ctrl_c_once_running_drains_and_exits_cleanly_and_the_served_address_is_logged(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory()
    async with emulator() as emu:
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_LOG_FORMAT="text")
        await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        code, seen, rest = await signal_after(env, "worker started", signal.SIGINT)
    output = "".join(seen) + rest
    assert code == 0, output
    assert "Traceback" not in output
    assert "worker stopped" in output
    # INGESTOR_METRICS_PORT=0: the port chosen is in the log, and it is the one that served.
    serving = next(line for line in seen if "serving" in line)
    assert "http://127.0.0.1:" in serving
    assert ":0 " not in serving


# --- the catalog read at start (in-process: a fake Stripe whose key may create sessions, not read meters) --


async def test_a_key_refused_on_the_catalog_read_stops_start_up() -> None:
    async def session(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "id": "mes_1",
                "object": "v2.billing.meter_event_session",
                "authentication_token": "token_1",
                "created": "2026-01-01T00:00:00.000Z",
                "expires_at": "2026-01-01T00:15:00.000Z",
                "livemode": False,
            }
        )

    async def meters(_: web.Request) -> web.Response:
        error = {"type": "invalid_request_error", "message": "The provided key does not have the permission"}
        return web.json_response({"error": error}, status=403)

    app = web.Application()
    app.router.add_post("/v2/billing/meter_event_session", session)
    app.router.add_get("/v1/billing/meters", meters)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        env = offline_env(INGESTOR_STRIPE_API_BASE=f"http://127.0.0.1:{port}")
        worker = Worker(settings_mod.load(env))
        with pytest.raises(
            settings_mod.SettingsError, match=r"STRIPE_API_KEY/STRIPE_API_KEY_FILE.*HTTP 403.*catalog"
        ) as caught:
            async with worker:
                pass
        assert env["STRIPE_API_KEY"] not in str(caught.value)
    finally:
        await runner.cleanup()
    async with aiohttp.ClientSession() as http:  # the worker's HTTP server was closed on the way out
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://127.0.0.1:{worker.metrics_port}/metrics")
