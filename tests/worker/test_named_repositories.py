"""The repositories a job names (worker/repo/named.py), and their mount while it starts.

The names as plain values first; then real jobs: a job that names its repository has it
mounted as its command starts (``--stats`` says so) and reads the same bytes with the same
stops as before; a job that names a repository it never touches, from a server that never
answers, ends at once; a named repository that fails verification is said once, by the call
that needs it, naming that call's path.
"""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import time
from pathlib import Path

from publish.keys import load_or_create_keys
from tests.support.hep_exec import CLI, Served
from tests.support.node_cache import upcalls
from tests.support.tracing import env_with, needs_ptrace
from worker.repo.named import MAX_NAMED, named_repositories


def test_names_after_the_mount_in_arguments_environment_and_cwd() -> None:
    texts = [
        b"python3",
        b"/cvmfs/sft.cern.ch/lcg/views/setup.sh",
        b"/usr/bin:/cvmfs/cms.cern.ch/common:/bin",  # a PATH
        b"source '/cvmfs/atlas.cern.ch/repo/x'; run",
        b"/cvmfs/sft.cern.ch",  # again, and bare
        b"/cvmfs/alice.cern.ch,/cvmfs/lhcb.cern.ch",
    ]
    got = named_repositories(b"/cvmfs", texts)
    assert got == (
        "sft.cern.ch",
        "cms.cern.ch",
        "atlas.cern.ch",
        "alice.cern.ch",
        "lhcb.cern.ch",
    )


def test_what_names_no_repository() -> None:
    texts = [
        b"/work/cvmfs/sft.cern.ch/x",  # another tree's cvmfs directory
        b"/cvmfs/lib/libz.so",  # not named like a host
        b"/cvmfs/*",
        b"/cvmfs/",
        b"/cvmfs",
        b"/cvmfsx/sft.cern.ch",
        b"/cvmfs/sft.cern.ch*/x",  # a pattern, not a name
        b"/cvmfs/../etc/passwd",
    ]
    assert named_repositories(b"/cvmfs", texts) == ()


def test_configured_names_only_and_a_bound() -> None:
    texts = [b"/cvmfs/a.org/x /cvmfs/b.org /cvmfs/c.org"]
    assert named_repositories(b"/cvmfs", texts, ("c.org", "a.org")) == ("a.org", "c.org")
    many = [b" ".join(b"/cvmfs/r%d.org/x" % i for i in range(50))]
    assert len(named_repositories(b"/cvmfs", many)) == MAX_NAMED
    # another mount point
    assert named_repositories(b"/opt/cvmfs/", [b"/opt/cvmfs/a.org/x"]) == ("a.org",)


@needs_ptrace
def test_a_named_repository_is_mounted_as_the_command_starts(tmp_path: Path) -> None:
    fqrn = "named.test.org"
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for i in range(30):
        (src / "pkg" / f"m{i}.txt").write_text(f"module {i}\n" * (i + 1))
    served = Served(tmp_path / "store", tmp_path / "keys")
    served.publish(src, fqrn)
    proxy = served.serve(tmp_path / "nginx")
    mount = f"/cvmfs/{fqrn}"
    read = f"cat {mount}/pkg/m*.txt | sha256sum"
    base = [*CLI, "--server", proxy, "--keys", str(served.keys_dir), "--stats-internals"]
    try:
        runs = {}
        for how, script in (("named", read), ("unnamed", read.replace(fqrn, "$R"))):
            for node in ("cold", "warm"):
                argv = [*base, "--cache-dir", str(tmp_path / how), "--", "bash", "-c", script]
                r = subprocess.run(
                    argv, env=env_with({"R": fqrn}), capture_output=True, text=True, timeout=120
                )
                assert r.returncode == 0, r.stderr[-3000:]
                runs[how, node] = r
    finally:
        served.stop()
    want = subprocess.run(
        f"cat {src}/pkg/m*.txt | sha256sum", shell=True, capture_output=True, text=True
    ).stdout
    ahead = "mounted as the command started (it names it)"
    for (how, node), r in runs.items():
        assert r.stdout == want, (how, node)
        assert f"repository {fqrn}: revision" in r.stderr
        # "/cvmfs/$R" names no repository: mounted by the command's first call, as before
        assert (ahead in r.stderr) == (how == "named"), (how, node, r.stderr[-2000:])
    # the node's answers are put as before: the warm job asks Python no more than the cold,
    # nor than a job whose repository is mounted by its first call (which asks for that call;
    # a mount ahead that ends first leaves none to ask)
    assert upcalls(runs["named", "warm"].stderr) < upcalls(runs["named", "cold"].stderr)
    assert upcalls(runs["named", "warm"].stderr) <= upcalls(runs["unnamed", "warm"].stderr)


@needs_ptrace
def test_a_named_repository_never_touched_does_not_hold_the_job(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    load_or_create_keys(keys_dir, "k.example.org", dt.datetime.now(dt.UTC))
    # accepts connections (hep-exec checks one can be reached) and never answers
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for shared in (["--no-shared-cache"], ["--cache-dir", str(tmp_path / "c")]):
            argv = [*CLI, "--server", url, "--keys", str(keys_dir), "--timeout", "60", *shared]
            t0 = time.monotonic()
            r = subprocess.run(
                [*argv, "--", "echo", "/cvmfs/k.example.org/x"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            took = time.monotonic() - t0
            assert r.returncode == 0, r.stderr
            assert r.stdout == "/cvmfs/k.example.org/x\n"
            assert r.stderr == ""
            assert took < 30, f"{shared}: the job waited {took:.0f} s for a mount it never used"


@needs_ptrace
def test_a_named_repository_that_fails_is_said_by_the_call_that_needs_it(tmp_path: Path) -> None:
    fqrn = "failing.test.org"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    served = Served(tmp_path / "store", tmp_path / "keys")
    served.publish(src, fqrn)
    proxy = served.serve(tmp_path / "nginx")
    other = tmp_path / "other"  # keys that did not sign it
    load_or_create_keys(other, "other.example.org", dt.datetime.now(dt.UTC))
    argv = [*CLI, "--server", proxy, "--keys", str(other), "--no-shared-cache", "--"]
    try:
        r = subprocess.run(
            [*argv, "cat", f"/cvmfs/{fqrn}/f"],
            env=env_with(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        served.stop()
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("hep-exec:")]
    assert len(lines) == 1, r.stderr
    assert f"/cvmfs/{fqrn}" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
