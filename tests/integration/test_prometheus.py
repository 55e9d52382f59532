"""The Grafana dashboard and the alert rules, evaluated by a real Prometheus server scraping a real worker.

The server is Prometheus itself (Debian's `prometheus` package; scripts/check-deploy.sh extracts it into
the tools cache, as `make test` and .ci/run do before pytest). It scrapes the worker every second with
the labels a Kubernetes scrape adds (namespace, pod) and loads the shipped alert rules, rewritten into a
temporary file with IngestorConsumerStuck's `for` shortened: the only test-only change.

1. Healthy traffic (good events and a few malformed ones) flows through the worker; every query of every
   dashboard panel is then evaluated through the HTTP API, with the dashboard's variables resolved the
   way Grafana resolves them (label_values queries against the same server). Each must return data: a
   query that returns nothing is a panel showing "No data" on a healthy worker.
2. Stripe stops answering and events keep arriving on a second topic: the worker is stuck, and the real
   server must report IngestorConsumerStuck firing for that topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest
import yaml

from ingestor_dev.devkafka import free_port, produce
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.integration.harness import StripeApi, ensure_topic, running_worker, wait_for, worker_env
from tests.integration.test_pipeline import create_meters, usage

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "ingestor-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
#: Where scripts/check-deploy.sh puts the server it extracts from Debian's package.
TOOLS_BIN = Path(os.environ.get("INGESTOR_TOOLS_CACHE") or "~/.cache/ingestor/tools").expanduser() / "bin"
SCRAPE_INTERVAL = "1s"
#: What Grafana's $__rate_interval becomes for a 1 s scrape over a short time range, with margin.
RATE_INTERVAL = "20s"
STUCK_ALERT = "IngestorConsumerStuck"
STUCK_FOR = "3s"
NAMESPACE, POD = "billing", "ingestor-0"
READY_TIMEOUT_S = 30.0


def prometheus_binary() -> str:
    for candidate in (os.environ.get("INGESTOR_PROMETHEUS"), str(TOOLS_BIN / "prometheus"), shutil.which("prometheus")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "the Prometheus server is missing: run `bash scripts/check-deploy.sh --tools-only` (as root, once) "
        "or `apt-get install prometheus`, or set INGESTOR_PROMETHEUS"
    )


def rules_with_short_for(target: Path) -> None:
    """The shipped rules, unchanged but for the stuck alert's `for` (the file in the repo is not touched)."""
    rules = yaml.safe_load(ALERTS.read_text())
    found = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == STUCK_ALERT]
    assert len(found) == 1, f"{STUCK_ALERT} must be defined once in {ALERTS}"
    found[0]["for"] = STUCK_FOR
    target.write_text(yaml.safe_dump(rules, sort_keys=False))


class Prometheus:
    """A Prometheus server on 127.0.0.1 with its own config, rules and storage in a temporary directory."""

    def __init__(self, directory: Path, worker_port: int) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rules_with_short_for(directory / "rules.yaml")
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(directory / "rules.yaml")],
            "scrape_configs": [
                {
                    "job_name": "ingestor",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{worker_port}"], "labels": {"namespace": NAMESPACE, "pod": POD}}
                    ],
                }
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = directory / "prometheus.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            prometheus_binary(),
            f"--config.file={self.directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)

    async def get(self, path: str, **params: str) -> Any:
        async with aiohttp.ClientSession() as http, http.get(self.url + path, params=params) as resp:
            body = await resp.read()
            assert resp.status == 200, f"{path} {params}: {resp.status} {body[:500]!r}"
            answer = orjson.loads(body)
            assert answer["status"] == "success", answer
            return answer["data"]

    async def ready(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self._process.returncode}: {self.log.read_text()[-2000:]}")
        with contextlib.suppress(aiohttp.ClientError):
            async with aiohttp.ClientSession() as http, http.get(self.url + "/-/ready") as resp:
                return resp.status == 200
        return False

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def label_values(self, label: str, match: str) -> list[str]:
        values: list[str] = await self.get(f"/api/v1/label/{label}/values", **{"match[]": match})
        return values

    async def firing(self, alert: str) -> list[dict[str, Any]]:
        alerts = (await self.get("/api/v1/alerts"))["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == alert and a["state"] == "firing"]


@contextlib.asynccontextmanager
async def prometheus(directory: Path, worker_port: int) -> AsyncIterator[Prometheus]:
    server = Prometheus(directory, worker_port)
    server.start()
    try:
        await wait_for(server.ready, READY_TIMEOUT_S, "prometheus to be ready")
        yield server
    finally:
        await asyncio.to_thread(server.stop)


def dashboard_queries() -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, expression) for every query of every panel, rows included."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    for panel in panels + [p for row in panels for p in row.get("panels", [])]:
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel["title"], target.get("refId", "?"), target["expr"]


