"""``python -m transfuse`` is the ``transfuse`` command (transfuse/__main__.py -> cli.main)."""

from __future__ import annotations

import subprocess
import sys

from transfuse.cli import build_parser


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transfuse", *args], capture_output=True,
                          text=True, timeout=300)


def test_python_m_transfuse_help_prints_the_usage():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: transfuse")
    assert r.stdout == build_parser().format_help()


def test_python_m_transfuse_fails_like_the_command_on_a_bad_subcommand():
    r = _run("no-such-command")
    assert r.returncode == 2
    assert "invalid choice" in r.stderr and "usage: transfuse" in r.stderr
