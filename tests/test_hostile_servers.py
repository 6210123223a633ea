"""Acceptance tests for bounded downloads: every client against a hostile Stratum-1.

Each client that reads bodies from the network — ``preload``, hep-proxy's upstream fill and
``hep-exec`` — is run for real against :class:`tests.support.hostile.HostileServer`, which
serves a repository published by our publisher correctly except for one poisoned answer
(a body that never ends, drips, is ten times too long, stalls after its headers, or is cut
short). Whatever the server does, the client must:

* end within a bound derived from its documented timeouts (:data:`BOUNDS`, reasons there);
* say what went wrong in one line that names the URL or path and what failed in a site
  admin's words (no exception class names, no traceback);
* stay under :data:`RSS_LIMIT` of peak memory and stop reading an endless body early
  (what the server managed to hand over is counted);
* leave nothing partial in the store (preload, hep-proxy): no file for the poisoned object,
  no temporary files, nothing that is not a complete, verified object;
* with a good server behind the hostile one, fall back and get the right bytes.

The clients run under hard caps (address space, file size, a kill deadline), so a client
that would read forever fails its test instead of taking the machine down.

Set ``HEP_HOSTILE_REPORT=FILE`` to have each case append what it observed as a JSON line.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from cvmfs_download.core import body_limit, kind_of_path
from cvmfs_format.catalog import Catalog, NestedRef
from cvmfs_format.manifest import parse_manifest
from cvmfs_format.objects import Suffix, parse_object_path, verify_object, verify_stored
from cvmfs_format.store import MANIFEST
from cvmfs_format.verify import loading, open_tree
from tests.support.hep_exec import hep_exec_cmd
from tests.support.hostile import (
    HostileServer,
    Misbehaviour,
    Rule,
    object_named,
    the_manifest,
)
from tests.support.preloading import preload_cmd, preload_env, repo_entry, write_specs
from tests.support.proxy_process import ProxyProcess, start_proxy
from tests.support.repos import PROJECT, Repo, publish_tree
from tests.support.store_server import StoreServer
from tests.support.stores import regular_files, replica, verify_selected
from tests.support.tracing import ensure_built, env_with

pytestmark = pytest.mark.slow

FQRN = "hostile.example.org"
MiB = 1 << 20
GiB = 1 << 30

# -- limits -----------------------------------------------------------------------------------

RSS_LIMIT = 300 * MiB  # peak RSS of a client (each is ~60-100 MiB doing this job right)
AS_CAP = 2 * GiB  # hard address-space cap: an unbounded read dies of MemoryError, not OOM
FSIZE_CAP = 1 * GiB  # hard file-size cap: an unbounded read to disk gets EFBIG, not a full disk
GRACE = 15.0  # a client still running this long past its bound is killed (SIGKILL)
# What a client may let through of an endless body before it stops reading: the object's
# size twice over, plus what loopback socket buffers hold (tcp_rmem goes up to 32 MiB) and a
# read buffer of a few MiB. A client that caps reads near the expected size stays far below.
IN_FLIGHT = 64 * MiB

# Preload's spec: the README's keys. `timeout` is its idle timeout (seconds without data);
# retries 0: one attempt per server, so a bound is one timeout, not (1 + retries) of them.
PRELOAD_HEAD = "concurrency: 4\ntimeout: 5\nconnect_timeout: 5\nretries: 0\n"
# hep-exec: --timeout 5 s (README: per-request, default), --retries 0 (one round of proxies).
HEP_EXEC_OPTIONS = ["--timeout", "5", "--connect-timeout", "2", "--retries", "0"]

# Seconds from start to end of the client's failure (or, with a good server behind, its
# success), per client and misbehaviour. Why each:
# * endless, tenfold, short: a capped read fails as soon as the cap or the early close is
#   reached, well under a second on loopback; 30 s covers start-up (hep-exec's tracer, Python
#   imports) on a busy 2-core machine.
# * stall: nothing arrives after the headers, so the idle timeout fires: preload's spec
#   `timeout: 5`, hep-exec's `--timeout 5`; 30 s is that plus start-up, with margin.
#   hep-proxy documents no idle timeout for its upstream, only `upstream_timeout` (60 s,
#   proxy/config.py): 75 s.
# * trickle: data keeps coming (2 bytes/s), so no idle timeout ever fires: only an overall
#   deadline ends it. The one the project documents is hep-proxy's 60 s upstream_timeout;
#   a transfer of a 1.5 MiB object must not be allowed longer by any client: 75 s.
QUICK, IDLE, DEADLINE = 30.0, 30.0, 75.0
PROXY_IDLE = 75.0


def bound(client: str, m: Misbehaviour) -> float:
    if m is Misbehaviour.TRICKLE:
        return DEADLINE
    if m is Misbehaviour.STALL:
        return PROXY_IDLE if client == "hep-proxy" else IDLE
    return QUICK


# What the one line must say, in words a site admin uses (any of the alternatives).
WORDS: dict[Misbehaviour, str] = {
    Misbehaviour.ENDLESS: r"too (large|long|big)|larger than|more than|exceed|limit",
    Misbehaviour.TENFOLD: (
        r"too (large|long|big)|larger than|more than|exceed|limit|size|length|hash mismatch"
    ),
    Misbehaviour.TRICKLE: r"timed? ?out|deadline|too slow|took (longer|more) than",
    Misbehaviour.STALL: r"timed? ?out|no data|idle|stall|deadline",
    Misbehaviour.SHORT: r"cut short|short|incomplete|interrupted|truncated|closed|ended early",
}
# What no admin-facing line may contain: Python's words, not the site's.
PYTHON_WORDS = re.compile(r"Traceback|\b\w*(Error|Exception)\b|\[Errno \d+\]|<\w+ object")

# -- the repository ---------------------------------------------------------------------------

VICTIM = "/pkg/victim.bin"  # 1.5 MiB, incompressible: larger than preload's 1 MiB read-whole
NESTED_FILE = "/nested/inner.txt"  # in a nested catalog


@dataclass(frozen=True)
class Published:
    repo: Repo
    victim: str  # data/XX/NAME of VICTIM's object
    victim_bytes: bytes  # VICTIM's content
    catalog: str  # data/XX/NAMEC of the nested catalog
    size: int  # bytes of every stored object and root file together


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    base = tmp_path_factory.mktemp("hostile")
    src = base / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "nested").mkdir()
    victim = os.urandom(1536 * 1024)
    (src / "pkg" / "victim.bin").write_bytes(victim)
    (src / "pkg" / "hello.txt").write_bytes(b"hello\n")
    (src / "pkg" / "other.dat").write_bytes(os.urandom(20000))
    (src / "nested" / ".cvmfscatalog").write_bytes(b"")
    (src / "nested" / "inner.txt").write_bytes(b"in a nested catalog\n")
    repo, _ = publish_tree(src, base / "s1", FQRN, base / "keys")
    local = repo.local
    tree = open_tree(local.read, parse_manifest(local.read_manifest()).manifest)

    def attach(ref: NestedRef) -> None:
        raw = local.read(ref.hash.object_path(Suffix.CATALOG))
        tree.attach(ref.path, Catalog(verify_object(raw, ref.hash), ref.path))

    entry = loading(attach, partial(tree.lookup, VICTIM))
    assert entry is not None and entry.hash is not None and not entry.is_chunked
    (nested,) = tree.nested_refs("")
    size = sum(p.stat().st_size for p in repo.dir.rglob("*") if p.is_file())
    return Published(
        repo, entry.hash.object_path(), victim, nested.hash.object_path(Suffix.CATALOG), size
    )


# -- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    misbehaviour: Misbehaviour
    target: str  # "manifest", "object" (VICTIM's), "catalog" (the nested catalog's object)

    @property
    def id(self) -> str:
        return f"{self.misbehaviour.value}-{self.target}"

    def poisoned(self, pub: Published) -> str:
        """The repository-relative path the server answers badly."""
        return {"manifest": MANIFEST, "object": pub.victim, "catalog": pub.catalog}[self.target]

    def rule(self, pub: Published) -> Rule:
        # the nested catalog by name: `a_catalog` would poison the root catalog first
        if self.target == "manifest":
            return Rule(self.misbehaviour, the_manifest, self.id)
        return Rule(self.misbehaviour, object_named(self.poisoned(pub)), self.id)

    def file(self) -> str:
        """A repository file whose reading needs the poisoned answer."""
        return NESTED_FILE if self.target == "catalog" else VICTIM

    def expected_size(self, pub: Published) -> int:
        return len((pub.repo.dir / self.poisoned(pub)).read_bytes())


CASES = [
    Case(Misbehaviour.ENDLESS, "manifest"),
    Case(Misbehaviour.ENDLESS, "object"),
    Case(Misbehaviour.ENDLESS, "catalog"),
    Case(Misbehaviour.TRICKLE, "object"),
    Case(Misbehaviour.TENFOLD, "object"),
    Case(Misbehaviour.STALL, "object"),
    Case(Misbehaviour.SHORT, "object"),
]
# One hostile server before a good one: the object answers are the ones a client can route
# around per request; the manifest too (every client tries the next server for it).
FALLBACK_CASES = [c for c in CASES if c.target != "catalog"]


def case_params(cases: Sequence[Case]) -> list[Any]:
    return [pytest.param(c, id=c.id) for c in cases]


# -- running a client under caps --------------------------------------------------------------


@dataclass
class Run:
    status: int | None  # exit status (128+N for signal N); None: killed at the deadline
    seconds: float
    peak_rss: int  # bytes: ru_maxrss of the client and every descendant it reaped
    stdout: bytes
    stderr: str


def _caps() -> None:
    """In the child before exec: the hard caps that keep a runaway client off the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (AS_CAP, AS_CAP))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_CAP, FSIZE_CAP))
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_capped(cmd: Sequence[str], env: dict[str, str], deadline: float, workdir: Path) -> Run:
    """Run ``cmd`` under :func:`_caps` in a session of its own; SIGKILL the session after
    ``deadline`` seconds. The peak RSS comes from wait4's rusage (exact, however short)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = workdir / "stdout", workdir / "stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            list(cmd),
            env=env,
            cwd=PROJECT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            preexec_fn=_caps,
            start_new_session=True,
        )
    killed = False
    while True:
        pid, wstatus, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - t0 > deadline and not killed:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the client and its children
            killed = True
        time.sleep(0.02)
    seconds = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(wstatus)
    proc.returncode = code  # reaped here: tell Popen, so it does not wait again
    status = None if killed else (code if code >= 0 else 128 - code)
    return Run(
        status,
        seconds,
        usage.ru_maxrss * 1024,
        out_path.read_bytes(),
        err_path.read_text(errors="replace"),
    )


class PeakWatch:
    """Peak VmHWM over a changing set of processes (a server and its workers), sampled from
    /proc while a test waits on them, so a worker that dies and is replaced still counts."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
            if m:
                self.peak = max(self.peak, int(m[1]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> PeakWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# -- judging ----------------------------------------------------------------------------------


@dataclass
class Verdict:
    """Everything one case observed and every check it failed, reported together: a failing
    case says all that is wrong with it at once (time, memory, message, store)."""

    client: str
    case: str
    observed: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    def done(self) -> None:
        record = {"client": self.client, "case": self.case, **self.observed}
        record["problems"] = self.problems
        report = os.environ.get("HEP_HOSTILE_REPORT")
        if report:
            with open(report, "a") as f:
                f.write(json.dumps(record) + "\n")
        seen = ", ".join(f"{k}={v!r}" for k, v in self.observed.items())
        assert not self.problems, "\n  ".join(
            [f"{self.client} {self.case}: {seen}", *self.problems]
        )

    def timing(self, seconds: float, limit: float, ended: bool) -> None:
        self.observed["seconds"] = round(seconds, 1)
        if not ended:
            self.problems.append(f"still running after {seconds:.0f} s (bound {limit:g} s): killed")
        else:
            self.check(seconds <= limit, f"took {seconds:.1f} s (bound {limit:g} s)")

    def memory(self, peak: int) -> None:
        self.observed["peak_rss_mib"] = round(peak / MiB)
        self.check(peak <= RSS_LIMIT, f"peak RSS {peak / MiB:.0f} MiB (bound {RSS_LIMIT // MiB})")

    def capped(
        self, server: HostileServer, case: Case, pub: Published, size_known: bool = True
    ) -> None:
        """An endless body: the client stopped reading near what the object may be (with
        ``size_known`` false, as hep-proxy's fill, which is asked for a name: at the limit
        cvmfs_download sets for an answer of unknown size)."""
        rel = case.poisoned(pub)
        sent = server.sent_for(FQRN, rel)
        self.observed["bytes_served"] = sent
        if case.misbehaviour is Misbehaviour.ENDLESS:
            expected = 2 * case.expected_size(pub)
            if not size_known:
                expected = body_limit(kind_of_path(rel), None)
            allowed = expected + IN_FLIGHT
            self.check(
                sent <= allowed and not server.valve_hits,
                f"read {sent / MiB:.0f} MiB of an endless {rel} (bound {allowed / MiB:.0f} MiB)",
            )

    def message(
        self, lines: Sequence[str], prefix: str, names: Sequence[str], m: Misbehaviour
    ) -> None:
        """Exactly one line starting with ``prefix``, naming one of ``names`` and saying what
        failed in :data:`WORDS`; no line with Python's words."""
        said = [line for line in lines if line.startswith(prefix)]
        self.observed["error_line"] = " | ".join(said)[:400]
        python = sorted({m[0] for line in lines for m in PYTHON_WORDS.finditer(line)})
        self.check(not python, f"Python's words on stderr: {', '.join(python)}")
        self.check(len(said) == 1, f"{len(said)} lines from {prefix.strip()}, not one")
        # the line that says what failed, if one does (others may only repeat the path)
        line = next((x for x in reversed(said) if re.search(WORDS[m], x, re.I)), "")
        line = line or (said[-1] if said else "")
        self.check(any(n in line for n in names), f"the line names none of {list(names)}")
        self.check(
            bool(re.search(WORDS[m], line, re.IGNORECASE)),
            f"the line does not say what failed (words like /{WORDS[m]}/)",
        )
        # EFBIG's words: the test's RLIMIT_FSIZE stopped the client, not a cap of its own
        self.check("File too large" not in line, "stopped only by the test's file-size cap")


def store_problems(
    store: Path, case: Case, pub: Published, extra_dirs: Sequence[Path]
) -> list[str]:
    """Nothing partial in a store after a failed fill: every ``data/XX/`` file a complete
    object named by its hash, no file for the poisoned object, no temporary files."""
    out: list[str] = []
    repo_dir = store / FQRN
    poisoned = case.poisoned(pub)
    if poisoned != MANIFEST and (repo_dir / poisoned).exists():
        out.append(f"the poisoned {poisoned} is in the store")
    for p in sorted((repo_dir / "data").glob("??/*")):
        rel = str(p.relative_to(repo_dir))
        try:
            verify_stored(p.read_bytes(), parse_object_path(rel).hash, rel)
        except Exception as e:
            out.append(f"{rel} is not a complete object ({e})")
    for d in [repo_dir / "data" / "txn", *extra_dirs]:
        left = [p.name for p in d.rglob("*") if p.is_file()] if d.is_dir() else []
        if left:
            out.append(f"left in {d}: {left[:5]}")
    total = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    if total > pub.size + MiB:
        out.append(
            f"the store holds {total / MiB:.1f} MiB (the repository is {pub.size / MiB:.1f})"
        )
    return out


# -- preload ----------------------------------------------------------------------------------


def _preload(pub: Published, servers: list[str], tmp: Path, deadline: float) -> tuple[Run, Path]:
    store = tmp / "store"
    spec = write_specs(tmp / "spec.yaml", store, [repo_entry(pub.repo, servers)], PRELOAD_HEAD)
    run = run_capped(preload_cmd(spec, "--no-progress"), preload_env(), deadline, tmp / "run")
    return run, store


@pytest.mark.parametrize("case", case_params(CASES))
def test_preload_against_a_hostile_server(published: Published, case: Case, tmp_path: Path) -> None:
    limit = bound("preload", case.misbehaviour)
    v = Verdict("preload", case.id)
    with HostileServer(published.repo.store, [case.rule(published)]) as bad:
        run, store = _preload(published, [bad.repository_url("@fqrn@")], tmp_path, limit + GRACE)
        v.capped(bad, case, published)
    v.observed["status"] = run.status
    v.timing(run.seconds, limit, run.status is not None)
    v.check(run.status == 1, f"exit status {run.status}, not 1 (a repository failed)")
    names = [bad.url, case.poisoned(published), case.file()]
    v.message(run.stderr.splitlines(), "preload: ", names, case.misbehaviour)
    v.memory(run.peak_rss)
    if run.status is not None:  # a killed preload may leave its temp files; that is not this
        v.problems += store_problems(store, case, published, [store / ".preload-tmp"])
    v.check(not (store / FQRN / MANIFEST).exists(), "a manifest was stored by a failed run")
    v.done()


@pytest.mark.parametrize("case", case_params(FALLBACK_CASES))
def test_preload_falls_back_to_a_good_server(
    published: Published, case: Case, tmp_path: Path
) -> None:
    limit = bound("preload", case.misbehaviour) + GRACE
    v = Verdict("preload+good", case.id)
    good = StoreServer(published.repo.store)
    try:
        with HostileServer(published.repo.store, [case.rule(published)]) as bad:
            servers = [bad.repository_url("@fqrn@"), f"{good.url}/cvmfs/@fqrn@"]
            run, store = _preload(published, servers, tmp_path, limit + GRACE)
            v.capped(bad, case, published)
    finally:
        good.stop()
    v.observed["status"] = run.status
    v.timing(run.seconds, limit, run.status is not None)
    v.check(run.status == 0, f"exit status {run.status}: {run.stderr.strip()[-300:]}")
    v.memory(run.peak_rss)
    python = PYTHON_WORDS.findall(run.stderr)
    v.check(not python, f"Python's words on stderr: {run.stderr.strip()[-300:]}")
    if run.status == 0:
        mirror = replica(published.repo, store)
        try:
            verify_selected(mirror, regular_files(published.repo))
        except Exception as e:
            v.problems.append(f"the store is not a correct replica: {e}")
        got = (store / FQRN / published.victim).read_bytes()
        v.check(got == (published.repo.dir / published.victim).read_bytes(), "victim differs")
    v.done()


# -- hep-proxy's upstream fill ----------------------------------------------------------------


def _proxy_pids(p: ProxyProcess) -> list[int]:
    return [p.proc.pid, *p.worker_pids()]


def _cap_running(p: ProxyProcess) -> None:
    """The caps of :func:`_caps`, put on the running proxy and its workers (a worker the
    proxy forks later inherits them from the main process)."""
    for pid in set(_proxy_pids(p)):
        resource.prlimit(pid, resource.RLIMIT_AS, (AS_CAP, AS_CAP))
        # above the 1 GiB an object of unknown size may have: the fill's own limit stops it
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (2 * FSIZE_CAP, 2 * FSIZE_CAP))


def _get(url: str, timeout: float) -> tuple[int | None, bytes, str, float]:
    """(status or None, body, Proxy-Status or what went wrong, seconds)."""
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), "", time.monotonic() - t0
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Proxy-Status", ""), time.monotonic() - t0
    except OSError as e:
        return None, b"", f"no answer: {e}", time.monotonic() - t0


