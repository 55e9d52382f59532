"""Settings: read once, validated, every bad value named; secrets never shown."""

from __future__ import annotations

import dataclasses
import re
import ssl

import pytest

from ingestor.settings import (
    LIVE_MODE_STREAM_RPS,
    SANDBOX_BASIC_RPS,
    SETTINGS,
    KafkaConnection,
    Settings,
    SettingsError,
    Var,
    declared_variables,
    describe,
    load,
    load_kafka,
    secret,
    setting,
)

BASE = {"KAFKA_BOOTSTRAP_SERVERS": "k:9092", "INGESTOR_TOPICS": "usage", "STRIPE_API_KEY": "sk_test_abc123"}


def test_defaults_load():
    s = load(BASE)
    assert s.topics == ("usage",)
    assert s.batch_max_events == 100
    assert s.linger_ms == 50
    assert s.stripe_api_base == "https://api.stripe.com"
    assert s.stripe_meter_events_base == "https://meter-events.stripe.com"
    assert s.effective_error_report_topic == s.dlq_topic
    assert s.budget_topic == "ingestor.budget"
    assert load({**BASE, "INGESTOR_BUDGET_TOPIC": "off"}).budget_topic == ""  # share by partitions


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"KAFKA_BOOTSTRAP_SERVERS": None}, "KAFKA_BOOTSTRAP_SERVERS"),
        ({"INGESTOR_TOPICS": " , "}, "INGESTOR_TOPICS"),
        ({"STRIPE_API_KEY": None}, "STRIPE_API_KEY"),
        ({"STRIPE_API_KEY": "pk_test_123"}, "STRIPE_API_KEY"),
        ({"INGESTOR_BATCH_MAX_EVENTS": "101"}, "INGESTOR_BATCH_MAX_EVENTS"),
        ({"INGESTOR_BATCH_MAX_EVENTS": "ten"}, "INGESTOR_BATCH_MAX_EVENTS"),
        ({"INGESTOR_LINGER_MS": "-1"}, "INGESTOR_LINGER_MS"),
        ({"INGESTOR_RPS_BUDGET": "0"}, "INGESTOR_RPS_BUDGET"),
        ({"INGESTOR_BUDGET_HEADROOM": "nan"}, "INGESTOR_BUDGET_HEADROOM"),
        ({"INGESTOR_STRIPE_API_BASE": "ftp://x"}, "INGESTOR_STRIPE_API_BASE"),
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_USERNAME"),
        ({"KAFKA_SSL_CHECK_HOSTNAME": "maybe"}, "KAFKA_SSL_CHECK_HOSTNAME"),
        ({"INGESTOR_METER_CATALOG": "static"}, "INGESTOR_METERS"),
        ({"INGESTOR_WEBHOOK_PORT": "8443"}, "STRIPE_WEBHOOK_SECRET"),
        ({"INGESTOR_RETRY_BASE_S": "5", "INGESTOR_RETRY_MAX_S": "1"}, "INGESTOR_RETRY_MAX_S"),
        ({"INGESTOR_DLQ_TOPIC": "usage"}, "INGESTOR_DLQ_TOPIC"),
        ({"INGESTOR_BUDGET_TOPIC": "usage"}, "INGESTOR_BUDGET_TOPIC"),
        ({"INGESTOR_BUDGET_TOPIC": "ingestor.dlq"}, "INGESTOR_BUDGET_TOPIC"),
        ({"INGESTOR_BUDGET_EXCHANGE_INTERVAL_S": "0"}, "INGESTOR_BUDGET_EXCHANGE_INTERVAL_S"),
        ({"STRIPE_API_KEY": None, "STRIPE_API_KEY_FILE": "/nonexistent/key"}, "STRIPE_API_KEY_FILE"),
    ],
)
def test_a_bad_value_names_its_variable(env, named):
    merged = {**BASE, **env}
    with pytest.raises(SettingsError, match=named):
        load({k: v for k, v in merged.items() if v is not None})


def test_budget_defaults_follow_the_key_mode():
    assert load(BASE).effective_rps_budget == SANDBOX_BASIC_RPS
    assert load({**BASE, "STRIPE_API_KEY": "rk_live_abc"}).effective_rps_budget == LIVE_MODE_STREAM_RPS
    assert load({**BASE, "INGESTOR_RPS_BUDGET": "300"}).effective_rps_budget == 300


