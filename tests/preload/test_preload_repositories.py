"""Several repositories in one spec, one of them failing; ``--repo`` selects among them.

README, exit codes: "1 | a repository failed (all servers failed, …); the others were still
attempted and the failed one's store keeps its previous revision"; "2 | bad command line or
spec"; ``--repo FQRN`` (only that repository of the spec; repeatable).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.network import dead_url
from tests.support.nginx import Nginx, Site
from tests.support.preloading import object_requests, repo_entry, run_preload, write_specs
from tests.support.repos import Repo, publish_tree
from tests.support.stores import expected_objects, replica

NAMES = ("alpha.example.org", "beta.example.org", "gamma.example.org")
ALPHA, BETA, GAMMA = NAMES


def _publish(tmp_path: Path, name: str, generation: int) -> Repo:
    src = tmp_path / "src" / name
    (src / "lib").mkdir(parents=True, exist_ok=True)
    (src / "lib" / "payload").write_bytes(f"{name} generation {generation}\n".encode() * 100)
    (src / "VERSION").write_bytes(f"{generation}\n".encode())
    repo, result = publish_tree(src, tmp_path / "origin", name, tmp_path / "keys" / name)
    assert result.revision == generation
    return repo


def _by_name(stdout: str) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in json.loads(stdout)["repositories"]}


@pytest.mark.slow
def test_one_failing_repository_does_not_stop_the_others(tmp_path: Path) -> None:
    repos = {n: _publish(tmp_path, n, 1) for n in NAMES}
    nginx = Nginx(tmp_path / "nginx", [Site(root=tmp_path / "origin")])
    url = nginx.sites[0].url()
    store = tmp_path / "store"
    stored = {n: replica(r, store) for n, r in repos.items()}
    try:
        live = write_specs(
            tmp_path / "live.yaml", store, [repo_entry(r, [url]) for r in repos.values()]
        )
        p = run_preload(live)
        assert p.returncode == 0, p.stderr
        assert all(stored[n].verify().revision == 1 for n in NAMES)
        beta_1 = set(stored[BETA].objects())

        # Everything moves to revision 2, but beta's only server is now down.
        repos = {n: _publish(tmp_path, n, 2) for n in NAMES}
        dead = f"{dead_url()}/cvmfs/@fqrn@"
        spec = write_specs(
            tmp_path / "beta-down.yaml",
            store,
            [repo_entry(r, [dead] if n == BETA else [url]) for n, r in repos.items()],
        )
        p = run_preload(spec, "--json")
        assert p.returncode == 1
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, p.stderr
        assert lines[0].startswith(f"preload: {BETA}: ")
        assert dead.replace("@fqrn@", BETA) in lines[0] and "connection refused" in lines[0]
        summary = json.loads(p.stdout)
        assert summary["ok"] is False
        reports = _by_name(p.stdout)
        assert list(reports) == list(NAMES)  # gamma, after the failure, was still attempted
        assert reports[BETA]["status"] == "failed" and reports[BETA]["error"] in lines[0]
        for n in (ALPHA, GAMMA):
            assert reports[n]["status"] == "ok" and reports[n]["revision"] == 2
            assert stored[n].verify().revision == 2
            assert set(stored[n].objects()) >= expected_objects(repos[n])
        # the failed one keeps its previous revision, complete
        assert stored[BETA].verify().revision == 1
        assert set(stored[BETA].objects()) == beta_1

        # --repo: only the named repository is preloaded and reported.
        for n in (ALPHA, GAMMA):
            _publish(tmp_path, n, 3)
        since = len(nginx.requests())
        p = run_preload(spec, "--repo", GAMMA, "--json")
        assert p.returncode == 0, p.stderr
        assert list(_by_name(p.stdout)) == [GAMMA]
        assert stored[GAMMA].verify().revision == 3
        assert stored[ALPHA].verify().revision == 2 and stored[BETA].verify().revision == 1
        assert not [q for q in nginx.requests()[since:] if f"/{GAMMA}/" not in q]
        assert object_requests(nginx, GAMMA, since)

        # repeatable; the failing one selected alone fails alone
        p = run_preload(spec, "--repo", BETA, "--repo", ALPHA, "--json")
        assert p.returncode == 1
        assert list(_by_name(p.stdout)) == [ALPHA, BETA]
        assert p.stderr.strip().startswith(f"preload: {BETA}: ") and p.stderr.count("\n") == 1
        assert stored[ALPHA].verify().revision == 3

        # a name that is not in the spec is a bad command line: exit 2, one line, no download
        since = len(nginx.requests())
        p = run_preload(spec, "--repo", "delta.example.org")
        assert p.returncode == 2
        assert p.stderr.strip().count("\n") == 0
        assert p.stderr.startswith("preload: --repo delta.example.org: not in ")
        assert nginx.requests()[since:] == []
    finally:
        nginx.stop()