def _proxy(tmp: Path, upstreams: list[str]) -> ProxyProcess:
    store = tmp / "proxy-store"
    store.mkdir(exist_ok=True)
    p = start_proxy(tmp, "--store", str(store), "--upstream", f"{FQRN}={';'.join(upstreams)}")
    _cap_running(p)
    return p


@pytest.mark.parametrize("case", case_params(CASES))
def test_hep_proxy_fill_from_a_hostile_upstream(
    published: Published, case: Case, tmp_path: Path
) -> None:
    limit = bound("hep-proxy", case.misbehaviour)
    v = Verdict("hep-proxy", case.id)
    rel = case.poisoned(published)
    with HostileServer(published.repo.store, [case.rule(published)]) as bad:
        p = _proxy(tmp_path, [bad.repository_url("@fqrn@")])
        try:
            with PeakWatch(lambda: _proxy_pids(p)) as peak:
                status, _, said, seconds = _get(p.url(f"/cvmfs/{FQRN}/{rel}"), limit + GRACE)
            v.capped(bad, case, published, size_known=False)
        finally:
            stopped = p.stop()
    v.observed["status"] = status
    v.timing(seconds, limit, status is not None)
    v.check(status in (502, 504), f"answered {status}, not 502/504 ({said})")
    v.memory(peak.peak)
    v.check(stopped == 0, f"hep-proxy exited {stopped} on SIGTERM")
    lines = p.errors().splitlines()
    v.message(lines, "hep-proxy[", [bad.url, rel], case.misbehaviour)
    v.problems += store_problems(tmp_path / "proxy-store", case, published, [])
    v.check(
        not (tmp_path / "proxy-store" / FQRN / MANIFEST).exists(),
        "a manifest was stored although upstream's was poisoned",
    )
    v.done()


