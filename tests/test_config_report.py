"""`ingestor run --check-config`'s table: origins, masked secrets, `auto` resolved, which secret wins."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ingestor import config_report
from ingestor import settings as settings_mod

if TYPE_CHECKING:
    from pathlib import Path

BASE = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092", "INGESTOR_TOPICS": "a, b"}


def table(env: dict[str, str]) -> dict[str, config_report.Row]:
    return {row.variable: row for row in config_report.rows(settings_mod.load(env), env)}


def test_every_variable_has_a_row_with_its_origin() -> None:
    rows = table({**BASE, "STRIPE_API_KEY": "sk_test_abc", "INGESTOR_LINGER_MS": "7"})
    assert list(rows) == [var.env for var in settings_mod.SETTINGS]
    assert (rows["INGESTOR_LINGER_MS"].value, rows["INGESTOR_LINGER_MS"].origin) == ("7", "env")
    assert (rows["INGESTOR_GROUP_ID"].value, rows["INGESTOR_GROUP_ID"].origin) == ("ingestor", "default")
    assert rows["INGESTOR_TOPICS"].value == "a,b"


@pytest.mark.parametrize(("key", "budget", "mode"), [("sk_test_abc", 25, "test"), ("rk_live_abc", 10_000, "live")])
def test_auto_budget_is_resolved_from_the_keys_mode(key: str, budget: int, mode: str) -> None:
    row = table({**BASE, "STRIPE_API_KEY": key})["INGESTOR_RPS_BUDGET"]
    assert row.value == f"auto -> {budget} (a {mode} key)"


def test_secrets_are_masked_everywhere_in_the_output() -> None:
    key, password, secret = "sk_live_verySecret123", "saslSecret456", "whsec_webhookSecret789"
    env = {
        **BASE,
        "STRIPE_API_KEY": key,
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_USERNAME": "u",
        "KAFKA_SASL_PASSWORD": password,
        "INGESTOR_WEBHOOK_PORT": "8080",
        "STRIPE_WEBHOOK_SECRET": secret,
    }
    text = config_report.report(settings_mod.load(env), env)
    for hidden in (key, password, secret, "verySecret", "webhookSecret"):
        assert hidden not in text
    assert "sk_live_****" in text


def test_the_key_variable_wins_over_its_file_and_the_table_says_so(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk_test_fromFile\n")
    both = table({**BASE, "STRIPE_API_KEY": "sk_test_fromEnv", "STRIPE_API_KEY_FILE": str(key_file)})
    assert both["STRIPE_API_KEY"].origin == "env"
    assert "ignored: STRIPE_API_KEY is set and wins" in both["STRIPE_API_KEY_FILE"].value
    only_file = table({**BASE, "STRIPE_API_KEY_FILE": str(key_file)})
    assert only_file["STRIPE_API_KEY"].origin == "file (STRIPE_API_KEY_FILE)"
    assert "used" in only_file["STRIPE_API_KEY_FILE"].value


def test_a_tls_file_that_does_not_exist_is_named(tmp_path: Path) -> None:
    env = {
        **BASE,
        "STRIPE_API_KEY": "sk_test_abc",
        "KAFKA_SECURITY_PROTOCOL": "SSL",
        "KAFKA_SSL_CAFILE": str(tmp_path / "missing-ca.pem"),
    }
    with pytest.raises(settings_mod.SettingsError, match="KAFKA_SSL_CAFILE"):
        config_report.report(settings_mod.load(env), env)


def test_the_table_is_aligned_columns_with_a_header() -> None:
    env = {**BASE, "STRIPE_API_KEY": "sk_test_abc"}
    lines = config_report.report(settings_mod.load(env), env).splitlines()
    assert lines[0].split() == ["variable", "from", "value"]
    value_column = lines[0].index("value")
    assert all(line[value_column - 2 : value_column] == "  " for line in lines[2:])


@pytest.mark.parametrize(("key", "rps", "mode"), [("sk_test_abc", 25, "test"), ("rk_live_abc", 100, "live")])
def test_auto_api_rps_is_resolved_from_the_keys_mode(key: str, rps: int, mode: str) -> None:
    row = table({**BASE, "STRIPE_API_KEY": key})["INGESTOR_API_RPS"]
    assert row.value == f"auto -> {rps} (a {mode} key)"
    assert table({**BASE, "STRIPE_API_KEY": key, "INGESTOR_API_RPS": "7"})["INGESTOR_API_RPS"].value == "7"


def test_empty_and_zero_values_say_what_they_mean() -> None:
    rows = table({**BASE, "STRIPE_API_KEY": "sk_test_abc", "INGESTOR_METRICS_PORT": "0"})
    assert rows["INGESTOR_ERROR_REPORT_TOPIC"].value == "(empty) -> ingestor.dlq (the dead-letter topic)"
    assert rows["INGESTOR_IDENTIFIER_NAMESPACE"].value == "(empty) -> the Kafka cluster's id (read at start)"
    assert rows["INGESTOR_METRICS_PORT"].value == "0 -> any free port (logged at start)"
    assert rows["INGESTOR_WEBHOOK_PORT"].value == "0 -> disabled"
    assert rows["INGESTOR_GROUP_ID"].value == "ingestor"


SECRETS = [var for var in settings_mod.SETTINGS if var.secret]


def test_the_secrets_are_the_three_the_chart_mounts() -> None:
    assert [var.env for var in SECRETS] == ["KAFKA_SASL_PASSWORD", "STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET"]


@pytest.mark.parametrize("var", SECRETS, ids=lambda var: var.env)
def test_every_secret_row_is_masked_and_its_file_row_says_which_wins(
    tmp_path: Path, var: settings_mod.Var[str]
) -> None:
    path = tmp_path / "secret"
    path.write_text("sk_test_fromFile\n")
    env = {**BASE, "STRIPE_API_KEY": "sk_test_abc", var.env: "sk_test_fromEnv", var.file_env: str(path)}
    kind = "sk_test_" if var.env == "STRIPE_API_KEY" else ""  # only a Stripe key shows its kind and mode
    both = table(env)
    assert (both[var.env].value, both[var.env].origin) == (f"{kind}**** (15 characters)", "env")
    assert both[var.file_env].value == f"{path} (ignored: {var.env} is set and wins)"
    only_file = table({**env, var.env: ""})
    assert (only_file[var.env].value, only_file[var.env].origin) == (
        f"{kind}**** (16 characters)",
        f"file ({var.file_env})",
    )
    assert only_file[var.file_env].value == f"{path} (used: {var.env} is empty)"
    neither = table({**BASE, "STRIPE_API_KEY": "sk_test_abc"})
    assert neither[var.file_env].value == "(empty)"
