"""Every knob of the worker, read once from the environment and validated at start.

A bad value stops start-up with a `SettingsError` naming the variable. `SETTINGS` is the single
declaration of every variable: the README table and `ingestor run --help` are generated from it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

#: Stripe's documented caps.
STRIPE_MAX_EVENTS_PER_REQUEST = 100
LIVE_MODE_STREAM_RPS = 10_000
SANDBOX_BASIC_RPS = 25

DEFAULT_STRIPE_API_BASE = "https://api.stripe.com"
DEFAULT_STRIPE_METER_EVENTS_BASE = "https://meter-events.stripe.com"
DEFAULT_STRIPE_VERSION = "2026-06-24.dahlia"


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


@dataclass(frozen=True)
class Var:
    """One environment variable: its name, default (as text, None = required) and meaning."""

    env: str
    field: str
    default: str | None
    help: str
    parse: Callable[[str, str], Any]


def _str(name: str, raw: str) -> str:
    del name
    return raw.strip()


def _ranged(convert: Callable[[str], Any], what: str, lo: float, hi: float | None) -> Callable[[str, str], Any]:
    """A parser for a number in [lo, hi] (NaN fails the comparison, so it is refused too)."""

    def parse(name: str, raw: str) -> Any:
        text = raw.strip()
        try:
            value = convert(text)
        except ValueError:
            raise SettingsError(f"{name} must be {what}, got {raw!r}") from None
        if not (value >= lo and (hi is None or value <= hi)):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise SettingsError(f"{name} must be {bound}, got {text}")
        return value

    return parse


def _int_range(lo: int, hi: int | None = None) -> Callable[[str, str], int]:
    return _ranged(int, "an integer", lo, hi)


def _float_range(lo: float, hi: float | None = None) -> Callable[[str, str], float]:
    return _ranged(float, "a number", lo, hi)


def _bool(name: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _choice(*options: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip()
        if value not in options:
            raise SettingsError(f"{name} must be one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def _csv(name: str, raw: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not items:
        raise SettingsError(f"{name} must list at least one value")
    return items


def _url(name: str, raw: str) -> str:
    value = raw.strip().rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise SettingsError(f"{name} must be an http(s) URL, got {raw!r}")
    return value


#: An identifier namespace: the characters of a Kafka cluster id, no `.` (it ends the namespace in an
#: identifier), short enough that a derived identifier stays within 100 characters.
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,32}", re.ASCII)


def _namespace(name: str, raw: str) -> str:
    value = raw.strip()
    if value and _NAMESPACE.fullmatch(value) is None:
        raise SettingsError(f"{name} must be 1 to 32 characters of A-Z, a-z, 0-9, '_' and '-', got {raw!r}")
    return value


def _optional_int(lo: int) -> Callable[[str, str], int | None]:
    inner = _int_range(lo)

    def parse(name: str, raw: str) -> int | None:
        return None if raw.strip() in {"", "auto"} else inner(name, raw)

    return parse


SETTINGS: tuple[Var, ...] = (
    # Kafka
    Var(
        "KAFKA_BOOTSTRAP_SERVERS",
        "bootstrap_servers",
        None,
        "Kafka bootstrap servers, comma-separated.",
        _str,
    ),
    Var("INGESTOR_TOPICS", "topics", None, "Topics of usage events to consume, comma-separated.", _csv),
    Var("INGESTOR_GROUP_ID", "group_id", "ingestor", "Kafka consumer group id.", _str),
    Var(
        "INGESTOR_DLQ_TOPIC",
        "dlq_topic",
        "ingestor.dlq",
        "Dead-letter topic for events that cannot be billed.",
        _str,
    ),
    Var(
        "INGESTOR_ERROR_REPORT_TOPIC",
        "error_report_topic",
        "",
        "Topic for identifiers Stripe reports as failed after accepting them (webhooks); empty: the DLQ topic.",
        _str,
    ),
    Var("KAFKA_CLIENT_ID", "client_id", "ingestor", "Kafka client id.", _str),
    Var(
        "INGESTOR_AUTO_OFFSET_RESET",
        "auto_offset_reset",
        "safe",
        "Where a partition with no committed offset starts: safe (earliest, but refuse to start when it holds "
        "records older than 23 hours, which would be billed again), earliest (bill its history) or latest "
        "(skip it).",
        _choice("safe", "earliest", "latest"),
    ),
    Var(
        "INGESTOR_IDENTIFIER_NAMESPACE",
        "identifier_namespace",
        "",
        "Namespace of derived identifiers (kafka-NAMESPACE.TOPIC-PARTITION-OFFSET), unique per Kafka cluster; "
        "empty: the cluster id.",
        _namespace,
    ),
    Var(
        "KAFKA_SECURITY_PROTOCOL",
        "security_protocol",
        "PLAINTEXT",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
        _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    ),
    Var(
        "KAFKA_SASL_MECHANISM",
        "sasl_mechanism",
        "PLAIN",
        "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.",
        _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
    ),
    Var("KAFKA_SASL_USERNAME", "sasl_username", "", "SASL user name.", _str),
    Var("KAFKA_SASL_PASSWORD", "sasl_password", "", "SASL password (prefer KAFKA_SASL_PASSWORD_FILE).", _str),
    Var("KAFKA_SASL_PASSWORD_FILE", "sasl_password_file", "", "File holding the SASL password.", _str),
    Var("KAFKA_SSL_CAFILE", "ssl_cafile", "", "CA bundle to verify the brokers (SSL, SASL_SSL).", _str),
    Var("KAFKA_SSL_CERTFILE", "ssl_certfile", "", "Client certificate for mutual TLS.", _str),
    Var("KAFKA_SSL_KEYFILE", "ssl_keyfile", "", "Client private key for mutual TLS.", _str),
    Var("KAFKA_SSL_CHECK_HOSTNAME", "ssl_check_hostname", "true", "Verify the brokers' host names.", _bool),
    # Stripe
    Var("STRIPE_API_KEY", "api_key", "", "Stripe secret or restricted key (prefer STRIPE_API_KEY_FILE).", _str),
    Var("STRIPE_API_KEY_FILE", "api_key_file", "", "File holding the Stripe key (a mounted Secret).", _str),
    Var("INGESTOR_STRIPE_API_BASE", "stripe_api_base", DEFAULT_STRIPE_API_BASE, "Stripe API base URL.", _url),
    Var(
        "INGESTOR_STRIPE_METER_EVENTS_BASE",
        "stripe_meter_events_base",
        DEFAULT_STRIPE_METER_EVENTS_BASE,
        "Base URL of the meter event stream host.",
        _url,
    ),
    Var(
        "INGESTOR_STRIPE_VERSION",
        "stripe_version",
        DEFAULT_STRIPE_VERSION,
        "Stripe-Version header sent.",
        _str,
    ),
    Var(
        "INGESTOR_RPS_BUDGET",
        "rps_budget",
        "auto",
        "Stream requests/s for the whole account, shared by all replicas. auto: 10000 for live keys, 25 for test keys.",
        _optional_int(1),
    ),
    Var(
        "INGESTOR_BUDGET_HEADROOM",
        "budget_headroom",
        "0.03",
        "Fraction of the budget left unused as a safety margin.",
        _float_range(0.0, 0.5),
    ),
    Var(
        "INGESTOR_SESSION_REFRESH_MARGIN_S",
        "session_refresh_margin_s",
        "60",
        "Rotate the session token this long before it expires (at most 20% of its lifetime).",
        _float_range(0.0),
    ),
    Var(
        "INGESTOR_METER_CATALOG",
        "meter_catalog",
        "stripe",
        "Where payload keys per event_name come from: stripe (GET /v1/billing/meters), static (INGESTOR_METERS), "
        "off (stripe_customer_id/value for every event).",
        _choice("stripe", "static", "off"),
    ),
    Var(
        "INGESTOR_METERS",
        "meters",
        "",
        'Static meter catalog, JSON: {"event_name": {"customer_key": "...", "value_key": "..."}}.',
        _str,
    ),
    Var(
        "INGESTOR_METER_REFRESH_S",
        "meter_refresh_s",
        "300",
        "How often the catalog is re-read from Stripe.",
        _float_range(1.0),
    ),
    # Batching and delivery
    Var(
        "INGESTOR_BATCH_MAX_EVENTS",
        "batch_max_events",
        "100",
        "Events per stream request (Stripe allows up to 100).",
        _int_range(1, STRIPE_MAX_EVENTS_PER_REQUEST),
    ),
    Var(
        "INGESTOR_BATCH_MAX_BYTES",
        "batch_max_bytes",
        "524288",
        "Upper bound on a request body's size.",
        _int_range(1024),
    ),
    Var(
        "INGESTOR_LINGER_MS",
        "linger_ms",
        "50",
        "How long a partial batch waits for more events.",
        _int_range(0, 10_000),
    ),
    Var(
        "INGESTOR_MAX_IN_FLIGHT",
        "max_in_flight",
        "64",
        "Stream requests in flight at once.",
        _int_range(1, 4096),
    ),
    Var(
        "INGESTOR_MAX_BUFFERED_EVENTS",
        "max_buffered_events",
        "50000",
        "Consumed but not yet done events above which partitions are paused.",
        _int_range(100),
    ),
    Var(
        "INGESTOR_MAX_PARTITION_AHEAD",
        "max_partition_ahead",
        "50000",
        "Records a partition may run ahead of its oldest unfinished record before that partition alone is "
        "paused (bounds what a restart would resend).",
        _int_range(100),
    ),
    Var(
        "INGESTOR_FETCH_MAX_RECORDS",
        "fetch_max_records",
        "10000",
        "Records taken from the consumer per poll.",
        _int_range(1),
    ),
    Var(
        "INGESTOR_MAX_RECORD_BYTES",
        "max_record_bytes",
        "65536",
        "Record values larger than this are dead-lettered (record_too_large).",
        _int_range(64),
    ),
    Var(
        "INGESTOR_REQUEST_TIMEOUT_S",
        "request_timeout_s",
        "10",
        "Timeout of one HTTP request to Stripe.",
        _float_range(0.1),
    ),
    Var(
        "INGESTOR_RETRY_BASE_S",
        "retry_base_s",
        "0.5",
        "First retry backoff (exponential, full jitter).",
        _float_range(0.001),
    ),
    Var("INGESTOR_RETRY_MAX_S", "retry_max_s", "30", "Cap of the retry backoff.", _float_range(0.001)),
    Var(
        "INGESTOR_RETRY_DEADLINE_S",
        "retry_deadline_s",
        "0",
        "Dead-letter an event (retries_exhausted) once it has been retried this long; 0: retry transient "
        "failures forever (they alert instead).",
        _float_range(0.0),
    ),
    Var(
        "INGESTOR_DLQ_TRANSACTIONAL",
        "dlq_transactional",
        "true",
        "Write dead-letter records and commit the offsets past them in one Kafka transaction per partition "
        "(exactly once for read_committed readers); false: an idempotent producer (at least once).",
        _bool,
    ),
    # Offsets, shutdown, health
    Var(
        "INGESTOR_COMMIT_INTERVAL_MS",
        "commit_interval_ms",
        "1000",
        "How often done offsets are committed.",
        _int_range(10),
    ),
    Var(
        "INGESTOR_DRAIN_TIMEOUT_S",
        "drain_timeout_s",
        "25",
        "On SIGTERM or revoke: how long in-flight work may finish. Keep below terminationGracePeriodSeconds.",
        _float_range(0.0),
    ),
    Var(
        "INGESTOR_STUCK_AFTER_S",
        "stuck_after_s",
        "120",
        "With lag and no delivery or commit for this long, /readyz fails; after twice as long /healthz fails.",
        _float_range(1.0),
    ),
    # HTTP endpoints and logs
    Var("INGESTOR_METRICS_HOST", "metrics_host", "0.0.0.0", "Address of /metrics, /healthz, /readyz.", _str),  # noqa: S104
    Var(
        "INGESTOR_METRICS_PORT",
        "metrics_port",
        "9464",
        "Port of /metrics, /healthz, /readyz (0: any free port).",
        _int_range(0, 65535),
    ),
    Var(
        "INGESTOR_WEBHOOK_PORT",
        "webhook_port",
        "0",
        "Port of the Stripe webhook endpoint POST /webhooks/stripe; 0: disabled.",
        _int_range(0, 65535),
    ),
    Var("STRIPE_WEBHOOK_SECRET", "webhook_secret", "", "Webhook signing secret (whsec_...).", _str),
    Var(
        "STRIPE_WEBHOOK_SECRET_FILE",
        "webhook_secret_file",
        "",
        "File holding the webhook signing secret.",
        _str,
    ),
    Var(
        "INGESTOR_WEBHOOK_TOLERANCE_S",
        "webhook_tolerance_s",
        "300",
        "Oldest Stripe-Signature timestamp accepted.",
        _float_range(1.0),
    ),
    Var(
        "INGESTOR_LOG_LEVEL",
        "log_level",
        "INFO",
        "DEBUG, INFO, WARNING or ERROR.",
        _choice("DEBUG", "INFO", "WARNING", "ERROR"),
    ),
    Var("INGESTOR_LOG_FORMAT", "log_format", "json", "json or text.", _choice("json", "text")),
)


@dataclass(frozen=True)
class Settings:
    bootstrap_servers: str
    topics: tuple[str, ...]
    group_id: str
    dlq_topic: str
    error_report_topic: str
    client_id: str
    auto_offset_reset: str
    identifier_namespace: str
    security_protocol: str
    sasl_mechanism: str
    sasl_username: str
    sasl_password: str
    sasl_password_file: str
    ssl_cafile: str
    ssl_certfile: str
    ssl_keyfile: str
    ssl_check_hostname: bool
    api_key: str
    api_key_file: str
    stripe_api_base: str
    stripe_meter_events_base: str
    stripe_version: str
    rps_budget: int | None
    budget_headroom: float
    session_refresh_margin_s: float
    meter_catalog: str
    meters: str
    meter_refresh_s: float
    batch_max_events: int
    batch_max_bytes: int
    linger_ms: int
    max_in_flight: int
    max_buffered_events: int
    max_partition_ahead: int
    fetch_max_records: int
    max_record_bytes: int
    request_timeout_s: float
    retry_base_s: float
    retry_max_s: float
    retry_deadline_s: float
    dlq_transactional: bool
    commit_interval_ms: int
    drain_timeout_s: float
    stuck_after_s: float
    metrics_host: str
    metrics_port: int
    webhook_port: int
    webhook_secret: str
    webhook_secret_file: str
    webhook_tolerance_s: float
    log_level: str
    log_format: str

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _SECRET_FIELDS}
        return f"Settings({shown})"

    @property
    def livemode(self) -> bool:
        return self.api_key.startswith(("sk_live_", "rk_live_"))

    @property
    def effective_rps_budget(self) -> int:
        if self.rps_budget is not None:
            return self.rps_budget
        return LIVE_MODE_STREAM_RPS if self.livemode else SANDBOX_BASIC_RPS

    @property
    def effective_error_report_topic(self) -> str:
        return self.error_report_topic or self.dlq_topic

    @property
    def kafka(self) -> KafkaConnection:
        return KafkaConnection(**{f.name: getattr(self, f.name) for f in fields(KafkaConnection)})

    def kafka_security(self) -> dict[str, Any]:
        """aiokafka keyword arguments for TLS and SASL."""
        return self.kafka.security_options()


@dataclass(frozen=True)
class KafkaConnection:
    """How to reach Kafka: the `KAFKA_*` settings."""

    bootstrap_servers: str
    client_id: str = "ingestor"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    sasl_password_file: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_check_hostname: bool = True

    def security_options(self) -> dict[str, Any]:
        """aiokafka keyword arguments for TLS and SASL."""
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        if "SSL" in self.security_protocol:
            from aiokafka.helpers import create_ssl_context  # noqa: PLC0415 - only with TLS

            context = create_ssl_context(
                cafile=self.ssl_cafile or None, certfile=self.ssl_certfile or None, keyfile=self.ssl_keyfile or None
            )
            context.check_hostname = self.ssl_check_hostname
            options["ssl_context"] = context
        if self.security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        return options

    def client_options(self) -> dict[str, Any]:
        """aiokafka keyword arguments: servers, client id, TLS and SASL."""
        return {"bootstrap_servers": self.bootstrap_servers, "client_id": self.client_id, **self.security_options()}


_SECRET_FIELDS = frozenset({"api_key", "sasl_password", "webhook_secret"})
_KEY_PREFIXES = ("sk_live_", "sk_test_", "rk_live_", "rk_test_")


def _read_secret_file(env: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"{env}: cannot read {path}: {exc.strerror}") from None


def _resolve_secrets(values: dict[str, Any]) -> None:
    pairs = (
        ("api_key", "api_key_file", "STRIPE_API_KEY_FILE"),
        ("sasl_password", "sasl_password_file", "KAFKA_SASL_PASSWORD_FILE"),
        ("webhook_secret", "webhook_secret_file", "STRIPE_WEBHOOK_SECRET_FILE"),
    )
    for value_field, file_field, env in pairs:
        if values[file_field] and not values[value_field]:
            values[value_field] = _read_secret_file(env, values[file_field])


def _check(values: dict[str, Any]) -> None:
    key = values["api_key"]
    if not key:
        raise SettingsError("STRIPE_API_KEY or STRIPE_API_KEY_FILE must be set")
    if not key.startswith(_KEY_PREFIXES):
        raise SettingsError("STRIPE_API_KEY must be a Stripe secret or restricted key (sk_... or rk_...)")
    if values["security_protocol"].startswith("SASL") and not values["sasl_username"]:
        raise SettingsError("KAFKA_SASL_USERNAME must be set with KAFKA_SECURITY_PROTOCOL=SASL_*")
    if values["meter_catalog"] == "static" and not values["meters"]:
        raise SettingsError("INGESTOR_METERS must be set with INGESTOR_METER_CATALOG=static")
    if values["webhook_port"] and not values["webhook_secret"]:
        raise SettingsError(
            "STRIPE_WEBHOOK_SECRET or STRIPE_WEBHOOK_SECRET_FILE must be set with INGESTOR_WEBHOOK_PORT"
        )
    if values["retry_max_s"] < values["retry_base_s"]:
        raise SettingsError("INGESTOR_RETRY_MAX_S must be at least INGESTOR_RETRY_BASE_S")
    if values["dlq_topic"] in values["topics"]:
        raise SettingsError("INGESTOR_DLQ_TOPIC must not be one of INGESTOR_TOPICS")


def _value(var: Var, environ: Mapping[str, str], override: str | None = None) -> Any:
    """One variable's parsed value: `override`, else the environment, else its default."""
    raw = override or environ.get(var.env)
    if raw is None or (raw.strip() == "" and var.default is not None):
        if var.default is None:
            raise SettingsError(f"{var.env} must be set: {var.help}")
        raw = var.default
    return var.parse(var.env, raw) if raw != "" else ""


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read every setting from `environ` (default: the process environment) or raise SettingsError."""
    env = os.environ if environ is None else environ
    values = {var.field: _value(var, env) for var in SETTINGS}
    _resolve_secrets(values)
    _check(values)
    return Settings(**values)


def load_kafka(environ: Mapping[str, str] | None = None, *, bootstrap_servers: str | None = None) -> KafkaConnection:
    """Only the `KAFKA_*` settings (for tools such as `ingestor dlq replay` that need no Stripe key)."""
    env = os.environ if environ is None else environ
    values = {
        var.field: _value(var, env, bootstrap_servers if var.field == "bootstrap_servers" else None)
        for var in SETTINGS
        if var.env.startswith("KAFKA_")
    }
    if values["sasl_password_file"] and not values["sasl_password"]:
        values["sasl_password"] = _read_secret_file("KAFKA_SASL_PASSWORD_FILE", values["sasl_password_file"])
    if values["security_protocol"].startswith("SASL") and not values["sasl_username"]:
        raise SettingsError("KAFKA_SASL_USERNAME must be set with KAFKA_SECURITY_PROTOCOL=SASL_*")
    return KafkaConnection(**values)


def describe() -> str:
    """The settings as text, for `ingestor run --help`."""
    lines = []
    for var in SETTINGS:
        default = "(required)" if var.default is None else f"(default: {var.default or 'empty'})"
        lines.append(f"  {var.env} {default}\n      {var.help}")
    return "\n".join(lines)


def markdown_table() -> str:
    """The settings as a Markdown table, for the README."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for var in SETTINGS:
        default = "required" if var.default is None else (f"`{var.default}`" if var.default else "empty")
        rows.append(f"| `{var.env}` | {default} | {var.help} |")
    return "\n".join(rows)


Mode = Literal["live", "test"]