def test_secrets_come_from_files_and_never_show(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("sk_live_fromFile123\n")
    password = tmp_path / "password"
    password.write_text("hunter2")
    s = load(
        {
            **BASE,
            "STRIPE_API_KEY": "",
            "STRIPE_API_KEY_FILE": str(key_file),
            "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "svc",
            "KAFKA_SASL_PASSWORD_FILE": str(password),
        }
    )
    assert s.api_key == "sk_live_fromFile123"
    assert s.livemode
    assert "sk_live_fromFile123" not in repr(s)
    assert "hunter2" not in repr(s)
    options = s.kafka_security()
    assert options == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "hunter2",
    }


def test_tls_options_build_an_ssl_context():
    s = load({**BASE, "KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CHECK_HOSTNAME": "false"})
    options = s.kafka_security()
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["ssl_context"].check_hostname is False


def test_help_lists_every_variable():
    text = describe()
    for var in SETTINGS:
        assert var.env in text


ENV_NAME = re.compile(r"(KAFKA|INGESTOR|STRIPE)_[A-Z0-9_]+")


@pytest.mark.parametrize("cls", [KafkaConnection, Settings])
def test_every_field_declares_one_variable_with_its_help(cls):
    claimed: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        var = f.metadata.get("ingestor.setting")
        assert isinstance(var, Var), f"{cls.__name__}.{f.name} is not declared with setting() or secret()"
        assert ENV_NAME.fullmatch(var.env), f"{f.name}: {var.env!r} is not a variable name"
        assert var.help.strip(), f"{var.env} has no help"
        assert var.env not in claimed, f"{var.env} is read by both {claimed[var.env]} and {f.name}"
        claimed[var.env] = f.name
    assert [var.env for var in declared_variables(cls)] == list(claimed)


def test_settings_lists_every_field_of_settings_in_order():
    assert [var.field for var in SETTINGS] == [f.name for f in dataclasses.fields(Settings)]
    kafka_fields = [f.name for f in dataclasses.fields(KafkaConnection)]
    assert [var.field for var in SETTINGS[: len(kafka_fields)]] == kafka_fields


def test_a_field_without_its_variable_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Bare:
        linger_ms: int = 50

    with pytest.raises(TypeError, match="field linger_ms has no variable name and help"):
        declared_variables(Bare)


def test_a_field_without_help_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Silent:
        linger_ms: int = setting("INGESTOR_LINGER_MS", "50", int_parse, " ")

    with pytest.raises(TypeError, match="field linger_ms has no variable name and help"):
        declared_variables(Silent)


def test_two_fields_claiming_one_variable_are_refused():
    @dataclasses.dataclass(frozen=True)
    class Twice:
        linger_ms: int = setting("INGESTOR_LINGER_MS", "50", int_parse, "How long.")
        linger_again_ms: int = setting("INGESTOR_LINGER_MS", "60", int_parse, "How long, again.")

    with pytest.raises(TypeError, match="more than one field reads INGESTOR_LINGER_MS"):
        declared_variables(Twice)


def test_a_secret_without_its_file_variable_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Lonely:
        token: str = secret("INGESTOR_TOKEN", "A token.")

    with pytest.raises(TypeError, match="no INGESTOR_TOKEN_FILE field beside the secret"):
        declared_variables(Lonely)


def int_parse(name: str, raw: str) -> int:
    del name
    return int(raw)


def test_field_defaults_are_the_declared_defaults_parsed():
    for var, f in zip(SETTINGS, dataclasses.fields(Settings), strict=True):
        if var.default is None:
            assert f.default is dataclasses.MISSING, var.env
        else:
            assert f.default == var.parse(var.env, var.default), var.env
    assert KafkaConnection("k:9092") == load_kafka({"KAFKA_BOOTSTRAP_SERVERS": "k:9092"})


def test_the_kafka_settings_read_alone_are_the_ones_the_worker_reads(tmp_path):
    password = tmp_path / "password"
    password.write_text("hunter2\n")
    env = {
        **BASE,
        "KAFKA_CLIENT_ID": "billing",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_USERNAME": "svc",
        "KAFKA_SASL_PASSWORD_FILE": str(password),
        "KAFKA_SSL_CHECK_HOSTNAME": "no",
    }
    assert load_kafka(env) == load(env).kafka
    assert load_kafka(env).sasl_password == "hunter2"


@pytest.mark.parametrize("var", [var for var in SETTINGS if var.secret], ids=lambda var: var.env)
def test_every_secret_is_read_from_its_file_and_never_shown(tmp_path, var):
    path = tmp_path / "secret"
    path.write_text("sk_test_s3cretValue\n")  # a Stripe key, and as good a password as any
    env = {**BASE, var.file_env: str(path)}
    loaded = load({name: value for name, value in env.items() if name != var.env})
    assert getattr(loaded, var.field) == "sk_test_s3cretValue"
    assert "s3cretValue" not in repr(loaded)
    assert "s3cretValue" not in repr(loaded.kafka)
