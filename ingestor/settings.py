"""Every knob of the worker, declared once, read once from the environment and validated at start.

Each setting is one field of `KafkaConnection` (the `KAFKA_*` variables) or of `Settings` (which extends
it), declared with `setting(...)` or `secret(...)`: the field's type is the parsed value's type (mypy
checks the parser against it), and its metadata (a `Var`) carries the environment variable, its default
as text, the parser that validates it and its help. Everything else is derived from those fields:

- `load` and `load_kafka` read the variables of their class (`declared_variables`); a bad value stops
  start-up with a `SettingsError` naming the variable;
- a `secret(...)` is masked in `repr` and in `ingestor run --check-config`, and read from its
  `<VARIABLE>_FILE` variable (a mounted Secret) when it is empty;
- `SETTINGS` (every variable, in field order) feeds `ingestor run --help`, the README table
  (`markdown_table`), the `--check-config` report and the Helm chart's tests.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from dataclasses import Field

    from _typeshed import DataclassInstance

#: Stripe's documented caps.
STRIPE_MAX_EVENTS_PER_REQUEST = 100
LIVE_MODE_STREAM_RPS = 10_000
SANDBOX_BASIC_RPS = 25
#: Stripe's documented basic limit for ordinary API endpoints (adjustments, meter reads) in live mode.
LIVE_MODE_API_RPS = 100

DEFAULT_STRIPE_API_BASE = "https://api.stripe.com"
DEFAULT_STRIPE_METER_EVENTS_BASE = "https://meter-events.stripe.com"
DEFAULT_STRIPE_VERSION = "2026-06-24.dahlia"

#: The prefixes of a Stripe secret or restricted key (the only part of a key ever shown).
KEY_PREFIXES = ("sk_live_", "sk_test_", "rk_live_", "rk_test_")

Mode = Literal["live", "test"]

T = TypeVar("T")
N = TypeVar("N", int, float)
C = TypeVar("C", bound="KafkaConnection")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


def _str(name: str, raw: str) -> str:
    del name
    return raw.strip()


def _ranged(convert: Callable[[str], N], what: str, lo: N, hi: N | None) -> Callable[[str, str], N]:
    """A parser for a number in [lo, hi] (NaN fails the comparison, so it is refused too)."""

    def parse(name: str, raw: str) -> N:
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


def _topic_or_off(name: str, raw: str) -> str:
    """A topic name, or "off" (returned as "")."""
    value = raw.strip()
    return "" if value == "off" else _str(name, value)


def _optional_int(lo: int) -> Callable[[str, str], int | None]:
    inner = _int_range(lo)

    def parse(name: str, raw: str) -> int | None:
        return None if raw.strip() in {"", "auto"} else inner(name, raw)

    return parse


@dataclass(frozen=True)
class Var(Generic[T]):
    """One environment variable: its name, default (as text, None = required), parser and meaning.

    `unset_means` says what an empty, 0 or `auto` value resolves to and `shown_prefixes` which prefixes
    of a secret may be shown (for `--check-config`); `field` is the name of the dataclass field that
    declares it (filled in by `declared_variables`).
    """

    env: str
    default: str | None
    parse: Callable[[str, str], T]
    help: str
    secret: bool = False
    unset_means: Callable[[Settings], str] | None = None
    shown_prefixes: tuple[str, ...] = ()
    field: str = ""

    @property
    def file_env(self) -> str:
        """The variable naming a file that holds this secret."""
        return f"{self.env}_FILE"


_VAR = "ingestor.setting"


def setting(
    env: str,
    default: str | None,
    parse: Callable[[str, str], T],
    meaning: str,
    *,
    unset_means: Callable[[Settings], str] | None = None,
) -> T:
    """A dataclass field read from `env`; its default is `default` parsed (None: the variable is required)."""
    return _field(Var(env, default, parse, meaning, unset_means=unset_means))


def secret(env: str, meaning: str, *, shown_prefixes: tuple[str, ...] = ()) -> str:
    """A secret: empty by default, read from `<env>_FILE` when empty, never shown (repr, --check-config).

    A value that starts with one of `shown_prefixes` shows that prefix, as a Stripe key shows its kind and
    mode (`sk_test_****`); nothing else of it is ever shown.
    """
    return _field(Var(env, "", _str, meaning, secret=True, shown_prefixes=shown_prefixes))


def _field(var: Var[T]) -> T:
    metadata = {_VAR: var}
    if var.default is None:
        return cast("T", field(repr=not var.secret, metadata=metadata))
    return field(default=var.parse(var.env, var.default), repr=not var.secret, metadata=metadata)


@dataclass(frozen=True)
class KafkaConnection:
    """How to reach Kafka: the `KAFKA_*` settings."""

    bootstrap_servers: str = setting("KAFKA_BOOTSTRAP_SERVERS", None, _str, "Kafka bootstrap servers, comma-separated.")
    client_id: str = setting("KAFKA_CLIENT_ID", "ingestor", _str, "Kafka client id.")
    security_protocol: str = setting(
        "KAFKA_SECURITY_PROTOCOL",
        "PLAINTEXT",
        _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
    )
    sasl_mechanism: str = setting(
        "KAFKA_SASL_MECHANISM",
        "PLAIN",
        _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
        "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.",
    )
    sasl_username: str = setting("KAFKA_SASL_USERNAME", "", _str, "SASL user name.")
    sasl_password: str = secret("KAFKA_SASL_PASSWORD", "SASL password (prefer KAFKA_SASL_PASSWORD_FILE).")
    sasl_password_file: str = setting("KAFKA_SASL_PASSWORD_FILE", "", _str, "File holding the SASL password.")
    ssl_cafile: str = setting("KAFKA_SSL_CAFILE", "", _str, "CA bundle to verify the brokers (SSL, SASL_SSL).")
    ssl_certfile: str = setting("KAFKA_SSL_CERTFILE", "", _str, "Client certificate for mutual TLS.")
    ssl_keyfile: str = setting("KAFKA_SSL_KEYFILE", "", _str, "Client private key for mutual TLS.")
    ssl_check_hostname: bool = setting("KAFKA_SSL_CHECK_HOSTNAME", "true", _bool, "Verify the brokers' host names.")

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


@dataclass(frozen=True, kw_only=True)
class Settings(KafkaConnection):
    """Every setting of the worker: the Kafka connection's, then the worker's own."""

    # Kafka topics and identifiers
    topics: tuple[str, ...] = setting(
        "INGESTOR_TOPICS", None, _csv, "Topics of usage events to consume, comma-separated."
    )
    group_id: str = setting("INGESTOR_GROUP_ID", "ingestor", _str, "Kafka consumer group id.")
    dlq_topic: str = setting(
        "INGESTOR_DLQ_TOPIC", "ingestor.dlq", _str, "Dead-letter topic for events that cannot be billed."
    )
    error_report_topic: str = setting(
        "INGESTOR_ERROR_REPORT_TOPIC",
        "",
        _str,
        "Topic for identifiers Stripe reports as failed after accepting them (webhooks); empty: the DLQ topic.",
        unset_means=lambda s: f"{s.effective_error_report_topic} (the dead-letter topic)",
    )
    auto_offset_reset: str = setting(
        "INGESTOR_AUTO_OFFSET_RESET",
        "safe",
        _choice("safe", "earliest", "latest"),
        "Where a partition with no committed offset starts: safe (earliest, but refuse to start when it holds "
        "records older than 23 hours, which would be billed again), earliest (bill its history) or latest "
        "(skip it).",
    )
    identifier_namespace: str = setting(
        "INGESTOR_IDENTIFIER_NAMESPACE",
        "",
        _namespace,
        "Namespace of derived identifiers (kafka-NAMESPACE.TOPIC-PARTITION-OFFSET), unique per Kafka cluster; "
        "empty: the cluster id.",
        unset_means=lambda _: "the Kafka cluster's id (read at start)",
    )
    # Stripe
    api_key: str = secret(
        "STRIPE_API_KEY", "Stripe secret or restricted key (prefer STRIPE_API_KEY_FILE).", shown_prefixes=KEY_PREFIXES
    )
    api_key_file: str = setting("STRIPE_API_KEY_FILE", "", _str, "File holding the Stripe key (a mounted Secret).")
    stripe_api_base: str = setting("INGESTOR_STRIPE_API_BASE", DEFAULT_STRIPE_API_BASE, _url, "Stripe API base URL.")
    stripe_meter_events_base: str = setting(
        "INGESTOR_STRIPE_METER_EVENTS_BASE",
        DEFAULT_STRIPE_METER_EVENTS_BASE,
        _url,
        "Base URL of the meter event stream host.",
    )
    stripe_version: str = setting(
        "INGESTOR_STRIPE_VERSION", DEFAULT_STRIPE_VERSION, _str, "Stripe-Version header sent."
    )
    rps_budget: int | None = setting(
        "INGESTOR_RPS_BUDGET",
        "auto",
        _optional_int(1),
        "Stream requests/s for the whole account, shared by all replicas. auto: 10000 for live keys, 25 for test keys.",
        unset_means=lambda s: f"{s.effective_rps_budget} (a {s.key_mode} key)",
    )
    budget_headroom: float = setting(
        "INGESTOR_BUDGET_HEADROOM",
        "0.03",
        _float_range(0.0, 0.5),
        "Fraction of the budget left unused as a safety margin.",
    )
    budget_topic: str = setting(
        "INGESTOR_BUDGET_TOPIC",
        "ingestor.budget",
        _topic_or_off,
        "Compacted topic where replicas publish their demand to share the budget by demand (created when"
        " missing, one partition; records keyed by consumer group); off: share by owned partitions instead.",
    )
    budget_exchange_interval_s: float = setting(
        "INGESTOR_BUDGET_EXCHANGE_INTERVAL_S",
        "0.5",
        _float_range(0.1, 5.0),
        "How often each replica publishes its demand; a raise waits 4 intervals, a silent replica expires after 10.",
    )
    session_refresh_margin_s: float = setting(
        "INGESTOR_SESSION_REFRESH_MARGIN_S",
        "60",
        _float_range(0.0),
        "Rotate the session token this long before it expires (at most 20% of its lifetime).",
    )
    meter_catalog: str = setting(
        "INGESTOR_METER_CATALOG",
        "stripe",
        _choice("stripe", "static", "off"),
        "Where payload keys per event_name come from: stripe (GET /v1/billing/meters), static (INGESTOR_METERS), "
        "off (stripe_customer_id/value for every event).",
    )
    meters: str = setting(
        "INGESTOR_METERS",
        "",
        _str,
        'Static meter catalog, JSON: {"event_name": {"customer_key": "...", "value_key": "..."}}.',
    )
    meter_refresh_s: float = setting(
        "INGESTOR_METER_REFRESH_S", "300", _float_range(1.0), "How often the catalog is re-read from Stripe."
    )
    # Batching and delivery
    batch_max_events: int = setting(
        "INGESTOR_BATCH_MAX_EVENTS",
        "100",
        _int_range(1, STRIPE_MAX_EVENTS_PER_REQUEST),
        "Events per stream request (Stripe allows up to 100).",
    )
    batch_max_bytes: int = setting(
        "INGESTOR_BATCH_MAX_BYTES", "524288", _int_range(1024), "Upper bound on a request body's size."
    )
    linger_ms: int = setting(
        "INGESTOR_LINGER_MS", "50", _int_range(0, 10_000), "How long a partial batch waits for more events."
    )
    max_in_flight: int = setting(
        "INGESTOR_MAX_IN_FLIGHT", "64", _int_range(1, 4096), "Stream requests in flight at once."
    )
    max_buffered_events: int = setting(
        "INGESTOR_MAX_BUFFERED_EVENTS",
        "50000",
        _int_range(100),
        "Consumed but not yet done events above which partitions are paused.",
    )
    max_partition_ahead: int = setting(
        "INGESTOR_MAX_PARTITION_AHEAD",
        "50000",
        _int_range(100),
        "Records a partition may run ahead of its oldest unfinished record before that partition alone is "
        "paused (bounds what a restart would resend).",
    )
    fetch_max_records: int = setting(
        "INGESTOR_FETCH_MAX_RECORDS", "10000", _int_range(1), "Records taken from the consumer per poll."
    )
    max_record_bytes: int = setting(
        "INGESTOR_MAX_RECORD_BYTES",
        "65536",
        _int_range(64),
        "Record values larger than this are dead-lettered (record_too_large).",
    )
    request_timeout_s: float = setting(
        "INGESTOR_REQUEST_TIMEOUT_S", "10", _float_range(0.1), "Timeout of one HTTP request to Stripe."
    )
    retry_base_s: float = setting(
        "INGESTOR_RETRY_BASE_S", "0.5", _float_range(0.001), "First retry backoff (exponential, full jitter)."
    )
    retry_max_s: float = setting("INGESTOR_RETRY_MAX_S", "30", _float_range(0.001), "Cap of the retry backoff.")
    retry_deadline_s: float = setting(
        "INGESTOR_RETRY_DEADLINE_S",
        "0",
        _float_range(0.0),
        "Dead-letter an event (retries_exhausted) once it has been retried this long; 0: retry transient "
        "failures forever (they alert instead).",
    )
    dlq_transactional: bool = setting(
        "INGESTOR_DLQ_TRANSACTIONAL",
        "true",
        _bool,
        "Write dead-letter records and commit the offsets past them in one Kafka transaction per partition "
        "(exactly once for read_committed readers); false: an idempotent producer (at least once).",
    )
    # Cancellations (meter event adjustments) and other ordinary API calls
    api_rps: int | None = setting(
        "INGESTOR_API_RPS",
        "auto",
        _optional_int(1),
        "Requests/s to Stripe's ordinary API endpoints (cancellations; meter reads by ingestor audit), per "
        "process. auto: 100 for live keys, 25 for test keys (Stripe's documented basic limits; in a sandbox "
        "the 25/s is shared with stream requests).",
        unset_means=lambda s: f"{s.effective_api_rps} (a {s.key_mode} key)",
    )
    adjustment_retry_base_s: float = setting(
        "INGESTOR_ADJUSTMENT_RETRY_BASE_S",
        "0.5",
        _float_range(0.001),
        "First retry backoff of a cancellation (exponential, full jitter; Stripe's SDKs use 0.5).",
    )
    adjustment_retry_max_s: float = setting(
        "INGESTOR_ADJUSTMENT_RETRY_MAX_S",
        "5",
        _float_range(0.001),
        "Cap of a cancellation's retry backoff (Stripe's SDKs use 5).",
    )
    # Offsets, shutdown, health
    commit_interval_ms: int = setting(
        "INGESTOR_COMMIT_INTERVAL_MS", "1000", _int_range(10), "How often done offsets are committed."
    )
    drain_timeout_s: float = setting(
        "INGESTOR_DRAIN_TIMEOUT_S",
        "25",
        _float_range(0.0),
        "On SIGTERM or revoke: how long in-flight work may finish. Keep below terminationGracePeriodSeconds.",
    )
    stuck_after_s: float = setting(
        "INGESTOR_STUCK_AFTER_S",
        "120",
        _float_range(1.0),
        "With lag and no delivery or commit for this long, /readyz fails; after twice as long /healthz fails.",
    )
    # HTTP endpoints and logs
    metrics_host: str = setting(
        "INGESTOR_METRICS_HOST",
        "0.0.0.0",  # noqa: S104 - the pod's address, for Prometheus and the probes
        _str,
        "Address of /metrics, /healthz, /readyz.",
    )
    metrics_port: int = setting(
        "INGESTOR_METRICS_PORT",
        "9464",
        _int_range(0, 65535),
        "Port of /metrics, /healthz, /readyz (0: any free port).",
        unset_means=lambda _: "any free port (logged at start)",
    )
    webhook_port: int = setting(
        "INGESTOR_WEBHOOK_PORT",
        "0",
        _int_range(0, 65535),
        "Port of the Stripe webhook endpoint POST /webhooks/stripe; 0: disabled.",
        unset_means=lambda _: "disabled",
    )
    webhook_secret: str = secret("STRIPE_WEBHOOK_SECRET", "Webhook signing secret (whsec_...).")
    webhook_secret_file: str = setting(
        "STRIPE_WEBHOOK_SECRET_FILE", "", _str, "File holding the webhook signing secret."
    )
    webhook_tolerance_s: float = setting(
        "INGESTOR_WEBHOOK_TOLERANCE_S", "300", _float_range(1.0), "Oldest Stripe-Signature timestamp accepted."
    )
    log_level: str = setting(
        "INGESTOR_LOG_LEVEL",
        "INFO",
        _choice("DEBUG", "INFO", "WARNING", "ERROR"),
        "DEBUG, INFO, WARNING or ERROR.",
    )
    log_format: str = setting("INGESTOR_LOG_FORMAT", "json", _choice("json", "text"), "json or text.")

    @property
    def livemode(self) -> bool:
        return self.api_key.startswith(("sk_live_", "rk_live_"))

    @property
    def key_mode(self) -> Mode:
        return "live" if self.livemode else "test"

    @property
    def effective_rps_budget(self) -> int:
        if self.rps_budget is not None:
            return self.rps_budget
        return LIVE_MODE_STREAM_RPS if self.livemode else SANDBOX_BASIC_RPS

    @property
    def effective_api_rps(self) -> int:
        if self.api_rps is not None:
            return self.api_rps
        return LIVE_MODE_API_RPS if self.livemode else SANDBOX_BASIC_RPS

    @property
    def effective_error_report_topic(self) -> str:
        return self.error_report_topic or self.dlq_topic

    @property
    def kafka(self) -> KafkaConnection:
        return KafkaConnection(**{f.name: getattr(self, f.name) for f in fields(KafkaConnection)})

    def kafka_security(self) -> dict[str, Any]:
        """aiokafka keyword arguments for TLS and SASL."""
        return self.security_options()


def declared_variables(cls: type[DataclassInstance]) -> tuple[Var[Any], ...]:
    """The variables of a settings class, in field order.

    TypeError (at import, for `Settings`) when a field was not declared with `setting` or `secret`, when
    two fields claim one variable, or when a secret has no `<VARIABLE>_FILE` field beside it.
    """
    variables = tuple(_declared(f) for f in fields(cls))
    names = [var.env for var in variables]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise TypeError(f"{cls.__name__}: more than one field reads {', '.join(twice)}")
    if lonely := [var.env for var in variables if var.secret and var.file_env not in names]:
        raise TypeError(f"{cls.__name__}: no {'/'.join(f'{env}_FILE' for env in lonely)} field beside the secret")
    return variables


def _declared(f: Field[Any]) -> Var[Any]:
    var = f.metadata.get(_VAR)
    if not isinstance(var, Var) or not var.env.strip() or not var.help.strip():
        raise TypeError(f"field {f.name} has no variable name and help: declare it with setting() or secret()")
    return replace(var, field=f.name)


SETTINGS: tuple[Var[Any], ...] = declared_variables(Settings)


def _value(var: Var[T], environ: Mapping[str, str]) -> T:
    """One variable's parsed value: the environment's, else its default."""
    raw = environ.get(var.env)
    if raw is None or raw.strip() == "":
        if var.default is None:  # a required variable set to "" is as good as missing
            state = "missing" if raw is None else "empty"
            raise SettingsError(f"{var.env} must be set (it is {state}): {var.help}")
        raw = var.default
    return var.parse(var.env, raw)


def _read(cls: type[C], environ: Mapping[str, str]) -> C:
    """An instance of a settings class from `environ`, each secret read from its file when empty."""
    variables = declared_variables(cls)
    values = {var.field: _value(var, environ) for var in variables}
    _read_secret_files(values, variables)
    return cls(**values)


def _read_secret_files(values: dict[str, Any], variables: Sequence[Var[Any]]) -> None:
    """Every empty secret whose `<VARIABLE>_FILE` is set gets that file's content (a mounted Secret)."""
    by_name = {var.env: var for var in variables}
    for var in variables:
        file_var = by_name[var.file_env] if var.secret else None
        if file_var is not None and values[file_var.field] and not values[var.field]:
            values[var.field] = _read_secret_file(file_var.env, values[file_var.field])


