"""A file the preload spec did not select, read under hep-exec through hep-proxy: the catalog
lists it, no server has its bytes.  The job gets EIO and one line saying why (not a line per
attempt, not a retry of what the node's service already asked the same servers).

Real parts: the publisher, a Stratum-1 stand-in, the real preload CLI with a partial spec,
hep-proxy serving the preloaded store, hep-exec (shared node service and private cache)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hep_exec import CLI
from tests.support.preloading import run_preload, write_spec
from tests.support.proxy_process import ProxyProcess, start_proxy
from tests.support.repos import publish_tree
from tests.support.store_server import StoreServer
from tests.support.tracing import env_with

FQRN = "partial.example.org"
SAID = "not in the preloaded store (not selected by the spec?)"


@dataclass
class Setup:
    proxy: ProxyProcess
    keys: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("partial")
    src = base / "src"
    for d in ("wanted", "other"):
        (src / d).mkdir(parents=True)
        (src / d / "file.txt").write_text(f"{d}\n")
    (src / "other" / "big.bin").write_bytes(bytes(range(256)) * 40_000)  # chunked
    repo, _ = publish_tree(src, base / "s1", FQRN, base / "keys")
    s1 = StoreServer(repo.store)
    try:
        spec = write_spec(
            base / "spec.yaml", base / "store", repo, [f"{s1.url}/cvmfs/@fqrn@"],
            rules="    include: [/wanted/*]\n",
        )  # fmt: skip
        r = run_preload(spec)
        assert r.returncode == 0, r.stderr
    finally:
        s1.stop()
    proxy = start_proxy(base / "proxy", "--store", str(base / "store"))
    try:
        yield Setup(proxy, repo.master_pub)
    finally:
        proxy.stop()


@pytest.mark.parametrize("cache", ["shared", "private"])
@pytest.mark.parametrize("name", ["file.txt", "big.bin"])
def test_a_file_not_preloaded_is_one_line_and_eio(setup: Setup, cache: str, name: str) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="hx-"))
    opts = ["--cache-dir", str(runtime)] if cache == "shared" else ["--no-shared-cache"]
    try:
        r = subprocess.run(
            [
                *CLI, "--server", setup.proxy.url(""), "--keys", str(setup.keys),
                "--cvmfs-config", "none", "--cache-idle", "1", *opts, "--",
                "sh", "-c", f"cat /cvmfs/{FQRN}/wanted/file.txt; cat /cvmfs/{FQRN}/other/{name}",
            ],
            env=env_with(),
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    assert r.returncode == 1 and r.stdout == "wanted\n", r.stderr
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("hep-exec:")]
    assert len(ours) == 1, r.stderr
    assert f"{FQRN}:/other/{name}" in ours[0] and SAID in ours[0], ours
    assert "HTTP 404" in ours[0] and "Traceback" not in r.stderr
    (theirs,) = [ln for ln in r.stderr.splitlines() if not ln.startswith("hep-exec:")]
    assert theirs.endswith("Input/output error"), theirs
