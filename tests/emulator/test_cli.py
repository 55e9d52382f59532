"""`python -m ingestor emulator` in a subprocess: prints its address, serves, stops on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_stops_cleanly(signum):
    command = [
        sys.executable,
        "-m",
        "ingestor",
        "emulator",
        "--port",
        "0",
        "--session-ttl",
        "2.5",
        "--fault",
        "latency_s=0.01",
    ]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line.startswith("emulator listening on http://127.0.0.1:")
            url = line.removeprefix("emulator listening on ")
            with urllib.request.urlopen(url + "/_emulator/faults", timeout=10) as response:
                assert json.loads(response.read())["latency_s"] == 0.01
        finally:
            process.send_signal(signum)
            _, stderr = process.communicate(timeout=20)
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr


def test_cli_rejects_bad_settings():
    command = [
        sys.executable,
        "-m",
        "ingestor",
        "emulator",
        "--port",
        "0",
        "--webhook-url",
        "http://x/",
        "--webhook-secret",
        "nope",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "webhook_secret" in result.stdout
