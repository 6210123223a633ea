"""hep-exec speaks CVMFS: servers and forward proxies named as in a client configuration, a
site's /etc/cvmfs read as the real client reads it, the old ``--proxy`` form still taken.

Real parts: a repository written by the publisher, served by a static Stratum-1 stand-in on
loopback, a real squid as the site's forward proxy, real hep-exec runs of coreutils."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hep_exec import CLI
from tests.support.network import dead_url
from tests.support.repos import Repo, publish_tree
from tests.support.store_server import StoreServer
from tests.support.tracing import env_with

FQRN = "sites.example.org"
OTHER = "own.example.org"


@dataclass
class Site:
    repo: Repo
    other: Repo
    s1: StoreServer
    content: bytes
    etc: Path


def _write_site(etc: Path, s1: StoreServer, repo: Repo, other: Repo, proxy: str) -> None:
    """/etc/cvmfs as a site writes it: proxies for everyone, servers and keys per domain,
    one repository with its own keys."""
    for d in ("domain.d", "config.d", "keys/example.org"):
        (etc / d).mkdir(parents=True, exist_ok=True)
    (etc / "keys/example.org" / f"{FQRN}.pub").write_bytes(repo.master_pub.read_bytes())
    (etc / "default.conf").write_text("CVMFS_TIMEOUT=5\nCVMFS_TIMEOUT_DIRECT=3\n")
    (etc / "default.local").write_text(
        f"# the site squid\nCVMFS_HTTP_PROXY='{proxy}'\nCVMFS_REPOSITORIES={FQRN},own\n"
        "CVMFS_DEFAULT_DOMAIN=example.org\n"
        'if [ -e /etc/special ]; then CVMFS_HTTP_PROXY="http://other:3128"; fi\n'
    )
    (etc / "domain.d/example.org.conf").write_text(
        f'S1="{s1.url}"\nCVMFS_SERVER_URL="$S1/cvmfs/@fqrn@"\n'
        f"CVMFS_KEYS_DIR=/etc/cvmfs/keys/example.org\n"
    )
    (etc / "domain.d/example.org.local").write_text(f"CVMFS_KEYS_DIR={etc}/keys/example.org\n")
    (etc / f"config.d/{OTHER}.local").write_text(f"CVMFS_PUBLIC_KEY={other.master_pub}\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("sites")
    src = base / "src"
    (src / "pkg").mkdir(parents=True)
    content = os.urandom(5000)
    (src / "pkg" / "data.bin").write_bytes(content)
    store = base / "s1"
    repo, _ = publish_tree(src, store, FQRN, base / "keys")
    other, _ = publish_tree(src, store, OTHER, base / "keys-own")
    s1 = StoreServer(store)
    etc = base / "etc-cvmfs"
    _write_site(etc, s1, repo, other, "DIRECT")
    try:
        yield Site(repo, other, s1, content, etc)
    finally:
        s1.stop()


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLI, "--no-shared-cache", *argv],
        env=env_with(env or {}),
        capture_output=True,
        timeout=120,
    )


def test_through_the_site_squid_as_forward_proxy(site: Site) -> None:
    from tests.support.squid import start_squid

    squid = start_squid()
    try:
        r = _run(
            "--server", f"{site.s1.url}/cvmfs/@fqrn@", "--proxy", f"{squid.url};DIRECT",
            "--keys", str(site.repo.master_pub), "--cvmfs-config", "none",
            "--", "cat", f"/cvmfs/{FQRN}/pkg/data.bin",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout == site.content and r.stderr == b""
        # absolute-URI requests for the repository's files went through squid
        log = "\n".join(squid.log())
        assert f"{site.s1.url}/cvmfs/{FQRN}/.cvmfspublished" in log, log
    finally:
        squid.stop()


def test_the_sites_cvmfs_configuration(site: Site, tmp_path: Path) -> None:
    """Servers and keys per domain, a repository's own key from config.d, the proxy from
    default.local; an ``if`` block the reader cannot take is one warning per line."""
    r = _run(
        "--cvmfs-config", str(site.etc),
        "--", "sh", "-c", f"cat /cvmfs/{FQRN}/pkg/data.bin /cvmfs/{OTHER}/pkg/data.bin; ls /cvmfs",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == site.content * 2 + f"{OTHER}\n{FQRN}\n".encode()
    warned = r.stderr.decode().splitlines()
    assert len(warned) == 1, warned
    assert f"{site.etc}/default.local:5" in warned[0] and "'if'" in warned[0]
    # --check: each setting and where it came from; both repositories verified
    r = _run("--cvmfs-config", str(site.etc), "--check")
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert f"ok   setting proxy = DIRECT  [{site.etc}/default.local:2]" in out, out
    assert f"ok   setting timeout = 3.0  [{site.etc}/default.conf:2]" in out, out
    assert f"ok   server {site.s1.url}: HTTP 200" in out, out
    for name in (FQRN, OTHER):
        assert any(
            line.startswith(f"ok   repository {name}: revision 1") and "signature verified" in line
            for line in out.splitlines()
        ), out
    # a key from the wrong repository: that repository fails to mount, with one line
    (site.etc / f"config.d/{OTHER}.local").write_text(f"CVMFS_PUBLIC_KEY={site.repo.master_pub}\n")
    try:
        r = _run("--cvmfs-config", str(site.etc), "--", "cat", f"/cvmfs/{OTHER}/pkg/data.bin")
        assert r.returncode != 0 and r.stdout == b""
        assert OTHER in r.stderr.decode() and "Traceback" not in r.stderr.decode()
    finally:
        (site.etc / f"config.d/{OTHER}.local").write_text(
            f"CVMFS_PUBLIC_KEY={site.other.master_pub}\n"
        )


def test_old_proxy_form_still_works_and_says_what_to_write(site: Site) -> None:
    r = _run(
        "--proxy", site.s1.url, "--keys", str(site.repo.master_pub), "--cvmfs-config", "none",
        "--", "cat", f"/cvmfs/{FQRN}/pkg/data.bin",
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout == site.content, r.stderr
    (line,) = r.stderr.decode().splitlines()
    assert f"--server '{site.s1.url}/cvmfs/@fqrn@'" in line


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--proxy", "not a url"], "hep-exec: --proxy: 'not a url' is not a list of URLs"),
        (["--server", "http://127.0.0.1:1", "--proxy", "http://sq:x"], "--proxy: proxy"),
        (["--cvmfs-config", "/nonexistent"], "/nonexistent: no such CernVM-FS configuration"),
        ([], "no server configured"),
        (
            ["--server", f"{dead_url()};{dead_url()}", "--proxy", f"{dead_url()};DIRECT"],
            "no server or proxy can be reached: http://127.0.0.1:",
        ),
    ],
)
def test_bad_values_stop_before_the_command(argv: list[str], needle: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    site_off = [] if "--cvmfs-config" in argv else ["--cvmfs-config", "none"]
    r = _run(*argv, *site_off, "--", "touch", str(marker))
    assert r.returncode == 2 and not marker.exists()
    (line,) = r.stderr.decode().splitlines()
    assert needle in line, line


def test_bad_site_value_names_file_and_line(site: Site, tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    _write_site(etc, site.s1, site.repo, site.other, "DIRECT")
    (etc / "default.local").write_text("CVMFS_HTTP_PROXY=DIRECT\nCVMFS_MAX_RETRIES=many\n")
    r = _run("--cvmfs-config", str(etc), "--", "true")
    assert r.returncode == 2
    (line,) = r.stderr.decode().splitlines()
    assert f"{etc}/default.local:2" in line and "CVMFS_MAX_RETRIES" in line, line


def test_check_without_repositories_asks_for_the_repository_list(
    site: Site, tmp_path: Path
) -> None:
    """hep-proxy lists its repositories (200); a plain static server has no list (404): it
    answers, so it is up, and the line says how to check a repository."""
    from tests.support.proxy_process import start_proxy

    proxy = start_proxy(tmp_path / "proxy", "--store", str(site.repo.store))
    try:
        for server, expected in (
            (proxy.url(""), "HTTP 200"),
            (site.s1.url, r"answers \(HTTP 404 in \d+ ms for its list of repositories; --rep"),
        ):
            r = _run("--server", server, "--cvmfs-config", "none", "--check")
            out = r.stdout.decode()
            assert r.returncode == 0, out
            (line,) = [ln for ln in out.splitlines() if ln.startswith("ok   server ")]
            assert re.match(f"ok   server {re.escape(server)}: {expected}", line), line
    finally:
        proxy.stop()


def test_record_into_a_missing_directory_stops_at_start(site: Site, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    r = _run(
        "--server", site.s1.url, "--cvmfs-config", "none",
        "--record", str(tmp_path / "nope" / "x.list"), "--", "touch", str(marker),
    )  # fmt: skip
    assert r.returncode == 2 and not marker.exists()
    (line,) = r.stderr.decode().splitlines()
    assert f"--record: {tmp_path / 'nope'}: no such directory" in line, line


def test_first_hops_are_the_proxies_and_the_servers_where_direct() -> None:
    from cvmfs_format.proxies import parse_proxies, parse_server_templates
    from worker.reach import first_hops

    servers = parse_server_templates("http://s1:80;http://s2:80")
    assert first_hops(servers, parse_proxies("http://p1:3128|http://p2:3128")) == [
        "http://p1:3128",
        "http://p2:3128",
    ]
    assert first_hops(servers, parse_proxies("http://p1:3128;DIRECT")) == [
        "http://p1:3128",
        "http://s1:80/cvmfs/@fqrn@",
        "http://s2:80/cvmfs/@fqrn@",
    ]
