"""The README's "Try it with your own events" runs as written, against the real broker and the emulator.

Its fenced blocks are run by bash in order, in a scratch directory whose `.venv` is this one. The test stands
in for the two services the first block starts (`make kafka-up`, `ingestor emulator --port 12111 &`): it
drops those two lines and points the block's addresses at the session's broker and an emulator of its own.
The worker's block (`ingestor run`, stopped with Ctrl-C) runs in the background and gets a SIGINT at the end.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ingestor_dev.emulator import Emulator, EmulatorConfig

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Try it with your own events"
STEP_LIMIT_S = 60.0


def blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def adapt(block: str, bootstrap: str, emulator_url: str) -> str:
    kept = [
        line
        for line in block.splitlines()
        if not line.startswith("make kafka-up") and "ingestor emulator --port 12111 &" not in line
    ]
    script = "\n".join(kept)
    return script.replace("127.0.0.1:9092", bootstrap).replace("http://127.0.0.1:12111", emulator_url)


def bash(script: str, cwd: Path) -> str:
    done = subprocess.run(
        ["/bin/bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=STEP_LIMIT_S,
        check=False,
        env={**os.environ, "INGESTOR_KAFKA_CACHE": str(cwd / "kafka-cache")},
    )
    assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    return done.stdout + done.stderr


def start_in_background(script: str, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["/bin/bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def exports(block: str) -> str:
    """The first block's `export` statement (continued lines included): every later shell needs it."""
    match = re.search(r"^export .*?(?<!\\)\n", block, flags=re.DOTALL | re.MULTILINE)
    assert match is not None
    return match.group(0)


def until(script: str, cwd: Path, expected: str) -> str:
    """Run `script` until its output contains `expected` (bounded)."""
    deadline = time.monotonic() + STEP_LIMIT_S
    while True:
        out = bash(script, cwd)
        if expected in out or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


async def test_the_walkthrough_runs_as_written(kafka_bootstrap: str, tmp_path: Path) -> None:
    setup, run, check, fix = blocks()
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    async with Emulator(EmulatorConfig(), host="127.0.0.1", port=0) as emu:
        first = adapt(setup, kafka_bootstrap, emu.url)
        env_lines = exports(first)
        out = await _in_thread(bash, first, tmp_path)
        assert "produced 4 records to my-events" in out
        assert "auto -> 25 (a test key)" in out
        worker = start_in_background(env_lines + adapt(run, kafka_bootstrap, emu.url), tmp_path)
        try:
            lines = adapt(check, kafka_bootstrap, emu.url).splitlines()
            billed = await _in_thread(until, env_lines + lines[0], tmp_path, "api_calls cus_alice 7")
            assert "api_calls cus_alice 7" in billed
            dry = await _in_thread(until, env_lines + lines[1], tmp_path, "meter_unknown: 1")
            assert "meter_unknown: 1" in dry
            fixed = adapt(fix, kafka_bootstrap, emu.url).splitlines()
            await _in_thread(bash, env_lines + "\n".join(fixed[:2]), tmp_path)
            total = await _in_thread(until, env_lines + fixed[2], tmp_path, "storage_gb cus_bob 2")
            assert "storage_gb cus_bob 2" in total
        finally:
            os.killpg(worker.pid, signal.SIGINT)  # Ctrl-C
            output, _ = await asyncio.to_thread(worker.communicate, timeout=STEP_LIMIT_S)
    text = output.decode()
    assert worker.returncode == 0, text
    assert "Traceback" not in text


async def _in_thread(func: Callable[..., str], *args: object) -> str:
    """Blocking shell steps off the event loop that runs the emulator."""
    return await asyncio.to_thread(func, *args)
