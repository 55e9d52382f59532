"""The Helm chart agrees with the worker's settings, the image and the alerts it ships."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ingestor.settings import SETTINGS
from ingestor.worker import SHUTDOWN_STEP_S

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "ingestor"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
SETTING_NAMES = frozenset(var.env for var in SETTINGS)
DEFAULTS = {var.env: var.default for var in SETTINGS}
#: Secrets never go through values.config: the chart mounts them from Secrets as files.
SECRET_VARIABLES = frozenset({"STRIPE_API_KEY", "KAFKA_SASL_PASSWORD", "STRIPE_WEBHOOK_SECRET"})
#: Set by the chart itself from typed values.
CHART_MANAGED = frozenset(
    {
        "STRIPE_API_KEY_FILE",
        "KAFKA_SASL_PASSWORD_FILE",
        "STRIPE_WEBHOOK_SECRET_FILE",
        "INGESTOR_DRAIN_TIMEOUT_S",
        "INGESTOR_METRICS_PORT",
        "INGESTOR_WEBHOOK_PORT",
    }
)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    return loaded


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Values as Helm merges a -f file over the chart's defaults (maps deeply, everything else replaced)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _errors(schema: dict[str, Any], values: dict[str, Any]) -> list[str]:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(values)]


def test_the_chart_ships_an_identical_copy_of_the_alerts() -> None:
    copy_in_chart = CHART / "files" / "alerts.yaml"
    assert copy_in_chart.read_bytes() == ALERTS.read_bytes(), f"run: cp {ALERTS} {copy_in_chart}"


def test_values_schema_is_valid_json_schema(schema: dict[str, Any]) -> None:
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert schema["additionalProperties"] is False


def test_default_values_match_the_schema(schema: dict[str, Any], values: dict[str, Any]) -> None:
    assert _errors(schema, values) == []


@pytest.mark.parametrize("examples", ["ci/all-features-values.yaml", "../../deploy/examples/values-production.yaml"])
def test_example_values_match_the_schema(schema: dict[str, Any], values: dict[str, Any], examples: str) -> None:
    override = yaml.safe_load((CHART / examples).read_text(encoding="utf-8"))
    assert _errors(schema, _merged(values, override)) == []


@pytest.mark.parametrize("variable", sorted(SECRET_VARIABLES | CHART_MANAGED | {"INGESTOR_NOT_A_SETTING"}))
def test_schema_refuses_secrets_and_chart_managed_variables_in_config(
    schema: dict[str, Any], values: dict[str, Any], variable: str
) -> None:
    bad = copy.deepcopy(values)
    bad["config"][variable] = "x"
    assert _errors(schema, bad), f"config.{variable} must be refused"


def test_config_variables_the_schema_allows_are_worker_settings(schema: dict[str, Any]) -> None:
    allowed = set(schema["properties"]["config"]["propertyNames"]["enum"])
    assert allowed <= SETTING_NAMES, f"not settings of the worker: {sorted(allowed - SETTING_NAMES)}"
    assert not allowed & (SECRET_VARIABLES | CHART_MANAGED)
    assert (SECRET_VARIABLES | CHART_MANAGED) <= SETTING_NAMES, "a variable the chart relies on was renamed"


def test_every_secret_the_worker_declares_is_mounted_by_the_chart_not_set_in_config() -> None:
    declared = {var.env for var in SETTINGS if var.secret}
    assert declared == SECRET_VARIABLES, "a new secret needs a Secret mount in the chart, never values.config"
    assert {var.file_env for var in SETTINGS if var.secret} <= CHART_MANAGED


def test_chart_defaults_follow_the_worker(values: dict[str, Any]) -> None:
    assert float(DEFAULTS["INGESTOR_DRAIN_TIMEOUT_S"] or 0) == values["drainTimeoutSeconds"]
    assert int(DEFAULTS["INGESTOR_METRICS_PORT"] or 0) == values["metrics"]["port"]
    # After the drain deadline the worker may take SHUTDOWN_STEP_S to stop its tasks and as long again for
    # the final commit: the grace period must cover both, and closing the clients.
    assert values["terminationGraceMarginSeconds"] >= 2 * SHUTDOWN_STEP_S + 2


def test_pod_user_is_the_image_user(values: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    assert user, "the Dockerfile must switch to a numeric non-root user"
    pod = values["podSecurityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(user[1]), int(user[2]))
    assert pod["runAsNonRoot"] is True
