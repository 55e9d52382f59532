"""`ingestor run --check-config`: every setting as a table of value and origin, `auto` values resolved.

Pure: `rows(settings, environ)` takes the loaded settings and the environment they came from, and
returns one `Row` per variable; `render(rows)` lays them out. Every row comes from the variable's
declaration in `ingestor.settings` (`SETTINGS`): a `secret` is masked (a Stripe key shows only its kind
and mode, `sk_test_****`) and its `_FILE` variable's row says which of the two wins; `unset_means` says
what an `auto`, empty or 0 value resolves to. Files are checked by `ingestor.settings.load` (secret files)
and by `check_files` (the TLS files, loaded as the worker would load them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ingestor import settings as settings_mod

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ingestor.settings import Settings, Var


@dataclass(frozen=True)
class Row:
    variable: str
    value: str
    origin: str


def rows(settings: Settings, environ: Mapping[str, str]) -> list[Row]:
    """One row per variable: the value the worker uses (secrets masked, `auto` resolved) and its origin."""
    return [_row(var, settings, environ) for var in settings_mod.SETTINGS]


def _row(var: Var[Any], settings: Settings, environ: Mapping[str, str]) -> Row:
    value = getattr(settings, var.field)
    origin = "env" if _given(var.env, environ) else "default"
    if var.secret and origin == "default" and value:
        origin = f"file ({var.file_env})"
    shown = _mask(value, var.shown_prefixes) if var.secret else _text(value)
    return Row(var.env, shown + _resolved(var, settings, environ), origin)


def _resolved(var: Var[Any], settings: Settings, environ: Mapping[str, str]) -> str:
    """What an `auto`, empty or 0 value means, and which of a secret and its file wins."""
    if var.unset_means is not None and not getattr(settings, var.field):
        return f" -> {var.unset_means(settings)}"
    secret = _SECRET_OF_FILE.get(var.env)
    if secret is not None and _given(var.env, environ):
        if _given(secret.env, environ):
            return f" (ignored: {secret.env} is set and wins)"
        return f" (used: {secret.env} is empty)"
    return ""


#: A secret's file variable -> the secret (read from the file when the secret itself is empty).
_SECRET_OF_FILE = {var.file_env: var for var in settings_mod.SETTINGS if var.secret}


def _given(env: str, environ: Mapping[str, str]) -> bool:
    return environ.get(env, "").strip() != ""


def _mask(value: object, shown_prefixes: tuple[str, ...]) -> str:
    """A secret's length and, for a Stripe key, its kind and mode (`sk_test_****`): never a character more."""
    text = str(value)
    if not text:
        return "(empty)"
    kind = next((prefix for prefix in shown_prefixes if text.startswith(prefix)), "")
    return f"{kind}**** ({len(text)} characters)"


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