async def resolve_variables(server: Prometheus) -> dict[str, str]:
    """$namespace and $pod as Grafana fills them from the dashboard's label_values queries (all selected)."""
    templating = json.loads(DASHBOARD.read_text())["templating"]["list"]
    values: dict[str, str] = {}
    for variable in templating:
        if variable["type"] != "query":
            continue
        found = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert found, f"unexpected variable query {variable['definition']!r}"
        match = substitute(found.group(1), values)
        options = await server.label_values(found.group(2), match)
        assert options, f"variable ${variable['name']} has no values ({variable['definition']})"
        values[variable["name"]] = "(" + "|".join(map(grafana_escape, options)) + ")"
    return values


def grafana_escape(value: str) -> str:
    """A label value as Grafana writes it into a regular expression inside a PromQL string literal."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def substitute(expr: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        expr = expr.replace(f"${name}", value)
    return expr.replace("$__rate_interval", RATE_INTERVAL)


async def produce_steadily(bootstrap: str, topic: str, values: list[bytes], stop: asyncio.Event) -> None:
    """A few events every 200 ms, with a malformed record now and then, until `stop` (bounded by `values`)."""
    for start in range(0, len(values), 20):
        if stop.is_set():
            return
        await produce(bootstrap, topic, [*values[start : start + 20], b"{malformed"])
        await asyncio.sleep(0.2)


@pytest.mark.timeout(240)
async def test_dashboard_queries_return_data_and_the_stuck_alert_fires(kafka_bootstrap, topic_factory, tmp_path):
    healthy = await topic_factory(2, "prom")
    stuck = await topic_factory(1, "prom-stuck")
    values, _ = usage(20_000, seed=5)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        await create_meters(api)
        env = worker_env(
            kafka_bootstrap,
            f"{healthy},{stuck}",
            emu.url,
            INGESTOR_DLQ_TOPIC=f"{healthy}.dlq",
            INGESTOR_STUCK_AFTER_S="2",
            INGESTOR_RETRY_DEADLINE_S="0",  # retry forever: a stuck event is never dead-lettered
        )
        await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        async with running_worker(env) as worker, prometheus(tmp_path, worker.metrics_port) as server:
            stop = asyncio.Event()
            traffic = asyncio.create_task(produce_steadily(kafka_bootstrap, healthy, values, stop))
            try:
                await assert_every_panel_has_data(server)
            finally:
                stop.set()
                await traffic
            await assert_stuck_alert_fires(server, api, kafka_bootstrap, stuck)


async def assert_every_panel_has_data(server: Prometheus) -> None:
    async def scraped_with_traffic() -> bool:
        delivered = await server.query(f"sum(rate(ingestor_events_delivered_total[{RATE_INTERVAL}])) > 0")
        dead = await server.query(f"sum(rate(ingestor_events_dead_lettered_total[{RATE_INTERVAL}])) > 0")
        return bool(delivered and dead)

    await wait_for(scraped_with_traffic, 60, "prometheus to see deliveries and dead letters")
    variables = await resolve_variables(server)
    assert variables == {"namespace": f"({NAMESPACE})", "pod": f"({POD})"}
    queries = list(dashboard_queries())
    assert len(queries) >= 40, "the dashboard lost its queries?"
    empty = []
    for title, ref, expr in queries:
        if not await server.query(substitute(expr, variables)):
            empty.append(f"{title} [{ref}]: {expr}")
    assert not empty, "panels with no data on a healthy worker:\n" + "\n".join(empty)


async def assert_stuck_alert_fires(server: Prometheus, api: StripeApi, bootstrap: str, topic: str) -> None:
    assert not await server.firing(STUCK_ALERT)
    # Stripe stops answering (its control endpoint too; it comes back by itself after 40 s, and the
    # worker delivers the backlog); events keep arriving on `topic`, which has never delivered anything.
    await api.set_faults(refuse_connections=True, refuse_for_s=40)
    values, _ = usage(50, seed=6)
    await produce(bootstrap, topic, values)

    async def fired() -> bool:
        return bool(await server.firing(STUCK_ALERT))

    await wait_for(fired, 35, f"{STUCK_ALERT} to fire in prometheus", step=0.5)
    [alert] = await server.firing(STUCK_ALERT)
    assert alert["labels"]["topic"] == topic
    assert alert["labels"]["namespace"] == NAMESPACE
    assert alert["labels"]["severity"] == "critical"
    assert float(alert["value"]) == len(values)
