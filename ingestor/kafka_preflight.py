"""Start-up check of Kafka's TLS and SASL settings: a refusal becomes a SettingsError naming the variable.

aiokafka's clients retry a broker that refuses them and end with "Unable to bootstrap", which says
neither what was refused nor which setting to change. Before the worker builds its clients, `check`
opens one connection to a bootstrap server the way they would (TLS handshake, ApiVersions, SASL) and
turns a refusal into a `SettingsError` that names the variable to fix:

- a CA, certificate or key file that cannot be read  -> KAFKA_SSL_CAFILE / _CERTFILE / _KEYFILE
- the broker's certificate is not signed by a trusted CA -> KAFKA_SSL_CAFILE
- the broker's certificate is for another host name  -> KAFKA_SSL_CHECK_HOSTNAME (and the bootstrap host)
- the broker closes the connection after the TLS handshake (its listener requires a client certificate
  and refused ours, or had none)                       -> KAFKA_SSL_CERTFILE / KAFKA_SSL_KEYFILE
- SASL authentication fails                          -> KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD
- the broker does not offer the SASL mechanism       -> KAFKA_SASL_MECHANISM

The password never appears in a message: only the broker's own error text and the variables' names do.
A broker that cannot be reached at all is not judged here: the worker's usual start-up path reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import TYPE_CHECKING, Any

from aiokafka import errors as kafka_errors
from aiokafka.conn import create_conn

from ingestor.settings import SettingsError

if TYPE_CHECKING:
    from ingestor.settings import KafkaConnection

CHECK_TIMEOUT_S = 15.0
CLOSE_TIMEOUT_S = 5.0
#: OpenSSL's verification codes for a certificate that is valid, but for another host or address.
_NAME_MISMATCH_CODES = frozenset({62, 64})  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def tls_context(connection: KafkaConnection) -> ssl.SSLContext:
    """The client TLS context, each file loaded on its own so that a bad one is named."""
    try:
        context = ssl.create_default_context(purpose=ssl.Purpose.SERVER_AUTH, cafile=connection.ssl_cafile or None)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"KAFKA_SSL_CAFILE: cannot load {connection.ssl_cafile}: {_reason(exc)}") from None
    if connection.ssl_certfile or connection.ssl_keyfile:
        if not connection.ssl_certfile:
            raise SettingsError("KAFKA_SSL_CERTFILE must be set with KAFKA_SSL_KEYFILE")
        try:
            context.load_cert_chain(connection.ssl_certfile, connection.ssl_keyfile or None)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(
                f"KAFKA_SSL_CERTFILE/KAFKA_SSL_KEYFILE: cannot load the client certificate "
                f"{connection.ssl_certfile} and key {connection.ssl_keyfile or '(in the certificate file)'}: "
                f"{_reason(exc)}"
            ) from None
    context.check_hostname = connection.ssl_check_hostname
    return context


async def check(connection: KafkaConnection, within: float = CHECK_TIMEOUT_S) -> None:
    """Raise SettingsError if a bootstrap server refuses our TLS or SASL settings; else return."""
    options: dict[str, Any] = {"security_protocol": connection.security_protocol}
    if "SSL" in connection.security_protocol:
        options["ssl_context"] = tls_context(connection)
    if connection.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = connection.sasl_mechanism
        options["sasl_plain_username"] = connection.sasl_username
        options["sasl_plain_password"] = connection.sasl_password
    for server in connection.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        if await _try_server(connection, host.strip("[]"), int(port or 9092), options, within):
            return


async def _try_server(
    connection: KafkaConnection, host: str, port: int, options: dict[str, Any], within: float
) -> bool:
    """True when the server accepted us; False when it could not be reached; raise when it refused us."""
    try:
        async with asyncio.timeout(within):
            conn = await create_conn(
                host, port, client_id=connection.client_id, request_timeout_ms=int(within * 1000), **options
            )
    except ssl.SSLCertVerificationError as exc:
        raise _verification_error(connection, host, exc) from None
    except ssl.SSLError as exc:
        raise _refused_certificate(connection, _reason(exc)) from None
    except kafka_errors.UnsupportedSaslMechanismError as exc:
        raise SettingsError(f"KAFKA_SASL_MECHANISM: the broker at {host}:{port} does not offer it: {exc}") from None
    except (kafka_errors.SaslAuthenticationFailed, kafka_errors.IllegalSaslStateError) as exc:
        raise SettingsError(
            f"KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD: the broker at {host}:{port} refused user "
            f"{connection.sasl_username!r} with {connection.sasl_mechanism}: {exc}"
        ) from None
    except kafka_errors.KafkaConnectionError as exc:
        if "SSL" in connection.security_protocol and "closed" in str(exc):
            raise _refused_certificate(connection, "the broker closed the connection after the TLS handshake") from None
        return False
    except (OSError, TimeoutError):
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT_S)  # the socket is closed once this resolves
    return True


def _verification_error(connection: KafkaConnection, host: str, exc: ssl.SSLCertVerificationError) -> SettingsError:
    if exc.verify_code in _NAME_MISMATCH_CODES:
        return SettingsError(
            f"KAFKA_SSL_CHECK_HOSTNAME: the broker's certificate is not valid for {host!r} "
            f"({exc.verify_message}); connect by a name on its certificate (KAFKA_BOOTSTRAP_SERVERS) or, "
            "only if you cannot, set KAFKA_SSL_CHECK_HOSTNAME=false"
        )
    trusted = connection.ssl_cafile or "the system's CA store (KAFKA_SSL_CAFILE is not set)"
    return SettingsError(
        f"KAFKA_SSL_CAFILE: the broker's certificate at {host} is not trusted by {trusted}: "
        f"{exc.verify_message}; set KAFKA_SSL_CAFILE to the CA that signed it"
    )


def _refused_certificate(connection: KafkaConnection, why: str) -> SettingsError:
    if connection.ssl_certfile:
        return SettingsError(
            f"KAFKA_SSL_CERTFILE/KAFKA_SSL_KEYFILE: the broker refused the client certificate "
            f"{connection.ssl_certfile} ({why}); it must be signed by a CA the broker trusts"
        )
    return SettingsError(
        f"KAFKA_SSL_CERTFILE/KAFKA_SSL_KEYFILE: the TLS connection failed ({why}); the listener may "
        "require a client certificate (mutual TLS), or may not speak TLS (KAFKA_SECURITY_PROTOCOL)"
    )


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
