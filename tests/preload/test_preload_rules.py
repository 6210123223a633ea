"""Sans-I/O cores of preload: shrinkwrap rules, spec parsing, fail-over decisions."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cvmfs_download.core import backoff_delay
from preload.rules import RuleError, Rules
from preload.spec import SpecError, load_spec, parse_spec

PROJECT = Path(__file__).resolve().parents[2]


def rules(*lines: str) -> Rules:
    return Rules.parse([(line, f"t:{i}") for i, line in enumerate(lines, 1)])


def test_deep_flat_exact_exclude() -> None:
    r = rules("/sw/v1/*", "!/sw/v1/share", "^/etc/*", "/sw/v2/bin/tool", "# comment", "")
    assert r.selects("/sw/v1/bin/tool") and r.selects("/sw/v1/a/b/c/d")
    assert not r.selects("/sw/v1/share/doc") and not r.selects("/sw/v1/share")
    assert r.selects("/etc/conf") and not r.selects("/etc/sub/x")
    assert r.selects("/sw/v2/bin/tool") and not r.selects("/sw/v2/bin/other")
    assert not r.selects("/data/x")
    # directories walked: pass-through to deeper rules, whole subtrees, flat dirs
    assert r.descend("") and r.descend("/sw") and r.descend("/sw/v2") and r.descend("/sw/v2/bin")
    assert r.descend("/sw/v1/lib") and r.descend("/etc")
    assert not r.descend("/sw/v1/share") and not r.descend("/etc/sub") and not r.descend("/data")
    assert not r.descend("/sw/v2/lib")


def test_deeper_include_beats_exclude_and_later_line_wins() -> None:
    r = rules("!/a", "/a/b/*")
    assert r.selects("/a/b/c") and not r.selects("/a/c") and r.descend("/a")
    r = rules("/a/*", "!/a/*")
    assert not r.selects("/a/x")
    r = rules("!/a", "/a/*")
    assert r.selects("/a/x")


def test_no_include_means_everything_and_caret_without_star_is_exact() -> None:
    r = rules("!/big")
    assert r.selects("/x/y") and not r.selects("/big/y") and not r.descend("/big")
    r = rules("^/d")
    assert r.selects("/d") and not r.selects("/d/x")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("relative/path", "must start with"),
        ("/a*/b", "only allowed as a final"),
        ("/a/../b", "not allowed"),
        ("%/x", "must start with"),
    ],
)
def test_bad_rules_name_their_source(line: str, problem: str) -> None:
    with pytest.raises(RuleError, match=rf"t:1: rule .*{problem}"):
        rules(line)


GOOD = """\
store: /srv/cvmfs-store
concurrency: 8
timeout: 20
retries: 3
repositories:
  - name: cms.cern.ch
    servers:
      - http://s1.example/cvmfs/@fqrn@
      - http://s2.example:8000/cvmfs/@org@.cern.ch
    proxies: "http://p1:3128|http://p2:3128;DIRECT"
    keys: /etc/cvmfs/keys/cern.ch
    include:
      - /SITECONF/*
      - ^/slc7_amd64_gcc700/*
    exclude: [/SITECONF/T0]
    revision: 42
"""


def test_spec_parses_to_frozen_values() -> None:
    spec = parse_spec(GOOD, Path("cms.yaml"))
    assert spec.concurrency == 8 and spec.timeout == 20 and spec.retries == 3
    (repo,) = spec.repositories
    assert repo.servers == (
        "http://s1.example/cvmfs/cms.cern.ch",
        "http://s2.example:8000/cvmfs/cms.cern.ch",
    )
    assert str(repo.proxies) == "http://p1:3128|http://p2:3128;DIRECT"
    assert repo.revision == 42 and repo.keys == (Path("/etc/cvmfs/keys/cern.ch"),)
    assert repo.rules.selects("/SITECONF/T1/x") and not repo.rules.selects("/SITECONF/T0/x")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("concurrency: 8", "concurrency: 0", r"cms.yaml:2: concurrency: expected an integer"),
        ("timeout: 20", "timeout: soon", r"cms.yaml:3: timeout: expected a number"),
        ("retries: 3", "retires: 3", r"cms.yaml:4: retires: unknown key"),
        ("  - name: cms.cern.ch", "  - name: cms", r"cms.yaml:6: repositories\[0\].name: 'cms'"),
        ("      - http://s1.example", "      - ftp://s1.example", r"cms.yaml:7: .*servers: .*ftp"),
        ('DIRECT"', 'DIRECT|ftp://x"', r"cms.yaml:10: .*proxies: "),
        (
            "      - /SITECONF/*",
            "      - SITECONF/*",
            r"cms.yaml:13: .*include: rule 'SITECONF/\*'",
        ),
        ("    revision: 42", "    revision: latest", r"cms.yaml:16: .*revision: expected an int"),
        ("    keys: /etc/cvmfs/keys/cern.ch\n", "", r"cms.yaml:6: .*required key 'keys'"),
        ("timeout: 20", "timeout: [", r"cms.yaml:\d+: not valid YAML"),
    ],
)
def test_bad_spec_names_file_line_and_key(old: str, new: str, expected: str) -> None:
    assert old in GOOD
    with pytest.raises(SpecError, match=expected):
        parse_spec(GOOD.replace(old, new), Path("cms.yaml"))


def test_spec_takes_servers_proxies_and_keys_from_a_cvmfs_configuration(tmp_path: Path) -> None:
    """``cvmfs_config:`` (the spec's, or a repository's own): what the spec does not say
    comes from the site's files, read as the real client reads them."""
    etc = tmp_path / "cvmfs"
    keys = etc / "keys" / "cern.ch"
    for d in (etc / "domain.d", keys):
        d.mkdir(parents=True)
    (keys / "cern.ch.pub").write_text("checked when preload starts\n")
    (etc / "default.local").write_text("CVMFS_HTTP_PROXY='http://squid:3128;DIRECT'\n")
    (etc / "domain.d" / "cern.ch.conf").write_text(
        'CVMFS_SERVER_URL="http://s1.example/cvmfs/@fqrn@;http://s2.example/cvmfs/@fqrn@"\n'
        f"CVMFS_KEYS_DIR={keys}\n"
    )
    text = f"store: /srv/store\ncvmfs_config: {etc}\nrepositories:\n  - name: cms.cern.ch\n"
    (repo,) = parse_spec(text, Path("cms.yaml")).repositories
    assert repo.servers == (
        "http://s1.example/cvmfs/cms.cern.ch",
        "http://s2.example/cvmfs/cms.cern.ch",
    )
    assert str(repo.proxies) == "http://squid:3128;DIRECT"
    assert repo.keys == (keys / "cern.ch.pub",)
    # the spec's own values win
    text += "    servers: http://mine/cvmfs/@fqrn@\n    proxies: DIRECT\n"
    (repo,) = parse_spec(text, Path("cms.yaml")).repositories
    assert repo.servers == ("http://mine/cvmfs/cms.cern.ch",) and str(repo.proxies) == "DIRECT"
    # a repository the site says nothing about, and a missing directory: file, line, key
    with pytest.raises(
        SpecError,
        match=r"cms.yaml:4: repositories\[x.example.org\]: required key 'servers' missing \(and ",
    ):
        parse_spec(
            text.replace("cms.cern.ch", "x.example.org").split("    servers")[0], Path("cms.yaml")
        )
    with pytest.raises(SpecError, match=r"cms.yaml:2: cvmfs_config: /nope: no such CernVM-FS"):
        parse_spec(text.replace(str(etc), "/nope"), Path("cms.yaml"))
    (etc / "default.local").write_text("CVMFS_HTTP_PROXY=auto\n")
    with pytest.raises(SpecError, match=r"default.local:1: CVMFS_HTTP_PROXY=auto"):
        parse_spec(text.split("    servers")[0], Path("cms.yaml"))


def test_shipped_configs_all_parse() -> None:
    configs = sorted((PROJECT / "configs").glob("*.yaml"))
    names = {p.stem for p in configs}
    assert {"cms", "atlas", "lhcb", "alice", "sft", "unpacked", "oasis", "eessi", "demo"} <= names
    for path in configs:
        spec = load_spec(path)
        for repo in spec.repositories:
            assert repo.servers and repo.keys
            if path.stem != "demo":
                assert all(not s.startswith("http://127.") for s in repo.servers)
                assert all(str(k).startswith("/etc/cvmfs/keys/") for k in repo.keys)


class _End(random.Random):
    """A jitter source that always draws one end of the range it is asked for."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def test_backoff_doubles_from_init_until_the_cap() -> None:
    """README: retry delay uniform random in [0, min(backoff_max, backoff_init·2ⁿ)]."""
    spec = parse_spec(GOOD, Path("cms.yaml"))
    init, cap = spec.backoff_init, spec.backoff_max
    assert (init, cap) == (0.5, 2.0)  # the documented defaults
    bounds = [backoff_delay(n, init, cap, _End(high=True)) for n in range(6)]
    assert bounds == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert [backoff_delay(n, init, cap, _End(high=False)) for n in range(6)] == [0.0] * 6
    bounds = [backoff_delay(n, 0.1, 5.0, _End(high=True)) for n in range(8)]
    assert bounds == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])


def test_backoff_jitter_is_uniform_below_the_bound() -> None:
    rng = random.Random(0)  # seeded: the draws, and so this test, are the same every run
    for attempt, bound in enumerate([0.5, 1.0, 2.0, 2.0]):
        draws = [backoff_delay(attempt, 0.5, 2.0, rng) for _ in range(1000)]
        assert all(0 <= d <= bound for d in draws), attempt
        assert min(draws) < 0.02 * bound and max(draws) > 0.98 * bound, attempt
        assert abs(sum(draws) / len(draws) - bound / 2) < 0.05 * bound, attempt
        assert len(set(draws)) == len(draws)  # jittered, not a few fixed steps


def test_progress_line_and_summary() -> None:
    import io

    from preload.progress import Progress, RepoReport, summary_lines

    out = io.StringIO()
    p = Progress(out, enabled=True)
    p.begin("cms.cern.ch", 4, 4000)
    p.start -= 10
    p.advance(1000, 1000)
    p.draw()
    line = out.getvalue()
    assert "cms.cern.ch: 1/4 objects" in line and "25%" in line and "ETA 0m30s" in line
    r = RepoReport(
        "cms.cern.ch",
        revision=7,
        previous_revision=6,
        server="http://s1",
        failover=["switched to server http://s2 after: x (HTTP 500)"],
    )
    text = "\n".join(summary_lines(r))
    assert "revision 7 (was 6)" in text and "fail-over: said on stderr (1 line)" in text
    assert "switched to server" not in text  # said on stderr when it happened, not again
