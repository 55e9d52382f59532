"""A real single-node Kafka broker for the tests, the demo and the benchmarks.

The broker is Apache Kafka's own (``org.apache.kafka:kafka_2.13``), fetched from Maven Central by Maven
through ``scripts/kafka/pom.xml`` and cached outside the repository::

    ${INGESTOR_KAFKA_CACHE:-~/.cache/ingestor/kafka}/<version>/libs/*.jar

It runs in KRaft mode (one process that is both broker and controller) on 127.0.0.1, with its data and
its log (``broker.log``) in a data directory. Ready means a real metadata round trip succeeded.

Library::

    with LocalKafka() as kafka:                       # port 0: a free port
        await create_topic(kafka.bootstrap, "events", 6)
        await produce(kafka.bootstrap, "events", [b"a", b"b"])

Command line (``ingestor kafka ...``): ``fetch``, ``up [--port 9092] [--secure] [--fresh]`` (detached,
recorded in a state file under the cache directory; reuses data ``down --keep-data`` kept),
``down [--keep-data]`` (deletes the broker's data unless told to keep it, and says which), ``status``,
``env MODE`` (the worker's ``KAFKA_*`` settings for a mode, as shell ``export`` lines:
``eval "$(ingestor kafka env mtls)"``), ``create-topic TOPIC... [--partitions N]`` and
``produce TOPIC FILE`` (one record per line of FILE, e.g. JSON lines).

Secure listeners (``LocalKafka(secure=True)``, ``ingestor kafka up --secure``): besides PLAINTEXT, the
same broker listens with every security mode the worker supports, on ports of their own, so that one
broker serves every mode (see ``SECURE_MODES`` and ``client_env``):

- ``SSL``: TLS; the broker's certificate is signed by a CA generated for this broker (``openssl``).
- ``SASL_SSL``: TLS + SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN; the SCRAM user is created in the cluster's
  metadata when the storage is formatted (``kafka-storage format --add-scram``), before the broker starts.
- ``SASL_PLAINTEXT``: PLAIN (user and password in the broker's JAAS configuration).
- ``MTLS``: TLS that requires a client certificate signed by the same CA.
- ``WRONG_HOST``: TLS with a certificate for another host name (``kafka.invalid``), to test
  ``KAFKA_SSL_CHECK_HOSTNAME``.

The TLS material (``TlsMaterial``) also has a second, unrelated CA with a client certificate of its
own: a CA the clients do not know, and a client certificate the broker refuses. Every file is made for
the broker that uses it, in its data directory; nothing is shared between brokers.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import fcntl
import itertools
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, for_code
from aiokafka.partitioner import murmur2

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
    from types import TracebackType

#: The pinned broker release; keep ``kafka.version`` in scripts/kafka/pom.xml in step.
KAFKA_VERSION = "3.9.1"
CACHE_ENV = "INGESTOR_KAFKA_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/ingestor/kafka")
POM_PATH = Path(__file__).resolve().parent.parent / "scripts" / "kafka" / "pom.xml"
COMPLETE_MARKER = ".complete"
STATE_FILE = "broker.json"
DEFAULT_CLI_PORT = 9092
HOST = "127.0.0.1"

T = TypeVar("T")

#: Brokers left running on purpose; kept so that Python neither warns about them nor loses the handle
#: that reaps them if this same process stops them later (as the tests do).
_DETACHED: list[subprocess.Popen[bytes]] = []

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
FORMAT_TIMEOUT_S = 60.0
FETCH_TIMEOUT_S = 600.0
TOPIC_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 5.0
RETRY_PAUSE_S = 0.2
LOG_TAIL_LINES = 40
MAVEN_ERROR_LINES = 5

BROKER_JVM_OPTS = ("-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20")
#: The storage tool lives for a second: a small heap and the quick JIT tier start it faster.
TOOL_JVM_OPTS = ("-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")

#: Produce in batches of about this size (the broker accepts up to ~1 MiB per batch).
PRODUCE_BATCH_BYTES = 512 * 1024
#: Batches submitted before waiting for their acknowledgements (bounds memory while producing).
PRODUCE_WINDOW = 64

BROKER_SETTINGS: dict[str, str] = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "num.partitions": "1",
    "auto.create.topics.enable": "false",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "10",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "10",
    "group.initial.rebalance.delay.ms": "0",
    "broker.heartbeat.interval.ms": "500",
}

LOG4J_PROPERTIES = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
"""


class KafkaFetchError(RuntimeError):
    """Maven could not fetch the broker's jars (not retried here: the next ``fetch()`` tries again)."""


class KafkaStartError(RuntimeError):
    """The broker did not start or did not become ready; the message ends with its log's tail."""


# --- fetching ---------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def libs_dir(version: str = KAFKA_VERSION) -> Path:
    return cache_dir() / version / "libs"


