"""The `ingestor` command's dispatch: the development tools are optional (absent from the production image)."""

from __future__ import annotations

import sys

import pytest

from ingestor import cli


@pytest.fixture
def without_dev_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in the production image: `import ingestor_dev` fails (None in sys.modules makes it raise)."""
    for name in [m for m in sys.modules if m == cli.DEV_PACKAGE or m.startswith(f"{cli.DEV_PACKAGE}.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, cli.DEV_PACKAGE, None)


@pytest.mark.parametrize("command", ["emulator", "kafka", "demo"])
@pytest.mark.usefixtures("without_dev_tools")
def test_dev_command_without_dev_tools_exits_2_with_one_line(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"ingestor {command}: a development tool, not installed here")
    assert "Traceback" not in err


@pytest.mark.usefixtures("without_dev_tools")
def test_runtime_commands_do_not_need_dev_tools(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["dlq", "--help"])
    assert exited.value.code == 0
    assert "usage: ingestor dlq" in capsys.readouterr().out


def test_a_missing_module_inside_a_runtime_command_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "dlq", ("ingestor.no_such_module", "broken"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["dlq"])
