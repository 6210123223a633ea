"""The operations guide (docs/deployment.md), claim by claim: its sample commands run as
printed against a local setup on loopback, with only the site's paths and host names swapped
for the test's — the cron lines (one JSON line per run appended to a .jsonl file), the
hep-proxy configuration and health check, and ``hep-exec --check`` whose output has the
shape the guide shows, line for line."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.network import dead_url, free_port
from tests.support.repos import PROJECT, Repo, publish_tree
from tests.support.store_server import StoreServer
from tests.support.tracing import env_with
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

GUIDE = PROJECT / "docs" / "deployment.md"
FQRN = "guide.example.org"
BIN = Path(sys.executable).parent


def blocks(lang: str) -> list[str]:
    """The guide's fenced blocks of one language ("" for plain ones), in order."""
    out: list[str] = []
    current: list[str] | None = None
    kind = ""
    for line in GUIDE.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, kind = [], line[3:].strip()
            else:
                if kind == lang:
                    out.append("".join(f"{x}\n" for x in current))
                current = None
        elif current is not None:
            current.append(line)
    return out


@dataclass
class Site:
    base: Path
    repo: Repo
    spec: Path
    logs: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("guide")
    src = base / "src"
    (src / "sw").mkdir(parents=True)
    (src / "sw" / "setup.sh").write_text("echo ready\n")
    repo, _ = publish_tree(src, base / "s1", FQRN, base / "keys")
    s1 = StoreServer(repo.store)
    spec = base / "cms.yaml"
    spec.write_text(
        f"store: {base / 'store'}\nrepositories:\n  - name: {FQRN}\n"
        f"    servers: [{s1.url}/cvmfs/@fqrn@]\n    keys: {repo.keys_dir}\n"
    )
    logs = base / "log"
    logs.mkdir()
    try:
        yield Site(base, repo, spec, logs)
    finally:
        s1.stop()


def _ours(line: str, site: Site) -> str:
    """A guide line with the site's paths as this test has them."""
    return (
        line.replace("/opt/hep-cvmfs/.venv/bin/", f"{BIN}/")
        .replace("/etc/hep-cvmfs/cms.yaml", str(site.spec))
        .replace("/var/log/hep-cvmfs/", f"{site.logs}/")
    )


def test_the_cron_lines_append_one_json_line_per_run(site: Site) -> None:
    (cron,) = blocks("cron")
    commands = [ln.split(None, 5)[5] for ln in cron.splitlines() if not ln.startswith("#")]
    assert len(commands) == 2 and all("preload --spec" in c for c in commands)
    for command in commands * 2:  # every run, as cron runs them
        r = subprocess.run(["sh", "-c", _ours(command, site)], env=env_with(), timeout=120)
        assert r.returncode == 0
    records = [json.loads(ln) for ln in (site.logs / "preload.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["ok"] and r["exit"] == 0 for r in records), records
    assert records[0]["repositories"][0]["name"] == FQRN
    assert (site.logs / "preload.err").read_text() == ""
    # a bad spec is still one JSON line, and exit 2
    bad = site.base / "bad.yaml"
    bad.write_text("store: [\n")
    r = subprocess.run(
        ["sh", "-c", _ours(commands[0], site).replace(str(site.spec), str(bad))],
        env=env_with(),
        timeout=60,
    )
    assert r.returncode == 2
    last = json.loads((site.logs / "preload.jsonl").read_text().splitlines()[-1])
    assert not last["ok"] and last["exit"] == 2 and str(bad) in last["error"]


def test_the_proxy_configuration_and_health_check(site: Site) -> None:
    (config,) = [b for b in blocks("yaml") if b.startswith("stores:")]
    port = free_port()
    config = (
        config.replace("/srv/cvmfs-store", str(site.base / "store"))
        .replace("0.0.0.0:8000", f"127.0.0.1:{port}")
        .replace("workers: 8", "workers: 1")
        .replace("/var/log/hep-cvmfs/", f"{site.logs}/")
    )
    assert "allow: [10.0.0.0/8]" in config  # loopback is not in it: health is still ours
    conf = site.base / "hep-proxy.yaml"
    conf.write_text(config)
    if not (site.base / "store" / FQRN).is_dir():
        subprocess.run([f"{BIN}/preload", "--spec", str(site.spec)], env=env_with(), check=True)
    proxy = subprocess.Popen([f"{BIN}/hep-proxy", "serve", "--config", str(conf)], env=env_with())
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(f"{url}/healthz"), 30, what="hep-proxy's /healthz")
        (curl,) = [ln for sh in blocks("sh") for ln in sh.splitlines() if "/healthz;" in ln]
        line = curl.replace("$(hostname)", "127.0.0.1").replace(":8000", f":{port}")
        r = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout
        assert "# HELP hep_proxy_" in r.stdout or "# TYPE hep_proxy_" in r.stdout, r.stdout
        # but the data is for the allow-list only
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{url}/cvmfs/{FQRN}/.cvmfspublished", timeout=5)
        assert denied.value.code == 403
    finally:
        proxy.terminate()
        proxy.wait(30)
    # the same proxy with this test's "compute network" (loopback) allowed: the check the
    # guide's troubleshooting section starts with
    conf.write_text(config.replace("allow: [10.0.0.0/8]", "allow: [10.0.0.0/8, 127.0.0.0/8]"))
    proxy = subprocess.Popen([f"{BIN}/hep-proxy", "serve", "--config", str(conf)], env=env_with())
    try:
        wait_until(lambda: _answers(f"{url}/healthz"), 30, what="hep-proxy's /healthz")
        _check_has_the_guides_shape(site, url)
    finally:
        proxy.terminate()
        proxy.wait(30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _check_has_the_guides_shape(site: Site, url: str) -> None:
    (sample,) = [b for b in blocks("") if b.startswith("$ hep-exec ")]
    command, *shown = sample.splitlines()
    dead = dead_url()

    def here(text: str) -> str:  # the guide's cluster as this test has it
        return (
            text.replace("http://login1:8000", url)
            .replace("http://login2:8000", dead)
            .replace("/opt/hep-cvmfs/keys/cern.ch", str(site.repo.keys_dir))
            .replace("cms.cern.ch", FQRN)
        )

    argv = [here(a) for a in shlex.split(command.removeprefix("$ "))]
    assert argv[0] == "hep-exec"
    if Path("/etc/cvmfs").is_dir():
        pytest.skip("this machine has /etc/cvmfs: the guide's sample shows one without")
    r = subprocess.run(
        [f"{BIN}/hep-exec", *argv[1:], "--no-shared-cache"],
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    got = r.stdout.splitlines()
    assert r.returncode == 1, r.stdout + r.stderr  # one server is down, as in the guide
    # every line of the guide's sample is there, in order, up to the figures of the day
    wanted = [here(ln) for ln in shown]
    at = 0
    for want in wanted:
        while at < len(got) and not _like(want, got[at]):
            at += 1
        assert at < len(got), f"guide line not printed: {want!r}\n{r.stdout}"
        at += 1


def _like(want: str, got: str) -> bool:
    """The same line but for figures that differ from run to run (times, ages, sizes,
    revisions, the trap mode this kernel has)."""
    volatile = re.compile(
        r"in \d+ ms|revision \d+|published .+? ago|\(\d+\.\d+ GiB available now\)"
        r"|trap mode: [^,)]+"
    )
    pieces = volatile.split(want)
    return re.fullmatch(".+?".join(re.escape(p) for p in pieces), got) is not None