def fetch(version: str = KAFKA_VERSION) -> Path:
    """Return the directory of the broker's jars, running Maven only when they are not cached yet."""
    libs = libs_dir(version)
    if (libs / COMPLETE_MARKER).is_file():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with _locked(libs.parent / ".fetch.lock"):
        if not (libs / COMPLETE_MARKER).is_file():  # another process may have fetched meanwhile
            _fetch_with_maven(version, libs)
    return libs


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_with_maven(version: str, libs: Path) -> None:
    partial = libs.with_name(f"libs.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    command = [
        _executable("mvn", "Maven"),
        *("-q", "-B", "-Dstyle.color=never", "-f", str(_pom_path())),
        "dependency:copy-dependencies",
        f"-Dkafka.version={version}",
        f"-DoutputDirectory={partial}",
    ]
    print(f"fetching Apache Kafka {version} from Maven Central into {libs}", file=sys.stderr)
    done = subprocess.run(  # noqa: S603 - a fixed command line
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S, check=False
    )
    if done.returncode != 0 or not (partial / f"kafka_2.13-{version}.jar").is_file():
        shutil.rmtree(partial, ignore_errors=True)
        raise KafkaFetchError(
            f"`{' '.join(command)}` failed (exit {done.returncode}):\n{_maven_errors(done.stdout + done.stderr)}"
        )
    shutil.rmtree(libs, ignore_errors=True)  # what a failed earlier attempt left, if anything
    partial.rename(libs)
    (libs / COMPLETE_MARKER).write_text(f"{version}\n")


def _maven_errors(output: str) -> str:
    """Maven's own error lines (the first says what failed), without its generic advice."""
    errors = [line[line.index("[ERROR]") :] for line in output.splitlines() if "[ERROR]" in line]
    first_block = list(itertools.takewhile(lambda line: line[7:].strip(), errors))
    return "\n".join(first_block[:MAVEN_ERROR_LINES]) or _tail(output)


def _pom_path() -> Path:
    if not POM_PATH.is_file():
        raise KafkaFetchError(f"{POM_PATH} is missing: fetch from a checkout of the ingestor repository")
    return POM_PATH


