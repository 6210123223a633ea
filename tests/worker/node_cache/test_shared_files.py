"""Objects of a node's cache that serve many paths (empty ``__init__.py`` files, one licence in
every package): a new job on a warm node opens them in its own process like any other, and
fstat of each fd says what the tracer would say (the stat of the path opened last).

Real hep-exec jobs against a real hep-proxy on 127.0.0.1 serving a tree published here.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.node_cache import ENV, FQRN, HEP_EXEC, Tree, job_argv
from tests.support.repos import publish_tree

pytestmark = pytest.mark.slow

PACKAGES = 24


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """Packages each with an empty __init__.py, one licence text, a py.typed of its own mode
    and a module of its own."""
    base = tmp_path_factory.mktemp("shared")
    src = base / "src"
    rng = random.Random(5)
    files: dict[str, bytes] = {}
    for i in range(PACKAGES):
        files[f"/pkg{i:02d}/__init__.py"] = b""
        files[f"/pkg{i:02d}/LICENSE"] = b"Permission is hereby granted, free of charge\n" * 20
        files[f"/pkg{i:02d}/mod.py"] = f"x = {i}\n".encode() * rng.randint(1, 50)
    for rel, data in files.items():
        p = src / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(0o644 if "LICENSE" not in rel or int(rel[4:6]) % 2 else 0o600)
    repo, _ = publish_tree(src, base / "store", FQRN, base / "keys")
    return Tree(repo, {k: hashlib.sha256(v).hexdigest() for k, v in files.items()})


# argv: files under /cvmfs; for each: open, fstat vs stat, sha256; then for each pair of
# neighbours: open both, fstat of the first fd after the second open.  Prints JSON.
JOB = r"""
import hashlib, json, os, sys
paths = sys.argv[1:]
def key(s):
    return [s.st_ino, s.st_mode, s.st_size, s.st_mtime_ns, s.st_nlink]
out = {"files": {}, "pairs": []}
for p in paths:
    fd = os.open(p, os.O_RDONLY)
    f, s = os.fstat(fd), os.stat(p)
    data = os.read(fd, 1 << 20)
    os.close(fd)
    out["files"][p] = [key(f) == key(s), hashlib.sha256(data).hexdigest()]
for a, b in zip(paths, paths[1:]):
    fa = os.open(a, os.O_RDONLY)
    fb = os.open(b, os.O_RDONLY)
    out["pairs"].append([key(os.fstat(fa)), key(os.fstat(fb))])
    os.close(fa)
    os.close(fb)
print(json.dumps(out))
"""


def test_a_warm_node_job_opens_shared_objects_in_its_own_process(
    tracing: None, tree: Tree, proxy, cache_dir: Path
) -> None:
    paths = sorted(tree.digests, key=lambda p: (p.rsplit("/", 1)[1], p))  # licences together
    cvmfs = [f"/cvmfs/{FQRN}{p}" for p in paths]
    argv = [*HEP_EXEC, *job_argv(proxy, cache_dir)]

    def job(*options: str) -> subprocess.CompletedProcess[str]:
        run = subprocess.run([*argv, "--stats-internals", *options, "--", sys.executable,
                              "-c", JOB, *cvmfs], env=ENV, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stderr
        return run

    job()  # warms the node: every object, the node's answers
    warm = job()
    oracle = job("--no-in-process")
    got = json.loads(warm.stdout)
    assert got == json.loads(oracle.stdout)
    for p, (same, digest) in got["files"].items():
        assert same, f"{p}: fstat differs from stat"
        assert digest == tree.digests[p.removeprefix(f"/cvmfs/{FQRN}")], p
    # an older fd on a shared object says the stat of the path opened last, as the tracer's
    shared = 0
    assert len(got["pairs"]) == len(paths) - 1
    for (a, b), first, second in zip(got["pairs"], paths, paths[1:], strict=False):
        if tree.digests[first] == tree.digests[second]:
            shared += 1
            assert a == b, (first, second)
    assert shared >= 2 * (PACKAGES - 1)
    # every open in the warm job was made inside it, shared objects' too (before: the
    # 2 x 24 opens of the empty files and licences, and their pairs', went to the tracer)
    m = re.search(r"in-process opens: (\d+) \(not trapped; (\d+) handed", warm.stderr)
    assert m, warm.stderr
    opens = len(paths) + 2 * (len(paths) - 1)
    assert int(m[1]) >= opens - 8 and int(m[2]) <= 8, warm.stderr
