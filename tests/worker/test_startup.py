"""hep-exec's start-up: a job that needs no network library does not import one.

``hep-exec -- true`` has a start-up budget of 0.15 s (issue 14); asyncio + aiohttp alone cost
~0.15 s to import, cryptography ~25 ms, yaml ~16 ms. They must come with their first use (the
first fetch, the first signature check, a config file), not with every job.
"""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
from pathlib import Path

from publish.keys import load_or_create_keys
from tests.support.hep_exec import CLI
from tests.support.network import dead_url

HEAVY = ("aiohttp", "asyncio", "cryptography", "yaml", "uvloop")
# ~0.5-2 ms each of every job's start, needed only off a warm job's path: a temp directory on
# disk (tempfile, and with it shutil and random), a thread pool (concurrent.futures), parsing
# RSA keys (a node whose earlier job checked the signatures)
OFF_THE_START = ("tempfile", "shutil", "random", "concurrent.futures", "cvmfs_format.rsa_keys")

PROBE = """
import sys
from worker.cli import main
rc = main(sys.argv[1:])
print(",".join(m for m in {heavy!r} if m in sys.modules))
sys.exit(rc)
"""


def _loaded(args: list[str], modules: tuple[str, ...] = HEAVY) -> tuple[int, str, str]:
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=modules), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r.returncode, r.stdout.strip(), r.stderr


def test_true_without_cvmfs_imports_no_network_or_crypto_library(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    load_or_create_keys(keys_dir, "k.example.org", dt.datetime.now(dt.UTC))
    # a server that accepts connections (hep-exec checks one can be reached) and never answers
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        node = ["--cache-dir", str(tmp_path / "c"), "--cache-idle", "5"]
        # a private cache; a cold node (the job starts the node's service, which needs more);
        # a warm node
        for shared, modules in (
            (["--no-shared-cache"], HEAVY + OFF_THE_START),
            (node, HEAVY),
            (node, HEAVY + OFF_THE_START),
        ):
            rc, loaded, err = _loaded(
                ["--server", url, "--keys", str(keys_dir), *shared, "--", "true"], modules
            )
            assert rc == 0, err
            assert loaded == "", f"{shared}: imported at start: {loaded}"


def test_a_garbled_key_still_stops_hep_exec_before_the_command(tmp_path: Path) -> None:
    """Keys are parsed on first use, but their files are checked at start."""
    keys_dir = tmp_path / "keys"
    load_or_create_keys(keys_dir, "k.example.org", dt.datetime.now(dt.UTC))
    pub = keys_dir / "k.example.org.pub"
    text = pub.read_text()
    pub.write_text(text.replace(text.splitlines()[1], "!!not base64!!"))
    marker = tmp_path / "ran"
    opts = ["--server", dead_url(), "--keys", str(pub), "--no-shared-cache"]
    r = subprocess.run(
        [*CLI, *opts, "--", "touch", str(marker)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"hep-exec: {pub}: not a PEM public key"
    assert not marker.exists()


GC_PROBE = """
import gc, sys
from worker.cli import main
rc = main(sys.argv[1:])
print(gc.isenabled(), gc.get_freeze_count())
sys.exit(rc)
"""


def test_the_collector_is_paused_for_the_start_only(tmp_path: Path) -> None:
    """The start runs without the cyclic collector (~5 ms of it); the job runs with it, and
    what the start made is frozen out of its way.  A start that ends early (a usage error)
    leaves the collector as it found it, with nothing frozen."""
    keys_dir = tmp_path / "keys"
    load_or_create_keys(keys_dir, "k.example.org", dt.datetime.now(dt.UTC))
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        runs = {
            "job": ["--server", url, "--keys", str(keys_dir), "--no-shared-cache", "--", "true"],
            "usage": ["--bogus", "--", "true"],
        }
        said = {}
        for what, args in runs.items():
            r = subprocess.run(
                [sys.executable, "-c", GC_PROBE, *args], capture_output=True, text=True, timeout=60
            )
            said[what] = (r.returncode, r.stdout.split())
    assert said["usage"] == (2, ["True", "0"]), said
    rc, (enabled, frozen) = said["job"]
    assert rc == 0 and enabled == "True" and int(frozen) > 10_000, said


def test_the_interpreter_starts_with_no_import_hook_of_ours(tmp_path: Path) -> None:
    # An editable install of a flat layout used to be an import hook in a .pth file, which
    # imported pathlib, fnmatch, urllib.parse and ipaddress into every start of the venv's
    # python (~15 ms of hep-exec's own start, and of every job's python, on the test VM);
    # pyproject's package-dir makes it one path.  The project must still import from anywhere.
    probe = (
        "import sys; print(','.join(m for m in ('pathlib', 'fnmatch', 'urllib.parse') "
        "if m in sys.modules)); import worker.cli, hep_cli; print(worker.cli.__file__)"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    hooked, where = r.stdout.splitlines()
    assert hooked == "", f"imported by the interpreter's start: {hooked}"
    assert where.endswith("/worker/cli.py"), where
