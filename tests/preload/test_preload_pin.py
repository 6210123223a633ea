"""A spec's ``revision:`` pin, end to end: the real preload against nginx on loopback.

README, spec keys: "pin: the run fails unless the servers publish exactly this revision; once
the store holds it, later runs keep it (Stratum-1s serve only their newest manifest, so an
older revision cannot be fetched)". A failed repository is exit 1 with one line on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.nginx import Nginx, Site
from tests.support.preloading import object_requests, run_preload, write_spec
from tests.support.repos import publish_tree
from tests.support.stores import expected_objects, replica

FQRN = "pin.example.org"


def _source(root: Path) -> Path:
    (root / "sw" / "bin").mkdir(parents=True)
    (root / "sw" / ".cvmfscatalog").write_bytes(b"")
    (root / "sw" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho one\n")
    (root / "README").write_bytes(b"revision one\n")
    return root


@pytest.mark.slow
def test_pinned_revision_is_fetched_then_kept_and_other_pins_fail(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    origin, first = publish_tree(src, tmp_path / "origin", FQRN, tmp_path / "keys")
    assert first.revision == 1
    nginx = Nginx(tmp_path / "nginx", [Site(root=origin.store)])
    url = nginx.sites[0].url()
    server = url.replace("@fqrn@", FQRN)
    store = tmp_path / "store"
    stored = replica(origin, store)
    try:
        pin1 = write_spec(tmp_path / "pin1.yaml", store, origin, [url], extra="    revision: 1\n")
        p = run_preload(pin1, "--json")
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)["repositories"]
        assert r["status"] == "ok" and r["revision"] == 1
        assert stored.verify().revision == 1
        revision_1 = set(stored.objects())
        assert revision_1 == expected_objects(origin)
        manifest_1 = (stored.dir / ".cvmfspublished").read_bytes()

        # The server moves on to revision 2 (a changed file and README).
        (src / "sw" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho two\n")
        (src / "README").write_bytes(b"revision two\n")
        _, second = publish_tree(src, origin.store, FQRN, tmp_path / "keys")
        assert second.revision == 2
        revision_2_only = expected_objects(origin) - revision_1
        assert revision_2_only

        # Pinned at 1, the store holds 1: kept, nothing of revision 2 fetched.
        since = len(nginx.requests())
        p = run_preload(pin1, "--json")
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)["repositories"]
        assert r["status"] == "ok" and r["revision"] == 1 and r["previous_revision"] == 1
        kept = "pinned at revision 1; servers publish 2, store kept"
        assert kept in r["failover"] and f"preload: {FQRN}: {kept}" in p.stderr
        assert (stored.dir / ".cvmfspublished").read_bytes() == manifest_1
        assert stored.verify().revision == 1
        assert set(stored.objects()) == revision_1
        assert not set(object_requests(nginx, FQRN, since)) & revision_2_only

        # A pin the servers cannot give fails in one line; the store keeps revision 1.
        pin3 = write_spec(tmp_path / "pin3.yaml", store, origin, [url], extra="    revision: 3\n")
        p = run_preload(pin3)
        assert p.returncode == 1
        assert p.stderr.strip() == (
            f"preload: {FQRN}: spec pins revision 3 but {server} publishes revision 2 "
            "(Stratum-1s serve only their newest manifest)"
        )
        assert (stored.dir / ".cvmfspublished").read_bytes() == manifest_1
        assert stored.verify().revision == 1 and set(stored.objects()) == revision_1

        # An older revision cannot be fetched into a store that does not hold it.
        fresh = tmp_path / "fresh"
        old_pin = write_spec(tmp_path / "old.yaml", fresh, origin, [url], extra="    revision: 1\n")
        p = run_preload(old_pin)
        assert p.returncode == 1
        assert p.stderr.strip() == (
            f"preload: {FQRN}: spec pins revision 1 but {server} publishes revision 2 "
            "(Stratum-1s serve only their newest manifest)"
        )
        assert not (fresh / FQRN).exists()

        # Pinned at the revision the servers publish: the store moves to it.
        pin2 = write_spec(tmp_path / "pin2.yaml", store, origin, [url], extra="    revision: 2\n")
        p = run_preload(pin2, "--json")
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)["repositories"]
        assert r["revision"] == 2 and r["previous_revision"] == 1
        assert stored.verify().revision == 2
        assert revision_2_only <= set(stored.objects())
    finally:
        nginx.stop()