@pytest.mark.parametrize("case", case_params(FALLBACK_CASES))
def test_hep_proxy_falls_back_to_a_good_upstream(
    published: Published, case: Case, tmp_path: Path
) -> None:
    limit = bound("hep-proxy", case.misbehaviour) + GRACE
    v = Verdict("hep-proxy+good", case.id)
    rel = case.poisoned(published)
    good = StoreServer(published.repo.store)
    try:
        with HostileServer(published.repo.store, [case.rule(published)]) as bad:
            p = _proxy(tmp_path, [bad.repository_url("@fqrn@"), f"{good.url}/cvmfs/@fqrn@"])
            try:
                with PeakWatch(lambda: _proxy_pids(p)) as peak:
                    status, body, said, seconds = _get(p.url(f"/cvmfs/{FQRN}/{rel}"), limit + GRACE)
                v.capped(bad, case, published, size_known=False)
            finally:
                stopped = p.stop()
    finally:
        good.stop()
    v.observed["status"] = status
    v.timing(seconds, limit, status is not None)
    v.check(status == 200, f"answered {status} ({said})")
    if status == 200:
        v.check(body == (published.repo.dir / rel).read_bytes(), f"wrong bytes for {rel}")
    v.memory(peak.peak)
    v.check(stopped == 0, f"hep-proxy exited {stopped} on SIGTERM")
    python = sorted({m[0] for m in PYTHON_WORDS.finditer(p.errors())})
    v.check(not python, f"Python's words on stderr: {', '.join(python)}")
    v.done()


