"""kafka_preflight's TLS loading: each unreadable file is named by its variable (no broker needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ingestor import kafka_preflight
from ingestor.settings import KafkaConnection, SettingsError
from ingestor_dev.devkafka import TlsMaterial

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return TlsMaterial.generate(tmp_path_factory.mktemp("tls"))


def connection(**fields: object) -> KafkaConnection:
    return KafkaConnection(bootstrap_servers="127.0.0.1:9093", security_protocol="SSL", **fields)  # type: ignore[arg-type]


def test_a_missing_ca_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^KAFKA_SSL_CAFILE: cannot load .*missing\.pem"):
        kafka_preflight.tls_context(connection(ssl_cafile=str(tmp_path / "missing.pem")))


def test_a_ca_file_that_is_not_a_certificate_is_named(tls: TlsMaterial) -> None:
    with pytest.raises(SettingsError, match=r"^KAFKA_SSL_CAFILE"):
        kafka_preflight.tls_context(connection(ssl_cafile=str(tls.client_key)))


def test_a_key_without_a_certificate_is_refused(tls: TlsMaterial) -> None:
    with pytest.raises(SettingsError, match="KAFKA_SSL_CERTFILE must be set with KAFKA_SSL_KEYFILE"):
        kafka_preflight.tls_context(connection(ssl_cafile=str(tls.ca_file), ssl_keyfile=str(tls.client_key)))


def test_a_key_that_does_not_match_the_certificate_is_named(tls: TlsMaterial) -> None:
    mismatched = connection(
        ssl_cafile=str(tls.ca_file), ssl_certfile=str(tls.client_cert), ssl_keyfile=str(tls.stranger_key)
    )
    with pytest.raises(SettingsError, match=r"^KAFKA_SSL_CERTFILE/KAFKA_SSL_KEYFILE"):
        kafka_preflight.tls_context(mismatched)


def test_the_context_verifies_the_broker_and_honours_the_host_name_switch(tls: TlsMaterial) -> None:
    checked = kafka_preflight.tls_context(connection(ssl_cafile=str(tls.ca_file)))
    unchecked = kafka_preflight.tls_context(connection(ssl_cafile=str(tls.ca_file), ssl_check_hostname=False))

    assert checked.check_hostname
    assert not unchecked.check_hostname
    assert checked.cert_store_stats()["x509_ca"] == 1