def _read_secret_file(env: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"{env}: cannot read {path}: {exc.strerror}") from None


def _check(s: Settings) -> None:
    """The rules between variables, in the order they are reported."""
    _check_key(s.api_key)
    _check_kafka(s)
    if s.meter_catalog == "static":
        _check_static_meters(s.meters)
    refusals = (
        (
            bool(s.webhook_port and not s.webhook_secret),
            "STRIPE_WEBHOOK_SECRET or STRIPE_WEBHOOK_SECRET_FILE must be set with INGESTOR_WEBHOOK_PORT",
        ),
        (s.retry_max_s < s.retry_base_s, "INGESTOR_RETRY_MAX_S must be at least INGESTOR_RETRY_BASE_S"),
        (
            s.adjustment_retry_max_s < s.adjustment_retry_base_s,
            "INGESTOR_ADJUSTMENT_RETRY_MAX_S must be at least INGESTOR_ADJUSTMENT_RETRY_BASE_S",
        ),
        (s.dlq_topic in s.topics, "INGESTOR_DLQ_TOPIC must not be one of INGESTOR_TOPICS"),
        (
            bool(s.budget_topic) and s.budget_topic in {*s.topics, s.dlq_topic},
            "INGESTOR_BUDGET_TOPIC must differ from INGESTOR_TOPICS and INGESTOR_DLQ_TOPIC",
        ),
    )
    for refused, message in refusals:
        if refused:
            raise SettingsError(message)


