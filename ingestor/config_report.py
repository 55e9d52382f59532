"""`ingestor run --check-config`: every setting as a table of value and origin, `auto` values resolved.

Pure: `rows(settings, environ)` takes the loaded settings and the environment they came from, and
returns one `Row` per variable; `render(rows)` lays them out. Secrets are masked (a Stripe key shows
only its kind and mode, `sk_test_****`). Files are checked by `ingestor.settings.load` (secret files)
and by `check_files` (the TLS files, loaded as the worker would load them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ingestor import settings as settings_mod

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ingestor.settings import Settings

#: A variable whose value is read from a file when the variable itself is empty: value -> file.
SECRET_FILES = {
    "STRIPE_API_KEY": "STRIPE_API_KEY_FILE",
    "KAFKA_SASL_PASSWORD": "KAFKA_SASL_PASSWORD_FILE",
    "STRIPE_WEBHOOK_SECRET": "STRIPE_WEBHOOK_SECRET_FILE",
}
SECRETS = frozenset(SECRET_FILES)


@dataclass(frozen=True)
class Row:
    variable: str
    value: str
    origin: str


def rows(settings: Settings, environ: Mapping[str, str]) -> list[Row]:
    """One row per variable: the value the worker uses (secrets masked, `auto` resolved) and its origin."""
    out = []
    for var in settings_mod.SETTINGS:
        given = environ.get(var.env, "").strip() != ""
        value = getattr(settings, var.field)
        origin = "env" if given else "default"
        shown = _mask(var.env, value) if var.env in SECRETS else _text(value)
        file_var = SECRET_FILES.get(var.env)
        if file_var is not None and not given and value:
            origin = f"file ({file_var})"
        out.append(Row(var.env, shown + _resolved(var.env, settings, environ), origin))
    return out


def _resolved(env: str, settings: Settings, environ: Mapping[str, str]) -> str:  # noqa: PLR0911 - one per case
    """What an `auto` or empty value means, and which of a secret and its file wins."""
    if env == "INGESTOR_RPS_BUDGET" and settings.rps_budget is None:
        mode = "live" if settings.livemode else "test"
        return f" -> {settings.effective_rps_budget} (a {mode} key)"
    if env == "INGESTOR_ERROR_REPORT_TOPIC" and not settings.error_report_topic:
        return f" -> {settings.effective_error_report_topic} (the dead-letter topic)"
    if env == "INGESTOR_IDENTIFIER_NAMESPACE" and not settings.identifier_namespace:
        return " -> the Kafka cluster's id (read at start)"
    if env in {"INGESTOR_METRICS_PORT", "INGESTOR_WEBHOOK_PORT"} and getattr(settings, env[9:].lower()) == 0:
        return " -> any free port (logged at start)" if env == "INGESTOR_METRICS_PORT" else " -> disabled"
    value_var = _FILE_OF.get(env)
    if value_var is not None and environ.get(env, "").strip():
        if environ.get(value_var, "").strip():
            return f" (ignored: {value_var} is set and wins)"
        return f" (used: {value_var} is empty)"
    return ""


_FILE_OF = {file_var: value_var for value_var, file_var in SECRET_FILES.items()}


def _mask(env: str, value: object) -> str:
    text = str(value)
    if not text:
        return "(empty)"
    if env == "STRIPE_API_KEY":
        kind = next((p for p in ("sk_live_", "sk_test_", "rk_live_", "rk_test_") if text.startswith(p)), "")
        return f"{kind}**** ({len(text)} characters)"
    return f"**** ({len(text)} characters)"


def _text(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "auto"
    text = str(value)
    return text or "(empty)"


def render(table: Sequence[Row]) -> str:
    width = max(len(r.variable) for r in table)
    origin_width = max(len(r.origin) for r in table)
    head = f"{'variable':<{width}}  {'from':<{origin_width}}  value"
    lines = [head, "-" * len(head)]
    lines += [f"{r.variable:<{width}}  {r.origin:<{origin_width}}  {r.value}" for r in table]
    return "\n".join(lines)


def check_files(settings: Settings) -> None:
    """The TLS files load (SettingsError naming the variable otherwise); secret files were read by `load`."""
    if "SSL" in settings.security_protocol:
        from ingestor import kafka_preflight  # noqa: PLC0415 - only with TLS

        kafka_preflight.tls_context(settings.kafka)


def report(settings: Settings, environ: Mapping[str, str]) -> str:
    """The table, once the files it names were checked (SettingsError naming the variable otherwise)."""
    check_files(settings)
    return render(rows(settings, environ))
