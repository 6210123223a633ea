"""Access lists (``cvmfs_format/access_list.py``): escaping of odd paths through the writer and the
reader, and a preload spec's ``access_list:`` selecting exactly such paths, end to end.

README: "The access list is text, one object per line, tab-separated: ``fqrn  /path  key
size`` (header ``# hep-exec access list v1``; ``\\\\``, ``\\t``, ``\\n`` escaped in paths). A
preload spec takes it as ``access_list: FILE`` (or a list of files) in a repository entry:
those paths are selected exactly, in addition to any include rules."
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cvmfs_format.access_list import (
    HEADER,
    AccessEntry,
    AccessListError,
    AccessRecorder,
    format_access_list,
    parse_access_list,
    read_access_list,
)
from cvmfs_format.verify import open_tree, walk
from tests.support.nginx import Nginx, Site
from tests.support.preloading import run_preload, write_spec
from tests.support.repos import Repo, publish_tree
from tests.support.stores import expected_objects, replica, verify_selected

FQRN = "al.example.org"

ODD = [
    "/tab\there",
    "/new\nline",
    "/back\\slash",
    "/literal\\t and \\n",  # a backslash before t and n: not a tab, not a newline
    "/trailing\\",
    "/\\\\double",
    "/all\t\n\\\t\n\\",
    "/dir\twith/file\nname",
]


def _entries(paths: list[str]) -> list[AccessEntry]:
    return [AccessEntry(FQRN, p, f"{i:040x}", i) for i, p in enumerate(paths)]


def test_odd_paths_are_escaped_one_line_four_fields() -> None:
    text = format_access_list(_entries(ODD))
    lines = text.split("\n")
    assert lines[0] == HEADER and lines[-1] == ""
    body = lines[1:-1]
    assert len(body) == len(ODD)  # a newline in a path does not start a line
    for line, path in zip(body, ODD, strict=True):
        fqrn, escaped, _key, _size = line.split("\t")  # a tab in a path is not a separator
        assert fqrn == FQRN
        assert escaped == path.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
    assert parse_access_list(text) == _entries(ODD)


def test_odd_paths_round_trip_through_a_written_file(tmp_path: Path) -> None:
    recorder = AccessRecorder()
    for e in _entries(ODD):
        recorder.add(e.fqrn, e.path, e.key, e.size)
    recorder.add(FQRN, ODD[0], "another key", 1)  # a second use of a path is not recorded
    path = tmp_path / "job.list"
    recorder.write(path)
    assert read_access_list(path) == _entries(ODD)


@pytest.mark.parametrize(
    ("field", "problem"),
    [
        ("/bad\\escape", r"bad escape '\\e' in path"),
        ("/ends\\", r"bad escape '\\' in path"),
        ("relative", "expected a repository name and a path starting /"),
    ],
)
def test_bad_path_field_names_file_and_line(tmp_path: Path, field: str, problem: str) -> None:
    path = tmp_path / "bad.list"
    path.write_text(f"{HEADER}\n{FQRN}\t/fine\tk\t1\n{FQRN}\t{field}\tk\t1\n")
    with pytest.raises(AccessListError, match=f"^{path}:3: {problem}$"):
        read_access_list(path)


# Any path a file system can hold: every character but NUL (and "/" only as a separator).
PATH = st.lists(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00/"), min_size=1),
    min_size=1,
    max_size=4,
).map(lambda parts: "/" + "/".join(parts))


@given(st.lists(PATH, min_size=1, max_size=5, unique=True))
def test_any_path_round_trips(paths: list[str]) -> None:
    assert parse_access_list(format_access_list(_entries(paths))) == _entries(paths)


def test_carriage_return_and_other_line_breaks_round_trip_through_a_file(tmp_path: Path) -> None:
    """Only ``\\n`` ends a line in the format: \\r, \\v, \\f, \\x1c-\\x1e, \\x85, U+2028 and
    U+2029 are ordinary characters of a path (str.splitlines() would split on them)."""
    paths = ["/cr\rhere", "/crlf\r\n", "/vt\x0b", "/ff\x0c", "/fs\x1c\x1d\x1e", "/nel\x85"]
    paths += ["/ls\u2028", "/ps\u2029"]
    recorder = AccessRecorder()
    for e in _entries(paths):
        recorder.add(e.fqrn, e.path, e.key, e.size)
    recorder.write(tmp_path / "job.list")
    assert read_access_list(tmp_path / "job.list") == _entries(paths)


# --- end to end: preload selecting by an access list --------------------------------------

FILES = {
    "/tab\there": b"tab\n",
    "/new\nline": b"newline\n",
    "/back\\slash": b"backslash\n",
    "/sub/all\t\n\\": b"all three\n",
    "/sub/literal\\t": b"backslash t\n",
    "/cr\rname": b"carriage return\n",
}
OTHERS = {
    "/tab": b"not selected\n",
    "/new": b"not selected either\n",
    "/sub/all": b"nor this\n",
    "/sub/literal\t": b"a real tab: not selected\n",
    "/cr": b"not selected\n",
}


def _source(root: Path) -> Path:
    for path, data in {**FILES, **OTHERS}.items():
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _record(origin: Repo, paths: set[str], list_path: Path) -> None:
    """An access list as hep-exec's recorder writes it, keys and sizes from the catalog."""
    local = origin.local
    tree = open_tree(local.read, origin.verified_manifest())
    recorder = AccessRecorder()
    for e in walk(tree, local.read):
        if e.path in paths:
            assert e.hash is not None
            recorder.add(origin.fqrn, e.path, e.hash.hex, e.size)
    assert len(recorder) == len(paths)
    recorder.add("other.example.org", "/tab\there", "0" * 40, 4)  # another repository's entry
    recorder.write(list_path)


def test_preload_selects_exactly_the_odd_paths_of_an_access_list(tmp_path: Path) -> None:
    origin, _ = publish_tree(_source(tmp_path / "src"), tmp_path / "origin", FQRN, tmp_path / "k")
    record = tmp_path / "job.list"
    _record(origin, set(FILES), record)
    nginx = Nginx(tmp_path / "nginx", [Site(root=origin.store)])
    try:
        spec = write_spec(
            tmp_path / "s.yaml",
            tmp_path / "store",
            origin,
            [nginx.sites[0].url()],
            extra=f"    access_list: {record}\n",
        )
        p = run_preload(spec, "--json")
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)["repositories"]
        assert r["files"] == len(FILES)
        stored = replica(origin, tmp_path / "store")
        assert set(stored.objects()) == expected_objects(origin, set(FILES), {""})
        assert verify_selected(stored, set(FILES)) == 1

        # with an include rule: the rule's paths as well
        both = write_spec(
            tmp_path / "both.yaml",
            tmp_path / "both",
            origin,
            [nginx.sites[0].url()],
            "    include: [/tab]\n",
            f"    access_list: [{record}]\n",
        )
        p = run_preload(both, "--json")
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)["repositories"]
        assert r["files"] == len(FILES) + 1
        selected = {*FILES, "/tab"}
        stored = replica(origin, tmp_path / "both")
        assert set(stored.objects()) == expected_objects(origin, selected, {""})
        assert verify_selected(stored, selected) == 1
    finally:
        nginx.stop()
