"""preload's command line for a newcomer, on the real CLI against a real server on loopback:
a store that is a file, include rules that match nothing, an empty selection, one JSON line
per run (also on errors), fail-over said once, dashed spec keys, --log-level."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from preload.spec import SpecError, parse_spec
from tests.support.network import dead_url
from tests.support.preloading import run_preload, write_spec
from tests.support.repos import Repo, publish_tree
from tests.support.store_server import StoreServer

FQRN = "newcomer.example.org"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    base = tmp_path_factory.mktemp("newcomer")
    src = base / "src"
    for rel in ("sw/v1/bin/tool", "sw/v1/lib/libx.so", "sw/v2/bin/tool", "etc/conf"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"{rel}\n" * 50)
    r, _ = publish_tree(src, base / "store", FQRN, base / "keys")
    return r


@pytest.fixture(scope="module")
def server(repo: Repo) -> Iterator[StoreServer]:
    s = StoreServer(repo.store)
    yield s
    s.stop()


def _url(s: StoreServer) -> str:
    return f"{s.url}/cvmfs/@fqrn@"


def _rules(*include: str) -> str:
    return "    include:\n" + "".join(f"      - {r}\n" for r in include)


def _line_of(spec: Path, text: str) -> int:
    (n,) = [i for i, line in enumerate(spec.read_text().splitlines(), 1) if line.endswith(text)]
    return n


def _json_line(stdout: str) -> dict[str, object]:
    assert stdout.count("\n") == 1 and stdout.endswith("\n"), stdout
    record = json.loads(stdout)
    assert isinstance(record, dict)
    return record


def test_store_that_is_a_file(tmp_path: Path, repo: Repo, server: StoreServer) -> None:
    store = tmp_path / "store"
    store.write_text("a file")
    spec = write_spec(tmp_path / "s.yaml", store, repo, [_url(server)])
    p = run_preload(spec)
    assert p.returncode == 2, p.stderr
    assert p.stderr == f"preload: {spec}: store: {store}: is a file, not a directory\n"
    p = run_preload(spec, "--json")
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    record = _json_line(p.stdout)
    assert record["ok"] is False and record["exit"] == 2
    assert record["error"] == f"{spec}: store: {store}: is a file, not a directory"


def test_include_rules_that_match_nothing_warn_once_each(
    tmp_path: Path, repo: Repo, server: StoreServer
) -> None:
    rules = _rules("/sw/v1/*", "/nope/*", "/sw/v2", "/etc/conf")
    spec = write_spec(tmp_path / "s.yaml", tmp_path / "store", repo, [_url(server)], rules)
    p = run_preload(spec, "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "selected 3 files" in p.stdout
    nope, v2 = _line_of(spec, "- /nope/*"), _line_of(spec, "- /sw/v2")
    where = f"repositories[{FQRN}].include"
    assert p.stderr.splitlines() == [
        f"preload: {FQRN}: {spec}:{nope}: {where}: rule '/nope/*' matches nothing (revision 1)",
        f"preload: {FQRN}: {spec}:{v2}: {where}: rule '/sw/v2' names a directory: it selects "
        "none of its files (write /sw/v2/*) (revision 1)",
    ]
    # the JSON record carries them too; --log-level error keeps stderr quiet
    p = run_preload(spec, "--json", "--log-level", "error")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    repositories = _json_line(p.stdout)["repositories"]
    assert isinstance(repositories, list)
    (r,) = repositories
    assert len(r["warnings"]) == 2 and "'/nope/*' matches nothing" in r["warnings"][0]


def test_a_selection_of_nothing_fails(tmp_path: Path, repo: Repo, server: StoreServer) -> None:
    """Exit 1 (a repository failed), not a silent success: the store is left as it was."""
    spec = write_spec(
        tmp_path / "s.yaml", tmp_path / "store", repo, [_url(server)], _rules("/nope/*")
    )
    for extra in ([], ["--dry-run"]):
        p = run_preload(spec, "--no-progress", *extra)
        assert p.returncode == 1, p.stderr
        lines = p.stderr.splitlines()
        assert len(lines) == 2 and "'/nope/*' matches nothing" in lines[0], p.stderr
        assert lines[1] == (
            f"preload: {FQRN}: the spec selects no file of revision 1 (see its include "
            "rules); the store keeps its previous revision"
        )
    assert not (tmp_path / "store" / FQRN / ".cvmfspublished").exists()


def test_json_is_one_line_whatever_happens(tmp_path: Path, repo: Repo, server: StoreServer) -> None:
    spec = write_spec(tmp_path / "s.yaml", tmp_path / "store", repo, [_url(server)])
    for _ in range(2):  # a first run and an unchanged re-run: two lines for the .jsonl file
        p = run_preload(spec, "--json")
        assert p.returncode == 0, p.stderr
        record = _json_line(p.stdout)
        assert record["ok"] is True and record["exit"] == 0 and record["spec"] == str(spec)
        assert isinstance(record["finished"], str) and record["finished"].endswith("Z")
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text().replace("concurrency: 4", "concurrency: lots"))
    p = run_preload(bad, "--json")
    assert p.returncode == 2
    message = f"{bad}:2: concurrency: expected an integer in [1, 1024], got 'lots'"
    assert p.stderr == f"preload: {message}\n"
    record = _json_line(p.stdout)
    assert record["ok"] is False and record["error"] == message and record["exit"] == 2
    p = run_preload(spec, "--json", "--bogus")
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "--bogus" in _json_line(p.stdout)["error"]  # type: ignore[operator]


def test_failover_is_said_once(tmp_path: Path, repo: Repo, server: StoreServer) -> None:
    """One line on stderr when it happens; the summary on stdout counts it, not repeats it."""
    spec = write_spec(
        tmp_path / "s.yaml", tmp_path / "store", repo, [f"{dead_url()}/cvmfs/@fqrn@", _url(server)]
    )
    p = run_preload(spec, "--no-progress")
    assert p.returncode == 0, p.stderr
    both = p.stdout + p.stderr
    assert both.count("switched to server") == 1, both
    assert p.stderr.count("\n") == 1 and "connection refused" in p.stderr
    assert "fail-over: said on stderr (1 line)" in p.stdout


def test_failover_of_every_object_is_counted_not_repeated(
    tmp_path: Path, repo: Repo, server: StoreServer
) -> None:
    """A Stratum-1 that lags (404 for the objects) makes every object fall over: the first
    is said, the others counted in one line at the end."""
    lagging = StoreServer(repo.store)
    try:
        lagging.missing = {f"/cvmfs/{FQRN}/{rel}" for rel in repo.objects() if rel[-1] != "C"}
        spec = write_spec(
            tmp_path / "s.yaml", tmp_path / "store", repo, [_url(lagging), _url(server)]
        )
        p = run_preload(spec, "--no-progress")
    finally:
        lagging.stop()
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 2 and "switched to server" in lines[0] and "HTTP 404" in lines[0]
    assert lines[1].startswith(f"preload: {FQRN}: ") and "more requests switched to" in lines[1]


def test_spec_keys_may_be_spelled_with_dashes(tmp_path: Path) -> None:
    """As in hep-proxy's and hep-exec's YAML: connect-timeout is connect_timeout."""
    keys = tmp_path / "k.pub"
    text = (
        "store: /s\nconnect-timeout: 3\nbackoff-init: 0.1\nrepositories:\n"
        f"  - name: a.example.org\n    servers: http://s/cvmfs/@fqrn@\n    keys: {keys}\n"
    )
    spec = parse_spec(text, Path("x.yaml"))
    assert spec.connect_timeout == 3 and spec.backoff_init == 0.1
    with pytest.raises(SpecError, match=r"x\.yaml:3: connect_timeout: given twice"):
        parse_spec(text.replace("backoff-init: 0.1", "connect_timeout: 4"), Path("x.yaml"))
    with pytest.raises(SpecError, match=r"x\.yaml:2: connect-timout: unknown key"):
        parse_spec(text.replace("connect-timeout", "connect-timout"), Path("x.yaml"))
