"""What every command shares, checked on the real commands as subprocesses: ``--version``,
``--log-level``, exit codes in ``--help``, one-line usage errors, and a start that imports
only what the path taken needs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import hep_cli
from tests.support.repos import PROJECT

# module, what the user types, the arguments before the command's own (hep-proxy: "serve")
COMMANDS = [
    ("publish.cli", "hep-publish", []),
    ("preload.cli", "preload", []),
    ("proxy.cli", "hep-proxy", ["serve"]),
]
HEAVY = ("aiohttp", "cryptography", "yaml", "uvloop", "prometheus_client", "sqlite3")

# Runs a command's module as ``python -m`` does, then prints which heavy packages it imported.
PROBE = """
import json, runpy, sys
module, heavy = sys.argv[1], sys.argv[2].split(",")
sys.argv = [module, *sys.argv[3:]]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
loaded = sorted({n.split(".")[0] for n in sys.modules} & set(heavy))
print(json.dumps(loaded), file=sys.__stderr__)
"""


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _imports(module: str, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    p = subprocess.run(
        [sys.executable, "-c", PROBE, module, ",".join(HEAVY), *args],
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    *said, loaded = p.stderr.strip().splitlines()
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout, "\n".join(said)), json.loads(
        loaded
    )


@pytest.mark.parametrize(("module", "name", "sub"), COMMANDS)
def test_version(module: str, name: str, sub: list[str]) -> None:
    p = _run(module, "--version")
    assert p.returncode == 0 and p.stdout == f"{name} {hep_cli.__version__}\n", p
    assert p.stderr == ""


@pytest.mark.parametrize(("module", "name", "sub"), COMMANDS)
def test_help_lists_log_level_and_exit_codes(module: str, name: str, sub: list[str]) -> None:
    p = _run(module, *sub, "--help")
    assert p.returncode == 0, p.stderr
    assert "--log-level LEVEL" in p.stdout and "debug, info, warning, error" in p.stdout
    codes = re.findall(r"^  (\d+) ", p.stdout.split("exit codes:\n", 1)[1], re.MULTILINE)
    assert codes[:3] == ["0", "1", "2"] and codes[-1] == "130", p.stdout


@pytest.mark.parametrize(("module", "name", "sub"), COMMANDS)
def test_usage_error_is_one_line(module: str, name: str, sub: list[str]) -> None:
    p = _run(module, *sub, "--bogus")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"{name}"), p.stderr
    assert "--bogus" in p.stderr and "--help" in p.stderr
    p = _run(module, *sub, "--log-level", "loud")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "'loud'" in p.stderr, p.stderr


@pytest.mark.parametrize(("module", "name", "sub"), COMMANDS)
@pytest.mark.parametrize("args", [["--bogus"], ["--version"], ["--help"]])
def test_usage_and_version_import_nothing_heavy(
    module: str, name: str, sub: list[str], args: list[str]
) -> None:
    """Start-up cost is imports: a usage error or --version must not pay for aiohttp,
    cryptography, yaml (checked on sys.modules, not timed)."""
    p, loaded = _imports(module, *(sub if args == ["--bogus"] else []), *args)
    assert loaded == [], (loaded, p.stderr)


def test_hep_exec_shares_version_help_and_one_line_errors() -> None:
    p = _run("worker.cli", "--version")
    assert p.returncode == 0 and p.stdout == f"hep-exec {hep_cli.__version__}\n", p
    p = _run("worker.cli", "--help")
    assert "--log-level LEVEL" in p.stdout and "--version" in p.stdout, p.stdout
    codes = re.findall(r"^  (\d+) ", p.stdout.split("exit codes:\n", 1)[1], re.MULTILINE)
    assert codes == ["0", "1", "2", "130"], p.stdout
    p = _run("worker.cli", "--bogus", "--", "true")
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("hep-exec: ") and "--bogus" in p.stderr
    for args in (["--version"], ["--bogus", "--", "true"]):
        p, loaded = _imports("worker.cli", *args)
        assert loaded == [], (args, loaded, p.stderr)


@pytest.mark.parametrize(
    ("module", "sub"), [(module, sub) for module, _name, sub in COMMANDS] + [("worker.cli", [])]
)
def test_help_is_wrapped_to_the_terminal_width(module: str, sub: list[str]) -> None:
    """$COLUMNS sets the width the options are wrapped to, as argparse's own formatter does
    (hep_cli finds it without importing shutil)."""
    for columns in (50, 120):
        p = subprocess.run(
            [sys.executable, "-m", module, *sub, "--help"],
            env={**os.environ, "PYTHONPATH": str(PROJECT), "COLUMNS": str(columns)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        options = p.stdout.split("options:\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert max(len(line) for line in options) <= columns - 2, p.stdout
        assert max(len(line) for line in options) > (columns - 2) * 3 // 4, p.stdout