# -- hep-exec ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built() -> None:
    ensure_built()


def _hep_exec(pub: Published, proxy: str, case: Case, tmp: Path, deadline: float) -> Run:
    cmd = hep_exec_cmd(
        proxy,
        ["cat", f"/cvmfs/{FQRN}{case.file()}"],
        keys=pub.repo.master_pub,
        options=HEP_EXEC_OPTIONS,
    )
    return run_capped(cmd, env_with(), deadline, tmp / "run")


@pytest.mark.parametrize("case", case_params(CASES))
def test_hep_exec_job_against_a_hostile_proxy(
    built: None, published: Published, case: Case, tmp_path: Path
) -> None:
    limit = bound("hep-exec", case.misbehaviour)
    v = Verdict("hep-exec", case.id)
    with HostileServer(published.repo.store, [case.rule(published)]) as bad:
        run = _hep_exec(published, bad.url, case, tmp_path, limit + GRACE)
        v.capped(bad, case, published)
    v.observed["status"] = run.status
    v.timing(run.seconds, limit, run.status is not None)
    v.check(run.status not in (None, 0), f"cat exited {run.status}: it read the file")
    lines = run.stderr.splitlines()
    v.check(
        any("Input/output error" in line for line in lines if line.startswith("cat:")),
        f"cat did not get EIO: {[x for x in lines if x.startswith('cat:')]}",
    )
    path = f"/cvmfs/{FQRN}{case.file()}"
    v.message(lines, "hep-exec: ", [bad.url, path, case.poisoned(published)], case.misbehaviour)
    v.memory(run.peak_rss)
    v.done()


