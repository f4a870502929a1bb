"""The command line: help lists every command, unknown commands fail, errors have no traceback."""

import subprocess
import sys

from mmfold.cli import COMMANDS, main


def test_help_lists_every_command(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_fails(capsys) -> None:
    assert main(["nonsense"]) == 2


def test_python_dash_m_and_user_error_without_traceback(project) -> None:
    r = subprocess.run([sys.executable, "-m", "mmfold", "folds", "--data", "nosuch"], capture_output=True, text=True)
    assert r.returncode == 2 and "no data config" in r.stderr and "Traceback" not in r.stderr