def _check_key(key: str) -> None:
    if not key:
        raise SettingsError("STRIPE_API_KEY or STRIPE_API_KEY_FILE must be set")
    if not key.startswith(KEY_PREFIXES):
        raise SettingsError("STRIPE_API_KEY must be a Stripe secret or restricted key (sk_... or rk_...)")


def _check_kafka(connection: KafkaConnection) -> None:
    """The one rule between `KAFKA_*` variables (checked by `load` and `load_kafka` alike)."""
    if connection.security_protocol.startswith("SASL") and not connection.sasl_username:
        raise SettingsError("KAFKA_SASL_USERNAME must be set with KAFKA_SECURITY_PROTOCOL=SASL_*")


def _check_static_meters(text: str) -> None:
    """INGESTOR_METERS must parse when it is the catalog: found here, not by the worker once running."""
    if not text:
        raise SettingsError("INGESTOR_METERS must be set with INGESTOR_METER_CATALOG=static")
    from ingestor import catalog  # noqa: PLC0415 - the catalog's parser is the one reference

    try:
        catalog.from_static(text)
    except catalog.CatalogError as exc:
        raise SettingsError(str(exc)) from None


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read every setting from `environ` (default: the process environment) or raise SettingsError."""
    settings = _read(Settings, os.environ if environ is None else environ)
    _check(settings)
    return settings


def load_kafka(environ: Mapping[str, str] | None = None, *, bootstrap_servers: str | None = None) -> KafkaConnection:
    """Only the `KAFKA_*` settings (for tools such as `ingestor dlq replay` that need no Stripe key)."""
    env = os.environ if environ is None else environ
    if bootstrap_servers:
        env = {**env, "KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers}
    connection = _read(KafkaConnection, env)
    _check_kafka(connection)
    return connection


def describe() -> str:
    """The settings as text, for `ingestor run --help`."""
    lines = []
    for var in SETTINGS:
        default = "(required)" if var.default is None else f"(default: {var.default or 'empty'})"
        lines.append(f"  {var.env} {default}\n      {var.help}")
    return "\n".join(lines)


def markdown_table() -> str:
    """The settings as a Markdown table, for the README (tests/test_readme.py checks it is there)."""
    return "\n".join(["| variable | default | meaning |", "| --- | --- | --- |", *map(markdown_row, SETTINGS)])


def markdown_row(var: Var[Any]) -> str:
    default = "required" if var.default is None else (f"`{var.default}`" if var.default else "empty")
    return f"| `{var.env}` | {default} | {var.help} |"