@pytest.mark.parametrize("case", case_params(FALLBACK_CASES))
def test_hep_exec_job_falls_back_to_a_good_proxy(
    built: None, published: Published, case: Case, tmp_path: Path
) -> None:
    limit = bound("hep-exec", case.misbehaviour) + GRACE
    v = Verdict("hep-exec+good", case.id)
    good = StoreServer(published.repo.store)
    try:
        with HostileServer(published.repo.store, [case.rule(published)]) as bad:
            # `;`: fail-over groups, tried in order: the hostile proxy first, always
            run = _hep_exec(published, f"{bad.url};{good.url}", case, tmp_path, limit + GRACE)
            v.capped(bad, case, published)
    finally:
        good.stop()
    v.observed["status"] = run.status
    v.timing(run.seconds, limit, run.status is not None)
    v.check(run.status == 0, f"cat exited {run.status}: {run.stderr.strip()[-300:]}")
    v.check(run.stdout == published.victim_bytes, "cat printed the wrong bytes")
    python = sorted({m[0] for m in PYTHON_WORDS.finditer(run.stderr)})
    v.check(not python, f"Python's words on stderr: {', '.join(python)}")
    v.memory(run.peak_rss)
    v.done()


def test_the_hostile_server_serves_the_rest_correctly(published: Published, tmp_path: Path) -> None:
    """The yardstick: with no rule the hostile server is a correct Stratum-1 (preload gets a
    verified replica from it), so what the cases above see is the poisoned answer only."""
    with HostileServer(published.repo.store) as server:
        run, store = _preload(published, [server.repository_url("@fqrn@")], tmp_path, 60)
        assert server.requests_for(FQRN, MANIFEST) == 1
    assert run.status == 0, run.stderr
    verify_selected(replica(published.repo, store), regular_files(published.repo))
