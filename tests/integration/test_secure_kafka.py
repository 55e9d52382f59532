"""The worker, its dead-letter writer and `ingestor dlq replay` against a broker that demands TLS or SASL.

One broker (module scope) listens in every mode at once (ingestor_dev.devkafka's secure listeners): SSL,
SASL_SSL with SCRAM-SHA-256 and SCRAM-SHA-512, SASL_PLAINTEXT with PLAIN, and mutual TLS. The test
itself sets up topics and reads results on the broker's PLAINTEXT listener; the worker and the replay
tool are separate processes configured only through the `KAFKA_*` variables of the mode under test.

The bad cases run `ingestor run` with one thing wrong and expect exit 2 with a message that names the
variable to fix, no traceback, and no password anywhere in the output.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from ingestor import kafka_preflight, settings
from ingestor_dev.devkafka import SECURE_MODES, LocalKafka, create_topic, free_port, produce
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.integration.harness import (
    StripeApi,
    read_topic,
    start_worker_process,
    stop_process,
    wait_for,
    worker_env,
)
from tests.integration.test_pipeline import assert_totals, create_meters, usage

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ingestor_dev.devkafka import SecureListeners

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

GOOD = 300
BAD_VALUE = b"{not json"
START_UP_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def secure_kafka() -> Iterator[LocalKafka]:
    with LocalKafka(secure=True) as broker:
        yield broker


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingestor", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=START_UP_TIMEOUT_S,
        check=False,
    )


async def new_topics(bootstrap: str, mode: str) -> tuple[str, str, str]:
    base = f"secure-{mode}-{secrets.token_hex(4)}"
    topics = (base, f"{base}.dlq", f"{base}.replayed")
    for topic in topics:
        await create_topic(bootstrap, topic, 2)
    return topics


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", list(SECURE_MODES))
async def test_worker_dead_letters_and_replay_in_each_security_mode(secure_kafka, mode, tmp_path):
    plain = secure_kafka.bootstrap
    secure = secure_kafka.secure
    topic, dlq, replayed = await new_topics(plain, mode)
    values, totals = usage(GOOD, seed=len(mode))
    await produce(plain, topic, [*values[: GOOD // 2], BAD_VALUE, *values[GOOD // 2 :]])
    log = tmp_path / "worker.log"
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_ids = await create_meters(api)
        env = {**worker_env(plain, topic, emu.url, INGESTOR_DLQ_TOPIC=dlq), **secure.client_env(mode)}
        assert env["KAFKA_BOOTSTRAP_SERVERS"] != plain  # the worker speaks only the mode under test
        proc = start_worker_process(env, str(log))
        try:

            async def done() -> bool:
                billed = (await api.stats())["events_accepted"] >= GOOD
                return billed and len(await read_topic(plain, dlq)) == 1

            await wait_for(done, 90, f"{GOOD} events billed and one dead letter over {mode}")
        finally:
            code = await asyncio.to_thread(stop_process, proc, signal.SIGTERM, 30)
        assert code == 0, log.read_text()[-3000:]
        await assert_totals(api, meter_ids, totals)
    [letter] = await read_topic(plain, dlq)
    assert letter.value == BAD_VALUE

    replay = await asyncio.to_thread(
        run_cli, ["dlq", "replay", "--from-topic", dlq, "--to-topic", replayed, "--reason", "not_json"], env
    )

    assert replay.returncode == 0, replay.stderr
    assert "replayed 1 of 1 records" in replay.stdout
    assert [r.value for r in await read_topic(plain, replayed)] == [BAD_VALUE]
    output = log.read_text() + replay.stdout + replay.stderr
    assert secure.password not in output


def _wrong_password(secure: SecureListeners, mode: str, wrong: str) -> dict[str, str]:
    return {**secure.client_env(mode), "KAFKA_SASL_PASSWORD_FILE": "", "KAFKA_SASL_PASSWORD": wrong}


def bad_cases(secure: SecureListeners, wrong: str) -> dict[str, tuple[dict[str, str], str]]:
    """Case -> (KAFKA_* settings with one thing wrong, the variable the error must name)."""
    tls = secure.tls
    return {
        "wrong SCRAM-SHA-512 password": (
            _wrong_password(secure, "sasl-ssl-scram-sha-512", wrong),
            "KAFKA_SASL_PASSWORD",
        ),
        "wrong PLAIN password": (_wrong_password(secure, "sasl-plaintext-plain", wrong), "KAFKA_SASL_PASSWORD"),
        "unknown user": (
            {**secure.client_env("sasl-ssl-scram-sha-256"), "KAFKA_SASL_USERNAME": "nobody"},
            "KAFKA_SASL_USERNAME",
        ),
        "a CA that did not sign the broker's certificate": (
            {**secure.client_env("ssl"), "KAFKA_SSL_CAFILE": str(tls.stranger_ca_file)},
            "KAFKA_SSL_CAFILE",
        ),
        "no CA (the system's store does not know the broker's)": (
            {**secure.client_env("sasl-ssl-scram-sha-512"), "KAFKA_SSL_CAFILE": ""},
            "KAFKA_SSL_CAFILE",
        ),
        "a certificate for another host name": (
            {**secure.client_env("ssl"), "KAFKA_BOOTSTRAP_SERVERS": secure.bootstrap("WRONG_HOST")},
            "KAFKA_SSL_CHECK_HOSTNAME",
        ),
        "a client certificate from a CA the broker does not trust": (
            {
                **secure.client_env("mtls"),
                "KAFKA_SSL_CERTFILE": str(tls.stranger_cert),
                "KAFKA_SSL_KEYFILE": str(tls.stranger_key),
            },
            "KAFKA_SSL_CERTFILE",
        ),
        "no client certificate where the listener requires one": (
            {**secure.client_env("ssl"), "KAFKA_BOOTSTRAP_SERVERS": secure.bootstrap("MTLS")},
            "KAFKA_SSL_CERTFILE",
        ),
        "a client key file that does not exist": (
            {**secure.client_env("mtls"), "KAFKA_SSL_KEYFILE": str(tls.directory / "missing.key")},
            "KAFKA_SSL_KEYFILE",
        ),
    }


@pytest.mark.timeout(240)
async def test_refused_tls_or_sasl_settings_stop_start_up_naming_the_variable(secure_kafka, tmp_path):
    secure = secure_kafka.secure
    wrong = f"wrong-{secrets.token_urlsafe(12)}"
    base = worker_env(secure_kafka.bootstrap, "never-read", "http://127.0.0.1:9", INGESTOR_DLQ_TOPIC="never-written")
    failures = []
    for case, (kafka_env, variable) in bad_cases(secure, wrong).items():
        done = await asyncio.to_thread(run_cli, ["run"], {**base, **kafka_env})
        output = done.stdout + done.stderr
        if done.returncode != 2 or variable not in done.stderr or "Traceback" in output:
            failures.append(f"{case}: exit {done.returncode}, expected 2 naming {variable}:\n{output[-1500:]}")
        if secure.password in output or wrong in output:
            failures.append(f"{case}: a password was printed:\n{output[-1500:]}")
    assert not failures, "\n\n".join(failures)


async def test_a_certificate_for_another_host_is_accepted_only_when_host_names_are_not_checked(secure_kafka):
    secure = secure_kafka.secure
    env = {**secure.client_env("ssl"), "KAFKA_BOOTSTRAP_SERVERS": secure.bootstrap("WRONG_HOST")}

    with pytest.raises(settings.SettingsError, match="KAFKA_SSL_CHECK_HOSTNAME"):
        await kafka_preflight.check(settings.load_kafka(env))
    await kafka_preflight.check(settings.load_kafka({**env, "KAFKA_SSL_CHECK_HOSTNAME": "false"}))


async def test_an_unreachable_broker_is_left_to_the_clients_to_report():
    # Nothing listens there: the check neither judges nor hangs; the clients' own retries report it.
    await kafka_preflight.check(settings.load_kafka({"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}))


@pytest.mark.timeout(240)
async def test_replay_and_audit_name_the_refused_setting_too(secure_kafka, tmp_path):
    # `dlq replay` and `audit` open Kafka clients of their own: the same start-up check names what to fix,
    # where aiokafka alone says "Unable to bootstrap".
    secure = secure_kafka.secure
    wrong = f"wrong-{secrets.token_urlsafe(12)}"
    base = worker_env(secure_kafka.bootstrap, "never-read", "http://127.0.0.1:9", INGESTOR_DLQ_TOPIC="never-read.dlq")
    commands = {
        "dlq replay": (["dlq", "replay", "--from-topic", "never-read.dlq", "--to-topic", "never-written"], 1),
        "audit": (["audit", "--from", "0"], 2),
    }
    cases = bad_cases(secure, wrong)
    failures = []
    for case in ("wrong SCRAM-SHA-512 password", "a CA that did not sign the broker's certificate"):
        kafka_env, variable = cases[case]
        for name, (args, status) in commands.items():
            done = await asyncio.to_thread(run_cli, args, {**base, **kafka_env})
            output = done.stdout + done.stderr
            if done.returncode != status or variable not in done.stderr or "Traceback" in output:
                failures.append(
                    f"{name}, {case}: exit {done.returncode}, expected {status} naming {variable}:\n{output[-1500:]}"
                )
            if secure.password in output or wrong in output:
                failures.append(f"{name}, {case}: a password was printed:\n{output[-1500:]}")
    assert not failures, "\n\n".join(failures)
