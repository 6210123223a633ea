"""Source trees for worker tests: odd corners of a file system, published by our publisher."""

from __future__ import annotations

import os
import random
from pathlib import Path

CHUNKED_SIZE = 9 * 1024 * 1024 + 123  # > publisher CHUNK_SIZE (4 MiB): three P chunks


def make_odd_tree(root: Path, outside_target: str = "/etc") -> Path:
    """Every kind of entry the name space must get right (no cross-directory hardlinks)."""
    root.mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "hello.txt").write_bytes(b"hello\n")
    (root / "exec.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "exec.sh", 0o755)
    (root / "private").write_bytes(b"secret")
    os.chmod(root / "private", 0o600)
    (root / "with space é").write_bytes(b"unicode name\n")
    sub = root / "dir" / "sub" / "deep"
    sub.mkdir(parents=True)
    (sub / "leaf.txt").write_bytes(b"leaf\n" * 100)
    (root / "dir" / "a.txt").write_bytes(b"a" * 5000)
    (root / "dir" / "emptydir").mkdir()
    # hardlinks: a group of three inside one directory
    hl = root / "hard"
    hl.mkdir()
    (hl / "h1").write_bytes(b"hardlinked content\n")
    os.link(hl / "h1", hl / "h2")
    os.link(hl / "h1", hl / "h3")
    (hl / "single").write_bytes(b"hardlinked content\n")  # same content, different inode
    # symlinks
    links = root / "links"
    links.mkdir()
    os.symlink("../hello.txt", links / "rel")
    os.symlink("../dir/sub", links / "todir")
    os.symlink("todir/deep/leaf.txt", links / "chain")
    os.symlink("chain", links / "chain2")
    os.symlink(outside_target, links / "outside")
    os.symlink("../../../../../../../../../../tmp", links / "up_and_out")
    os.symlink("nowhere", links / "dangling")
    os.symlink("loop_b", links / "loop_a")
    os.symlink("loop_a", links / "loop_b")
    os.symlink("self", links / "self")
    os.symlink("../hello.txt/", links / "slash_to_file")
    os.symlink("../dir/", links / "slash_to_dir")
    os.symlink("..", links / "dotdot")
    os.symlink(".", links / "dot")
    os.symlink("../empty", links / "to_empty")
    # nested catalog
    nested = root / "nested"
    (nested / "inner").mkdir(parents=True)
    (nested / ".cvmfscatalog").write_bytes(b"")
    (nested / "inner" / "x.txt").write_bytes(b"in a nested catalog\n")
    deeper = nested / "inner" / "deeper"
    deeper.mkdir()
    (deeper / ".cvmfscatalog").write_bytes(b"")
    (deeper / "y.txt").write_bytes(b"two levels down\n")
    os.symlink("../../../hello.txt", deeper / "back_to_root")
    # special and big
    os.mkfifo(root / "fifo")
    big = random.Random(7).randbytes(CHUNKED_SIZE)
    (root / "big.bin").write_bytes(big)
    return root


def make_variant_links(root: Path) -> None:
    """Variant symlinks (not resolvable on the source side, tested separately)."""
    v = root / "variant"
    v.mkdir()
    (v / "a.txt").write_bytes(b"A\n")
    (v / "b.txt").write_bytes(b"B\n")
    os.symlink("$(WHICH:-a).txt", v / "pick")
    os.symlink("$(WHICH).txt", v / "bare")
    os.symlink("$(TOP:-/etc)", v / "top")


def make_random_tree(root: Path, rng: random.Random, files: int = 60) -> Path:
    """A random tree: nested directories, files of many sizes, relative symlinks."""
    root.mkdir(parents=True)
    dirs = [root]
    made: list[Path] = []
    for i in range(files):
        parent = rng.choice(dirs)
        kind = rng.random()
        if kind < 0.2:
            d = parent / f"d{i}"
            d.mkdir()
            dirs.append(d)
        elif kind < 0.3 and made:
            target = rng.choice(made)
            os.symlink(os.path.relpath(target, parent), parent / f"l{i}")
        else:
            size = rng.choice([0, 1, 100, 4096, 4097, 65536, 200_000])
            f = parent / f"f{i}.dat"
            f.write_bytes(rng.randbytes(size))
            os.chmod(f, rng.choice([0o644, 0o755, 0o600, 0o444]))
            made.append(f)
    return root
