"""preload interrupted by SIGINT in the middle of a run (README, exit codes: "130 | interrupted;
the store keeps its previous revision"; "a killed run resumes where it stopped")."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from cvmfs_format.store import REPLICA_MARKER
from tests.support.nginx import Nginx, Site
from tests.support.preloading import (
    SPEC_HEAD,
    object_requests,
    repo_entry,
    run_preload,
    start_preload,
    write_spec,
    write_specs,
)
from tests.support.repos import publish_tree
from tests.support.stores import check_objects_named_right, expected_objects, replica
from tests.support.waiting import wait_until

FQRN = "intr.example.org"
# the interrupted runs wait on slow or silent servers: SIGINT must come before any timeout
PATIENT = SPEC_HEAD.replace("timeout: 5", "timeout: 300")
BIG = 8 * 1024 * 1024  # two 4 MiB chunks: at 256 KiB/s each takes 16 s to download


@pytest.mark.slow
def test_sigint_mid_run_exits_130_and_keeps_the_previous_revision(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "base").mkdir(parents=True)
    (src / "base" / "conf").write_bytes(b"revision one\n")
    origin, first = publish_tree(src, tmp_path / "origin", FQRN, tmp_path / "keys")
    assert first.revision == 1
    nginx = Nginx(
        tmp_path / "nginx", [Site(root=origin.store, limit_rate="32k"), Site(root=origin.store)]
    )
    slow_url, fast_url = (s.url() for s in nginx.sites)
    store = tmp_path / "store"
    stored = replica(origin, store)
    try:
        fast = write_spec(tmp_path / "fast.yaml", store, origin, [fast_url])
        p = run_preload(fast)
        assert p.returncode == 0, p.stderr
        manifest_1 = (stored.dir / ".cvmfspublished").read_bytes()
        revision_1 = set(stored.objects())

        # Revision 2: sixty small files and one big chunked file.
        (src / "small").mkdir()
        for i in range(60):
            (src / "small" / f"f{i}").write_bytes(os.urandom(2000))
        (src / "big.bin").write_bytes(os.urandom(BIG))
        _, second = publish_tree(src, origin.store, FQRN, tmp_path / "keys")
        assert second.revision == 2
        smalls = expected_objects(origin, {f"/small/f{i}" for i in range(60)}, set())
        chunks = expected_objects(origin, {"/big.bin"}, set())
        smalls -= chunks  # both sets name the certificate
        assert len(smalls) == 60 and len(chunks - revision_1) == 2

        # the slow site's chunks take minutes: SIGINT always comes first, however loaded the
        # machine (a generous timeout, so that no read times out meanwhile either)
        slow = write_specs(
            tmp_path / "slow.yaml", store, [repo_entry(origin, [slow_url])], head=PATIENT
        )
        since = len(nginx.requests())
        proc = start_preload(slow)
        try:
            # Mid-run: small objects answered (nginx logs a request when it is complete)
            # while the two chunks still trickle in at 256 KiB/s.
            wait_until(
                lambda: (
                    proc.poll() is not None
                    or (
                        len(smalls & set(object_requests(nginx, FQRN, since))) >= 5
                        and bool(smalls & set(stored.objects()))
                    )
                ),
                60,
                what="five small objects of revision 2 served by the slow site, one committed",
            )
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
        assert proc.returncode == 130, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "interrupted" in lines[0], err
        assert out == ""

        # The store still names revision 1, complete, and shows nothing half-written.
        assert (stored.dir / ".cvmfspublished").read_bytes() == manifest_1
        assert stored.verify().revision == 1
        check_objects_named_right(stored)
        visible = {str(p.relative_to(stored.dir)) for p in stored.dir.rglob("*") if p.is_file()}
        # (all of revision 1: still marked as a replica, as the first run left it)
        assert visible == {".cvmfspublished", ".cvmfswhitelist", REPLICA_MARKER, *stored.objects()}
        committed = set(stored.objects())
        assert not (chunks - revision_1) & committed  # it really was interrupted mid-run
        assert smalls & committed  # and had got somewhere

        # The next run completes revision 2 without fetching again what was committed.
        since = len(nginx.requests())
        p = run_preload(fast, "--json")
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)["repositories"]
        assert r["revision"] == 2 and r["previous_revision"] == 1
        assert stored.verify().revision == 2
        assert set(stored.objects()) == revision_1 | expected_objects(origin)
        refetched = committed & set(object_requests(nginx, FQRN, since))
        assert not refetched
        tmp_dir = store / ".preload-tmp" / FQRN
        assert not tmp_dir.exists() or not any(tmp_dir.iterdir())
    finally:
        nginx.stop()


def test_sigint_before_any_download_exits_130(tmp_path: Path) -> None:
    """Interrupted while still waiting for the manifest: 130, and no repository directory."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x\n")
    origin, _ = publish_tree(src, tmp_path / "origin", FQRN, tmp_path / "keys")
    # a server that accepts the connection and never answers
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/cvmfs/@fqrn@"
        store = tmp_path / "store"
        spec = write_specs(tmp_path / "s.yaml", store, [repo_entry(origin, [url])], head=PATIENT)
        proc = start_preload(spec)
        try:
            accepted = wait_until(lambda: _accept(silent), 30, what="preload to connect")
            assert accepted is not None
            with accepted[0]:
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=60)
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 130, err
    assert "interrupted" in err and err.strip().count("\n") == 0 and out == ""
    assert not (store / FQRN).exists()


def _accept(sock: socket.socket) -> tuple[socket.socket, Any] | None:
    sock.settimeout(0.05)
    try:
        return sock.accept()
    except TimeoutError:
        return None
