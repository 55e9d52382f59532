"""The chart's Kafka security values, rendered by helm and fed back into the worker's settings parser.

For each security mode a user configures (SSL, SASL_SSL with SCRAM, SASL_PLAINTEXT with PLAIN, mutual TLS)
the chart is rendered with `helm template`; the container's environment is rebuilt from the ConfigMap
(envFrom) and the env list, and every mounted Secret is laid out in a temporary directory the way the
kubelet would (the items' paths, or every key of the Secret). The worker's own parser then loads that
environment, reads the password from the mounted file, and loads the CA, certificate and key through the
same TLS code the worker runs at start-up: a path in the chart that does not match a file in the Secret
fails here, not in a cluster.

helm is the one scripts/check-deploy.sh installs into the tools cache (`make test` runs it first).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingestor import kafka_preflight, settings
from ingestor_dev.devkafka import TlsMaterial

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "ingestor"
TOOLS_BIN = Path(os.environ.get("INGESTOR_TOOLS_CACHE") or "~/.cache/ingestor/tools").expanduser() / "bin"
PASSWORD = "not-a-real-password-0123"
#: The Kubernetes version scripts/check-deploy.sh renders for (the chart needs >= 1.25).
KUBE_VERSION = "1.33.0"
BASE_CONFIG = {
    "KAFKA_BOOTSTRAP_SERVERS": "kafka-0.kafka:9093",
    "INGESTOR_TOPICS": "usage-events",
    "INGESTOR_METER_CATALOG": "static",
    "INGESTOR_METERS": '{"api_calls": {}}',
}
#: What a user puts in the TLS Secret: kubectl create secret generic kafka-tls --from-file=ca.crt ...
TLS_SECRET_KEYS = {"ca.crt": "ca_file", "tls.crt": "client_cert", "tls.key": "client_key"}

MODES: dict[str, dict[str, Any]] = {
    "SSL": {
        "config": {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/var/run/secrets/kafka-tls/ca.crt"},
        "kafka": {"tls": {"existingSecret": "kafka-tls"}},
    },
    "SASL_SSL SCRAM-SHA-512": {
        "config": {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "ingestor",
            "KAFKA_SSL_CAFILE": "/var/run/secrets/kafka-tls/ca.crt",
        },
        "kafka": {"sasl": {"enabled": True, "existingSecret": "kafka-sasl"}, "tls": {"existingSecret": "kafka-tls"}},
    },
    "SASL_SSL SCRAM-SHA-256, default Secret name": {
        "config": {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
            "KAFKA_SASL_USERNAME": "ingestor",
            "KAFKA_SSL_CAFILE": "/var/run/secrets/kafka-tls/ca.crt",
        },
        "kafka": {"sasl": {"enabled": True}, "tls": {"existingSecret": "kafka-tls"}},
    },
    "SASL_PLAINTEXT PLAIN": {
        "config": {
            "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": "PLAIN",
            "KAFKA_SASL_USERNAME": "ingestor",
        },
        "kafka": {"sasl": {"enabled": True, "existingSecret": "kafka-sasl", "passwordKey": "sasl-password"}},
    },
    "mutual TLS": {
        "config": {
            "KAFKA_SECURITY_PROTOCOL": "SSL",
            "KAFKA_SSL_CAFILE": "/var/run/secrets/kafka-tls/ca.crt",
            "KAFKA_SSL_CERTFILE": "/var/run/secrets/kafka-tls/tls.crt",
            "KAFKA_SSL_KEYFILE": "/var/run/secrets/kafka-tls/tls.key",
        },
        "kafka": {"tls": {"existingSecret": "kafka-tls"}},
    },
}


def helm_binary() -> str:
    for candidate in (os.environ.get("INGESTOR_HELM"), str(TOOLS_BIN / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("helm is missing: run `bash scripts/check-deploy.sh` once (it builds helm into the tools cache)")


def kube_args(values_file: Path) -> list[str]:
    return ["--values", str(values_file), "--kube-version", KUBE_VERSION]


def render(values: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = subprocess.run(
        [helm_binary(), "template", "ingestor", str(CHART), "--namespace", "billing", *kube_args(values_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def secret_contents(tls: TlsMaterial) -> dict[str, dict[str, str]]:
    """The Secrets a user creates: Stripe's key, the SASL password (both key names used), the TLS files."""
    password = {"password": PASSWORD, "sasl-password": PASSWORD}
    return {
        "ingestor-stripe": {"api-key": "sk_test_helmRender000000000000"},
        "kafka-sasl": password,
        "ingestor-kafka-sasl": password,
        "kafka-tls": {key: getattr(tls, field).read_text() for key, field in TLS_SECRET_KEYS.items()},
    }