def _executable(name: str, what: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{what} (`{name}`) is not on PATH; it is needed to run a local Kafka")
    return found


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    return _executable("java", "Java 17 or later")


# --- the broker -------------------------------------------------------------------------------------


class LocalKafka:
    """One running KRaft broker+controller on 127.0.0.1; start once, ``stop()`` any number of times."""

    def __init__(
        self, port: int = 0, data_dir: Path | None = None, *, version: str = KAFKA_VERSION, secure: bool = False
    ) -> None:
        self.port = port or free_port()
        self.bootstrap = f"{HOST}:{self.port}"
        self.version = version
        self.with_secure_listeners = secure
        self._secure: SecureListeners | None = None
        self._given_data_dir = data_dir
        self._data_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog: _Watchdog | None = None
        self._started = False

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("the broker has not been started")
        return self._data_dir

    @property
    def secure(self) -> SecureListeners:
        """The secure listeners (``LocalKafka(secure=True)`` only), once started."""
        if self._secure is None:
            raise RuntimeError("the broker has no secure listeners (start it with secure=True)")
        return self._secure

    @property
    def log_path(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the broker and block until it answers a metadata request (at most ``timeout`` s)."""
        # A thread of its own, so that neither a running event loop nor the caller's is touched.
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self.astart(timeout))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                failure.append(exc)

        thread = threading.Thread(target=run, name="local-kafka-start")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]

    async def astart(self, ready_within: float = START_TIMEOUT_S) -> None:
        if self._started:
            raise RuntimeError("a LocalKafka starts once; make a new one")
        self._started = True
        deadline = time.monotonic() + ready_within
        try:
            await asyncio.to_thread(self._launch)
            await self._wait_ready(deadline)
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after a deadline) and remove a data dir it made."""
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if self._watchdog is not None:
            self._watchdog.release()
        if process is not None:
            _terminate(process, STOP_TIMEOUT_S)
        if self._given_data_dir is None and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)

    def detach(self) -> int:
        """Leave the broker running after this process exits (``ingestor kafka up``); return its pid."""
        if self._process is None:
            raise RuntimeError("the broker is not running")
        _DETACHED.append(self._process)
        self._process = None
        if self._watchdog is not None:
            self._watchdog.release()
        atexit.unregister(self.stop)
        return _DETACHED[-1].pid

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    def _launch(self) -> None:
        _ensure_port_free(self.port)
        libs = fetch(self.version)
        self._data_dir = self._given_data_dir or Path(tempfile.mkdtemp(prefix="ingestor-kafka-"))
        self._data_dir.mkdir(parents=True, exist_ok=True)
        controller_port = free_port()
        if self.with_secure_listeners:
            self._secure = SecureListeners.create(self._data_dir / "tls")
        properties = self._data_dir / "server.properties"
        properties.write_text(_server_properties(self.port, controller_port, self._data_dir / "kraft", self._secure))
        (self._data_dir / "log4j.properties").write_text(LOG4J_PROPERTIES)
        self._format_storage(libs, properties)
        command = [*self._java_command(libs, BROKER_JVM_OPTS), "kafka.Kafka", str(properties)]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - a fixed command line
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        atexit.register(self.stop)
        self._watchdog = _Watchdog(self._process.pid, None if self._given_data_dir else self._data_dir)

    def _format_storage(self, libs: Path, properties: Path) -> None:
        tool = "kafka.tools.StorageTool"
        cluster = _formatted_cluster_id(self.data_dir / "kraft") or _cluster_id()  # kept data keeps its id
        command = [*self._java_command(libs, TOOL_JVM_OPTS), tool, "format", "-t", cluster]
        command += ["-c", str(properties), "--ignore-formatted"]
        if self._secure is not None:
            command += self._secure.storage_arguments()
        done = subprocess.run(  # noqa: S603 - a fixed command line
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=FORMAT_TIMEOUT_S, check=False
        )
        if done.returncode != 0:
            raise KafkaStartError(f"{tool} format failed (exit {done.returncode}):\n{_tail(done.stdout + done.stderr)}")

    def _java_command(self, libs: Path, jvm_opts: Sequence[str]) -> list[str]:
        return [
            _java(),
            *jvm_opts,
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            f"{libs}/*",
        ]

    async def _wait_ready(self, deadline: float) -> None:
        while True:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise KafkaStartError(f"the Kafka broker exited with code {code}{self._log_tail()}")
            if await probe(self.bootstrap, min(PROBE_TIMEOUT_S, max(deadline - time.monotonic(), 0.1))):
                return
            if time.monotonic() >= deadline:
                raise KafkaStartError(f"the Kafka broker at {self.bootstrap} is not ready in time{self._log_tail()}")
            await asyncio.sleep(RETRY_PAUSE_S)

    def _log_tail(self) -> str:
        if self._data_dir is None or not self.log_path.is_file():
            return ""
        log = self.log_path.read_text(errors="replace")
        return f"; the last lines of its log ({self.log_path.name}):\n{_tail(log)}"


class _Watchdog:
    """Stops the broker if this process dies without stopping it (SIGKILL, a CI timeout, a crash).

    A small Python process blocks reading a pipe whose only writer is this process: end of file without
    a "release" line first means the owner is gone, so it stops the broker's process group and removes
    the temporary data directory, if any.
    """

    SCRIPT = """
import os, shutil, signal, sys, time
group, grace, data_dir = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if sys.stdin.readline().strip() != "release":
    try:
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            time.sleep(0.2)
            os.killpg(group, 0)
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if data_dir:
        shutil.rmtree(data_dir, ignore_errors=True)
"""

    def __init__(self, broker_pid: int, temporary_dir: Path | None) -> None:
        temporary = "" if temporary_dir is None else str(temporary_dir)
        command = [sys.executable, "-c", self.SCRIPT, str(broker_pid), str(STOP_TIMEOUT_S), temporary]
        self._process = subprocess.Popen(  # noqa: S603 - a fixed command line
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C for the owner must not end the watchdog
        )

    def release(self) -> None:
        """The owner stops (or detaches) the broker itself: the watchdog leaves without a signal."""
        if self._process.stdin is not None and not self._process.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self._process.stdin.write(b"release\n")
                self._process.stdin.close()
        self._process.wait()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _ensure_port_free(port: int) -> None:
    """Whether the broker could listen on `port`: bound as the broker binds (SO_REUSEADDR), so that the
    connections a stopped broker leaves in TIME_WAIT do not count as "in use" (they do not stop it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            raise KafkaStartError(f"port {HOST}:{port} is already in use: {exc}") from exc


def _server_properties(port: int, controller_port: int, log_dir: Path, secure: SecureListeners | None = None) -> str:
    listeners = {"PLAINTEXT": port, **(secure.ports if secure else {})}
    protocols = {"PLAINTEXT": "PLAINTEXT", "CONTROLLER": "PLAINTEXT", **(LISTENER_PROTOCOLS if secure else {})}
    advertised = ",".join(f"{name}://{HOST}:{number}" for name, number in listeners.items())
    settings = {
        **BROKER_SETTINGS,
        "listeners": f"{advertised},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": advertised,
        "listener.security.protocol.map": ",".join(f"{name}:{protocol}" for name, protocol in protocols.items()),
        "controller.quorum.voters": f"1@{HOST}:{controller_port}",
        "log.dirs": str(log_dir),
        **(secure.broker_settings() if secure else {}),
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


# --- secure listeners -------------------------------------------------------------------------------

#: Listener name -> security protocol. The listener names are this module's; clients see only ports.
LISTENER_PROTOCOLS: dict[str, str] = {
    "SSL": "SSL",
    "SASL_SSL": "SASL_SSL",
    "SASL_PLAINTEXT": "SASL_PLAINTEXT",
    "MTLS": "SSL",
    "WRONG_HOST": "SSL",
}
#: Client modes (``client_env``, ``ingestor kafka env``) -> (listener, SASL mechanism or "").
SECURE_MODES: dict[str, tuple[str, str]] = {
    "ssl": ("SSL", ""),
    "sasl-ssl-scram-sha-256": ("SASL_SSL", "SCRAM-SHA-256"),
    "sasl-ssl-scram-sha-512": ("SASL_SSL", "SCRAM-SHA-512"),
    "sasl-ssl-plain": ("SASL_SSL", "PLAIN"),
    "sasl-plaintext-plain": ("SASL_PLAINTEXT", "PLAIN"),
    "mtls": ("MTLS", ""),
}
SASL_USER = "ingestor"
#: The host name on the WRONG_HOST listener's certificate (a reserved name that never resolves).
WRONG_HOST_NAME = "kafka.invalid"
CERT_DAYS = 2
OPENSSL_TIMEOUT_S = 30.0
SCRAM_ITERATIONS = 4096


@dataclass(frozen=True)
class TlsMaterial:
    """PEM files made for one broker: its CA, its certificates, a client's, and a stranger's."""

    directory: Path

    @property
    def ca_file(self) -> Path:
        """The CA that signed the broker's and the client's certificates (clients trust it)."""
        return self.directory / "ca.pem"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    @property
    def stranger_ca_file(self) -> Path:
        """A CA unrelated to the broker: trusting it instead of ``ca_file`` fails verification."""
        return self.directory / "stranger-ca.pem"

    @property
    def stranger_cert(self) -> Path:
        """A client certificate signed by the stranger CA: the MTLS listener refuses it."""
        return self.directory / "stranger-client.pem"

    @property
    def stranger_key(self) -> Path:
        return self.directory / "stranger-client.key"

    @property
    def broker_keystore(self) -> Path:
        """The broker's key and certificate (for 127.0.0.1 and localhost), PEM, as Kafka reads them."""
        return self.directory / "broker-keystore.pem"

    @property
    def wrong_host_keystore(self) -> Path:
        """A key and certificate for ``WRONG_HOST_NAME``, signed by the same CA."""
        return self.directory / "wrong-host-keystore.pem"

    @classmethod
    def generate(cls, directory: Path) -> TlsMaterial:
        """Make every file with ``openssl`` (EC P-256 keys, valid for ``CERT_DAYS`` days)."""
        directory.mkdir(parents=True, exist_ok=True)
        tls = cls(directory)
        _openssl_ca(directory / "ca", "ingestor test CA")
        _openssl_ca(directory / "stranger-ca", "unrelated test CA")
        san = f"DNS:localhost,IP:{HOST}"
        _openssl_leaf(directory / "broker", directory / "ca", "broker", san, "serverAuth")
        _openssl_leaf(
            directory / "wrong-host", directory / "ca", WRONG_HOST_NAME, f"DNS:{WRONG_HOST_NAME}", "serverAuth"
        )
        _openssl_leaf(directory / "client", directory / "ca", "ingestor-client", "DNS:ingestor-client", "clientAuth")
        stranger = directory / "stranger-client"
        _openssl_leaf(stranger, directory / "stranger-ca", "stranger", "DNS:stranger", "clientAuth")
        for leaf, keystore in (("broker", tls.broker_keystore), ("wrong-host", tls.wrong_host_keystore)):
            keystore.write_text((directory / f"{leaf}.key").read_text() + (directory / f"{leaf}.pem").read_text())
            keystore.chmod(0o600)
        return tls


def _openssl(*args: str) -> None:
    command = [_executable("openssl", "OpenSSL"), *args]
    done = subprocess.run(  # noqa: S603 - a fixed command line
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise KafkaStartError(f"`{' '.join(command)}` failed (exit {done.returncode}):\n{_tail(done.stderr)}")


def _openssl_key(key: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    key.chmod(0o600)


def _openssl_ca(stem: Path, name: str) -> None:
    key = stem.with_suffix(".key")
    _openssl_key(key)
    _openssl(
        *("req", "-x509", "-new", "-key", str(key), "-out", str(stem.with_suffix(".pem"))),
        *("-days", str(CERT_DAYS), "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )


def _openssl_leaf(stem: Path, ca: Path, name: str, san: str, usage: str) -> None:
    key, csr, extensions = stem.with_suffix(".key"), stem.with_suffix(".csr"), stem.with_suffix(".ext")
    _openssl_key(key)
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    extensions.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
    _openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(ca.with_suffix(".pem")), "-CAkey", str(ca.with_suffix(".key"))),
        *("-CAcreateserial", "-out", str(stem.with_suffix(".pem")), "-days", str(CERT_DAYS)),
        *("-extfile", str(extensions)),
    )
    csr.unlink()
    extensions.unlink()


@dataclass(frozen=True)
class SecureListeners:
    """The secure listeners of one broker: their ports, the TLS material and the SASL user."""

    ports: dict[str, int]
    tls: TlsMaterial
    username: str = SASL_USER
    password: str = field(default="", repr=False)

    @classmethod
    def create(cls, directory: Path) -> SecureListeners:
        password = secrets.token_urlsafe(18)
        ports = {name: free_port() for name in LISTENER_PROTOCOLS}
        listeners = cls(ports, TlsMaterial.generate(directory), SASL_USER, password)
        listeners.password_file.write_text(password + "\n")
        listeners.password_file.chmod(0o600)
        return listeners

    @property
    def password_file(self) -> Path:
        return self.tls.directory / "sasl-password"

    def bootstrap(self, listener: str) -> str:
        return f"{HOST}:{self.ports[listener]}"

    def broker_settings(self) -> dict[str, str]:
        tls = self.tls
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        plain = (
            f'org.apache.kafka.common.security.plain.PlainLoginModule required user_{self.username}="{self.password}";'
        )
        return {
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(tls.broker_keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(tls.ca_file),
            "ssl.client.auth": "none",
            "listener.name.mtls.ssl.client.auth": "required",
            "listener.name.wrong_host.ssl.keystore.location": str(tls.wrong_host_keystore),
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": "SCRAM-SHA-256,SCRAM-SHA-512,PLAIN",
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": scram,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": scram,
            "listener.name.sasl_ssl.plain.sasl.jaas.config": plain,
            "listener.name.sasl_plaintext.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": plain,
        }

    def storage_arguments(self) -> list[str]:
        """``kafka-storage format`` arguments that create the SCRAM user for both mechanisms."""
        credentials = f"name={self.username},password={self.password},iterations={SCRAM_ITERATIONS}"
        return [arg for m in ("SCRAM-SHA-256", "SCRAM-SHA-512") for arg in ("--add-scram", f"{m}=[{credentials}]")]

    def client_env(self, mode: str) -> dict[str, str]:
        """The worker's ``KAFKA_*`` settings to connect in ``mode`` (a key of ``SECURE_MODES``)."""
        listener, mechanism = SECURE_MODES[mode]
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap(listener),
            "KAFKA_SECURITY_PROTOCOL": LISTENER_PROTOCOLS[listener],
        }
        if "SSL" in env["KAFKA_SECURITY_PROTOCOL"]:
            env["KAFKA_SSL_CAFILE"] = str(self.tls.ca_file)
        if mechanism:
            env["KAFKA_SASL_MECHANISM"] = mechanism
            env["KAFKA_SASL_USERNAME"] = self.username
            env["KAFKA_SASL_PASSWORD_FILE"] = str(self.password_file)
        if listener == "MTLS":
            env["KAFKA_SSL_CERTFILE"] = str(self.tls.client_cert)
            env["KAFKA_SSL_KEYFILE"] = str(self.tls.client_key)
        return env


def _cluster_id() -> str:
    """A random cluster id in Kafka's form: 16 bytes, URL-safe base64, no padding, not starting with '-'."""
    while True:
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _formatted_cluster_id(log_dir: Path) -> str | None:
    """The cluster id of storage formatted before (data kept by `down --keep-data`), if any."""
    try:
        text = (log_dir / "meta.properties").read_text()
    except OSError:
        return None
    return next((line.partition("=")[2].strip() for line in text.splitlines() if line.startswith("cluster.id=")), None)


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)  # the broker leads its own session and process group


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(deque(text.splitlines(), maxlen=lines))


# --- client helpers ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _admin(bootstrap: str, request_timeout: float = 30.0) -> AsyncIterator[Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(request_timeout * 1000))
    try:
        await admin.start()
        yield admin
    finally:
        await admin.close()


async def probe(bootstrap: str, within: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a broker at ``bootstrap`` answers a metadata request within ``within`` seconds."""
    host, _, port = bootstrap.rpartition(":")
    try:
        async with asyncio.timeout(within):
            # A plain connect first: aiokafka logs an error for every refused connection.
            _, writer = await asyncio.open_connection(host, int(port))
            writer.close()
            await writer.wait_closed()
            async with _admin(bootstrap, within) as admin:
                await admin.list_topics()
    except (KafkaError, OSError, TimeoutError):
        return False
    return True


async def _retrying(call: Callable[[], Awaitable[T]], within: float = TOPIC_TIMEOUT_S) -> T:
    """Retry ``call`` while it fails with a retriable Kafka error, for up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except KafkaError as exc:
            if not exc.retriable or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(RETRY_PAUSE_S)


async def create_topic(
    bootstrap: str,
    name: str,
    partitions: int,
    *,
    config: dict[str, str] | None = None,
) -> None:
    """Create a topic and wait until its metadata shows every partition with a leader."""
    topic = NewTopic(name, num_partitions=partitions, replication_factor=1, topic_configs=config or {})
    async with _admin(bootstrap) as admin:

        async def create() -> None:
            response = await admin.create_topics([topic])
            for _, error_code, *_ in response.topic_errors:
                if error_code:
                    raise for_code(error_code)(f"cannot create topic {name!r}")

        await _retrying(create)
        deadline = time.monotonic() + TOPIC_TIMEOUT_S
        while not _topic_ready(await admin.describe_topics([name]), partitions):
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"topic {name!r} has no leader for all {partitions} partitions after {TOPIC_TIMEOUT_S} s"
                )
            await asyncio.sleep(RETRY_PAUSE_S / 4)


def _topic_ready(described: list[dict[str, Any]], partitions: int) -> bool:
    if len(described) != 1 or described[0]["error_code"]:
        return False
    found = described[0]["partitions"]
    return len(found) == partitions and all(p["error_code"] == 0 and p["leader"] >= 0 for p in found)


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The consumer group's committed offsets on ``topic``: partition -> next offset to consume."""
    async with _admin(bootstrap) as admin:
        offsets = await _retrying(lambda: admin.list_consumer_group_offsets(group))
    return {tp.partition: int(meta.offset) for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}


async def produce(  # noqa: PLR0913 - keyword-only options of one call
    bootstrap: str,
    topic: str,
    values: Sequence[bytes | None],
    *,
    keys: Sequence[bytes | None] | None = None,
    partition: int | None = None,
    headers: Sequence[tuple[str, bytes]] = (),
) -> int:
    """Produce ``values`` (with ``keys``, if given) quickly, and return how many were acknowledged.

    Records go in whole batches straight to their partition: ``partition`` if given, else the key's
    (murmur2, as Kafka's default partitioner places it), else round robin. Order is kept per partition.
    """
    if keys is not None and len(keys) != len(values):
        raise ValueError(f"{len(keys)} keys for {len(values)} values")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=PRODUCE_BATCH_BYTES, linger_ms=50)
    await producer.start()
    try:
        chosen = _partitioner(sorted(await producer.partitions_for(topic)), partition)
        batcher = _Batcher(producer, topic, list(headers))
        for index, value in enumerate(values):
            key = None if keys is None else keys[index]
            await batcher.add(chosen(index, key), key, value)
        await batcher.flush()
    finally:
        await producer.stop()
    return len(values)


class _Batcher:
    """Fills one batch per partition, hands full ones to the producer, and keeps a bounded window."""

    def __init__(self, producer: Any, topic: str, headers: list[tuple[str, bytes]]) -> None:
        self._producer = producer
        self._topic = topic
        self._headers = headers
        self._open: dict[int, Any] = {}
        self._sent: list[asyncio.Future[Any]] = []

    async def add(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        batch = self._open.get(partition)
        if batch is not None and self._append(batch, key, value):
            return
        if batch is not None:
            await self._send(partition, batch)
        batch = self._open[partition] = self._producer.create_batch()
        if not self._append(batch, key, value):
            raise ValueError(f"a record of {len(value or b'')} bytes does not fit in a batch")

    async def flush(self) -> None:
        for partition, batch in self._open.items():
            self._sent.append(await self._producer.send_batch(batch, self._topic, partition=partition))
        self._open.clear()
        await asyncio.gather(*self._sent)
        self._sent.clear()

    def _append(self, batch: Any, key: bytes | None, value: bytes | None) -> bool:
        return batch.append(key=key, value=value, timestamp=None, headers=self._headers) is not None

    async def _send(self, partition: int, batch: Any) -> None:
        self._sent.append(await self._producer.send_batch(batch, self._topic, partition=partition))
        if len(self._sent) >= PRODUCE_WINDOW:
            await asyncio.gather(*self._sent)
            self._sent.clear()


def _partitioner(all_partitions: list[int], fixed: int | None) -> Callable[[int, bytes | None], int]:
    by_key: dict[bytes, int] = {}  # murmur2 is pure Python; keys (customers) repeat

    def choose(index: int, key: bytes | None) -> int:
        if fixed is not None:
            return fixed
        if key is None:
            return all_partitions[index % len(all_partitions)]
        found = by_key.get(key)
        if found is None:
            hashed: int = murmur2(key)
            found = by_key[key] = all_partitions[(hashed & 0x7FFFFFFF) % len(all_partitions)]
        return found

    return choose


# --- the command line: ingestor kafka fetch|up|down|status ------------------------------------------


@dataclass(frozen=True)
class BrokerState:
    """What ``ingestor kafka up`` records about the broker it left running."""

    pid: int
    port: int
    bootstrap: str
    data_dir: str
    version: str
    #: ``up --secure`` only: mode -> the worker's ``KAFKA_*`` settings for it (no password: a file).
    secure_env: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls) -> BrokerState | None:
        try:
            return cls(**json.loads(_state_path().read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def save(self) -> None:
        _state_path().parent.mkdir(parents=True, exist_ok=True)
        _state_path().write_text(json.dumps(asdict(self), indent=2) + "\n")

    def is_running(self) -> bool:
        """Whether our broker still runs under that pid (not a zombie, not another program)."""
        proc = Path(f"/proc/{self.pid}")
        if not proc.exists():
            return _pid_exists(self.pid) and sys.platform != "linux"
        try:
            zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            return False
        return not zombie and "kafka.Kafka" in cmdline and self.data_dir in cmdline


def _state_path() -> Path:
    return cache_dir() / STATE_FILE


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def configure_parser(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="kafka_action", metavar="ACTION", required=True)
    actions.add_parser("fetch", help=f"fetch Apache Kafka {KAFKA_VERSION} into {cache_dir()} (once)")
    up = actions.add_parser("up", help="start a broker in the background and wait until it is ready")
    up.add_argument("--port", type=int, default=DEFAULT_CLI_PORT, help="port on 127.0.0.1 (default: %(default)s)")
    up.add_argument("--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait for readiness")
    up.add_argument(
        "--secure",
        action="store_true",
        help="also listen with TLS, SASL and mutual TLS on other ports (see `ingestor kafka env`)",
    )
    up.add_argument("--fresh", action="store_true", help="delete the data `down --keep-data` kept, if any")
    down = actions.add_parser(
        "down", help="stop the broker started by `up` and delete its data (nothing to do is not an error)"
    )
    down.add_argument("--keep-data", action="store_true", help="keep its topics, records and offsets for the next `up`")
    topic = actions.add_parser("create-topic", help="create topics (an existing one is left as it is)")
    topic.add_argument("names", nargs="+", metavar="TOPIC")
    topic.add_argument("--partitions", type=int, default=1, help="partitions per topic (default: %(default)s)")
    send = actions.add_parser("produce", help="produce a file of JSON lines to a topic, one record per line")
    send.add_argument("topic", metavar="TOPIC")
    send.add_argument("file", metavar="FILE", help="one record value per line; - reads standard input")
    for client in (topic, send):
        client.add_argument(
            "--bootstrap-servers",
            default="",
            help=f"default: $KAFKA_BOOTSTRAP_SERVERS, else the broker `up` started, else {HOST}:{DEFAULT_CLI_PORT}",
        )
    actions.add_parser("status", help="say whether the broker started by `up` runs (exit 1 if not)")
    env = actions.add_parser(
        "env", help="print the KAFKA_* settings to reach the broker started by `up --secure` in MODE"
    )
    env.add_argument("mode", choices=["plaintext", *SECURE_MODES], metavar="MODE", help=", ".join(SECURE_MODES))


def main(args: argparse.Namespace) -> int:
    actions: dict[str, Callable[[argparse.Namespace], int]] = {
        "fetch": _cli_fetch,
        "up": _cli_up,
        "down": _cli_down,
        "status": _cli_status,
        "env": _cli_env,
        "create-topic": _cli_create_topic,
        "produce": _cli_produce,
    }
    try:
        return actions[args.kafka_action](args)
    except (KafkaFetchError, KafkaStartError, KafkaError, OSError) as exc:
        print(f"ingestor kafka {args.kafka_action}: {exc}", file=sys.stderr)
        return 1


def _cli_fetch(_: argparse.Namespace) -> int:
    print(fetch())
    return 0


def _cli_up(args: argparse.Namespace) -> int:
    state = BrokerState.load()
    if state is not None and state.is_running():
        print(f"Kafka is already running at {state.bootstrap} (pid {state.pid})", file=sys.stderr)
        print(state.bootstrap)
        return 0
    _forget(state, keep_data=True)
    data_dir = cache_dir() / "run" / f"broker-{args.port}"
    kept = (data_dir / "kraft").is_dir() and not args.fresh
    if kept:
        print(f"reusing the data kept by `down --keep-data` in {data_dir} (`up --fresh` deletes it)", file=sys.stderr)
    else:
        shutil.rmtree(data_dir, ignore_errors=True)
    broker = LocalKafka(args.port, data_dir, secure=args.secure)
    started = time.monotonic()
    try:
        broker.start(args.timeout)
    except BaseException:
        if not kept:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    secure_env = {mode: broker.secure.client_env(mode) for mode in SECURE_MODES} if args.secure else {}
    state = BrokerState(broker.detach(), broker.port, broker.bootstrap, str(data_dir), broker.version, secure_env)
    state.save()
    took = time.monotonic() - started
    where = f"pid {state.pid}, log {broker.log_path}"
    print(f"Kafka {state.version} is up at {state.bootstrap} in {took:.1f} s ({where})", file=sys.stderr)
    if state.secure_env:
        ports = ", ".join(f"{mode} {env['KAFKA_BOOTSTRAP_SERVERS']}" for mode, env in state.secure_env.items())
        print(f"secure listeners: {ports}; settings: `ingestor kafka env MODE`", file=sys.stderr)
    print(state.bootstrap)
    return 0


def _cli_down(args: argparse.Namespace) -> int:
    state = BrokerState.load()
    if state is None:
        print("no local Kafka broker is recorded", file=sys.stderr)
        return 0
    if state.is_running():
        _signal_group(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while state.is_running() and time.monotonic() < deadline:
            time.sleep(RETRY_PAUSE_S)
        if state.is_running():
            _signal_group(state.pid, signal.SIGKILL)
        for process in _DETACHED:
            process.poll()
        print(f"stopped Kafka at {state.bootstrap} (pid {state.pid})", file=sys.stderr)
    _forget(state, keep_data=args.keep_data)
    if args.keep_data:
        print(f"kept its data in {state.data_dir}: the next `up` on port {state.port} reuses it", file=sys.stderr)
    else:
        print(
            f"deleted its data in {state.data_dir}: every topic, record and committed offset "
            "(`down --keep-data` keeps them)",
            file=sys.stderr,
        )
    return 0


def _cli_status(_: argparse.Namespace) -> int:
    state = BrokerState.load()
    if state is None or not state.is_running():
        print("no local Kafka broker is running")
        return 1
    ready = asyncio.run(probe(state.bootstrap))
    print(f"Kafka {state.version} at {state.bootstrap} (pid {state.pid}): {'ready' if ready else 'not answering'}")
    return 0 if ready else 1


def _cli_env(args: argparse.Namespace) -> int:
    state = BrokerState.load()
    if state is None or not state.is_running():
        print("no local Kafka broker is running; start one with `ingestor kafka up --secure`", file=sys.stderr)
        return 1
    if args.mode == "plaintext":
        env = {"KAFKA_BOOTSTRAP_SERVERS": state.bootstrap, "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}
    elif args.mode in state.secure_env:
        env = state.secure_env[args.mode]
    else:
        print(
            "the running broker has no secure listeners; restart it with `ingestor kafka up --secure`", file=sys.stderr
        )
        return 1
    print("\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items()))
    return 0


def _forget(state: BrokerState | None, *, keep_data: bool = False) -> None:
    if state is not None and not keep_data:
        shutil.rmtree(state.data_dir, ignore_errors=True)
    _state_path().unlink(missing_ok=True)


def _bootstrap(args: argparse.Namespace) -> str:
    """--bootstrap-servers, else $KAFKA_BOOTSTRAP_SERVERS, else the broker `up` started, else the default port."""
    if args.bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip():
        return str(args.bootstrap_servers or os.environ["KAFKA_BOOTSTRAP_SERVERS"].strip())
    state = BrokerState.load()
    return state.bootstrap if state is not None and state.is_running() else f"{HOST}:{DEFAULT_CLI_PORT}"


def _cli_create_topic(args: argparse.Namespace) -> int:
    bootstrap = _bootstrap(args)
    existing = asyncio.run(_topics(bootstrap))
    for name in args.names:
        if name in existing:
            print(f"topic {name} already exists at {bootstrap}", file=sys.stderr)
            continue
        asyncio.run(create_topic(bootstrap, name, args.partitions))
        print(f"created topic {name} ({args.partitions} partitions) at {bootstrap}", file=sys.stderr)
    return 0


async def _topics(bootstrap: str) -> set[str]:
    async with _admin(bootstrap) as admin:
        return set(await admin.list_topics())


def _cli_produce(args: argparse.Namespace) -> int:
    """Each non-blank line of the file is one record's value, sent as it is (a bad one is dead-lettered)."""
    stream = sys.stdin.buffer if args.file == "-" else Path(args.file).open("rb")  # noqa: SIM115 - closed below
    with stream:
        values = [line.rstrip(b"\r\n") for line in stream if line.strip()]
    bootstrap = _bootstrap(args)
    produced = asyncio.run(produce(bootstrap, args.topic, values))
    print(f"produced {produced} records to {args.topic} at {bootstrap}", file=sys.stderr)
    return 0
