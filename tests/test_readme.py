"""The README tells the truth: every setting, metric, reason code and dead-letter header is in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingestor import dlq_format, errors, settings
from ingestor.metric_names import exported_metric_names

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("var", settings.SETTINGS, ids=lambda v: v.env)
def test_every_setting_is_documented(var):
    assert f"`{var.env}`" in README
    assert settings.markdown_row(var) in README.splitlines(), "default or meaning differs: paste markdown_table()"


def test_the_settings_table_is_the_generated_one():
    assert settings.markdown_table() in README, "paste ingestor.settings.markdown_table() into the README"


@pytest.mark.parametrize("name", sorted(exported_metric_names()))
def test_every_metric_is_documented(name):
    assert f"`{name}`" in README


@pytest.mark.parametrize("code", sorted(errors.REASONS))
def test_every_reason_code_is_documented(code):
    assert f"`{code}`" in README


@pytest.mark.parametrize("header", sorted(dlq_format.HEADERS))
def test_every_dead_letter_header_is_documented(header):
    assert f"`{header}`" in README


def test_the_two_setup_commands_are_the_ones_ci_runs():
    assert "make demo" in README
    assert "make test" in README
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci


def exposition_types() -> dict[str, str]:
    """Each metric's type as /metrics states it (`# TYPE`): an Info is exposed as a gauge named `<name>_info`."""
    from prometheus_client import generate_latest  # noqa: PLC0415

    from ingestor.worker import Worker  # noqa: PLC0415

    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092", "INGESTOR_TOPICS": "t", "STRIPE_API_KEY": "sk_test_types"}
    text = generate_latest(Worker(settings.load(env)).metrics.registry).decode()
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE ") and not line.split()[2].endswith("_created"):  # a counter's creation time
            _, _, name, kind = line.split()
            types[name + ("_total" if kind == "counter" and not name.endswith("_total") else "")] = kind
    return types


def test_every_metric_is_documented_with_the_type_it_is_exported_as():
    documented = {}
    for line in README.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) > 3 and cells[1].startswith("`ingestor_"):
            documented[cells[1].strip("`")] = cells[2]
    for name, kind in exposition_types().items():
        assert documented.get(name) == kind, name