def container_environment(docs: list[dict[str, Any]], secrets: dict[str, dict[str, str]], root: Path) -> dict[str, str]:
    """The worker's environment in the pod, with every mounted Secret laid out under `root`."""
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        assert "value" in item, f"{item['name']}: only literal values are expected from the chart"
        env[item["name"]] = item["value"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        data = secrets[secret["secretName"]]
        items = secret.get("items") or [{"key": key, "path": key} for key in data]
        target = root / mount["name"]
        target.mkdir(parents=True)
        for item in items:
            (target / item["path"]).write_text(data[item["key"]])
        mounts[mount["mountPath"]] = target
    for name, value in env.items():
        for mount_path, target in mounts.items():
            if value.startswith(mount_path + "/"):
                env[name] = str(target) + value.removeprefix(mount_path)
    return env


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return TlsMaterial.generate(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("mode", list(MODES))
def test_rendered_security_settings_load_in_the_worker(mode: str, tls: TlsMaterial, tmp_path: Path) -> None:
    case = MODES[mode]
    docs = render({"config": {**BASE_CONFIG, **case["config"]}, "kafka": case["kafka"]}, tmp_path)
    env = container_environment(docs, secret_contents(tls), tmp_path / "pod")

    loaded = settings.load(env)

    assert loaded.security_protocol == case["config"]["KAFKA_SECURITY_PROTOCOL"]
    if loaded.security_protocol.startswith("SASL"):
        assert loaded.sasl_mechanism == case["config"]["KAFKA_SASL_MECHANISM"]
        assert loaded.sasl_password == PASSWORD  # read from the file the chart mounts
        assert "KAFKA_SASL_PASSWORD" not in env  # never a plain variable
        assert PASSWORD not in repr(loaded)
    if "SSL" in loaded.security_protocol:
        context = kafka_preflight.tls_context(loaded.kafka)  # the files exist and load as the worker loads them
        assert context.check_hostname
        assert context.cert_store_stats()["x509_ca"] == 1
    assert bool(loaded.ssl_certfile) == (mode == "mutual TLS")


def test_a_tls_path_that_is_not_in_the_secret_fails_with_the_variable(tls: TlsMaterial, tmp_path: Path) -> None:
    config = {**BASE_CONFIG, **MODES["SSL"]["config"], "KAFKA_SSL_CAFILE": "/var/run/secrets/kafka-tls/ca.pem"}
    docs = render({"config": config, "kafka": MODES["SSL"]["kafka"]}, tmp_path)
    env = container_environment(docs, secret_contents(tls), tmp_path / "pod")

    with pytest.raises(settings.SettingsError, match="KAFKA_SSL_CAFILE"):
        kafka_preflight.tls_context(settings.load(env).kafka)


def test_sasl_without_the_password_secret_is_refused_at_render(tmp_path: Path) -> None:
    case = MODES["SASL_SSL SCRAM-SHA-512"]
    values_file = tmp_path / "values.yaml"
    values_file.write_text(
        yaml.safe_dump({"config": {**BASE_CONFIG, **case["config"]}, "kafka": {"tls": case["kafka"]["tls"]}})
    )

    done = subprocess.run(
        [
            helm_binary(),
            "template",
            "ingestor",
            str(CHART),
            "--values",
            str(values_file),
            "--kube-version",
            KUBE_VERSION,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Without kafka.sasl.enabled nothing would mount the password: the worker would log in with none.
    assert done.returncode != 0
    assert "kafka.sasl.enabled" in done.stderr
