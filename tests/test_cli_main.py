"""The dispatcher: exit codes, one-line errors and the interrupt message."""

import pytest

from spela_transfer import cli
from spela_transfer.cli import report


def _raise(error):
    def run(args):
        raise error

    return run


@pytest.mark.parametrize(
    ("command", "argv", "hint"),
    [
        ("report", ["report", "somewhere"], "rerun the same command"),
        ("fit", ["fit"], "rerun with --resume and the same --out"),
        ("extract", ["extract"], "rerun the same command to resume"),
    ],
)
def test_interrupt_prints_resume_hint(monkeypatch, capsys, command, argv, hint):
    module = getattr(cli, command)
    monkeypatch.setattr(module, "run", _raise(KeyboardInterrupt()))

    code = cli.main(argv)

    assert code == cli.EXIT_INTERRUPTED
    assert hint in capsys.readouterr().err


def test_user_error_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(report, "run", _raise(ValueError("epochs must be positive, got -1")))

    code = cli.main(["report", "somewhere"])

    err = capsys.readouterr().err
    assert code == cli.EXIT_USER_ERROR
    assert err == "spela-transfer report: error: epochs must be positive, got -1\n"


def test_debug_keeps_traceback(monkeypatch):
    monkeypatch.setattr(report, "run", _raise(ValueError("bad value")))

    with pytest.raises(ValueError, match="bad value"):
        cli.main(["--debug", "report", "somewhere"])


def test_bug_keeps_traceback(monkeypatch):
    monkeypatch.setattr(report, "run", _raise(ZeroDivisionError("division by zero")))

    with pytest.raises(ZeroDivisionError):
        cli.main(["report", "somewhere"])
