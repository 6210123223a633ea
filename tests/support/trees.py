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


ODD_NAMES = ("a", "b", "data", "lib", "x y", "ünï", "README", "v1.2", ".hidden", "z" * 40, "-dash")


def make_random_tree(
    root: Path,
    rng: random.Random,
    files: int = 60,
    *,
    every_kind: bool = False,
    hardlinks_across_dirs: bool = False,
    catalogs: bool = False,
    fifo: bool = False,
    chunked: bool = False,
) -> Path:
    """A random tree of ``files`` entries drawn one at a time: nested directories and files
    of many sizes and modes.

    By default the names are ``d<i>``, ``f<i>.dat`` and ``l<i>``: relative symlinks to files
    made so far, drawn among the rest.  ``every_kind``: what an oracle compares instead: odd
    names (spaces, unicode, dots, a leading dash, 40 characters), directories 0755/0750/0700
    at most four deep, setuid files, empty files more often; then five hardlinks (one group of
    three), twelve relative symlinks to files, directories and nowhere, ``out`` -> /etc
    (leaving the mount) and an ``empty`` directory.  The hardlinks stay in their file's
    directory (CVMFS keeps hardlinks within one) unless ``hardlinks_across_dirs`` (a host
    directory can).  ``catalogs``: about a third of the directories hold a ``.cvmfscatalog``
    (nested catalogs once published).  ``fifo``: a named pipe ``fifo`` at the top.
    ``chunked``: ``chunked.bin``, :data:`CHUNKED_SIZE` bytes (the publisher chunks it).
    """
    root.mkdir(parents=True)
    dirs = [root]
    made: list[Path] = []
    if every_kind:
        sizes = [0, 0, 1, 100, 4096, 4097, 70000, 300000]
        modes = [0o644, 0o755, 0o600, 0o444, 0o4755]
    else:
        sizes = [0, 1, 100, 4096, 4097, 65536, 200_000]
        modes = [0o644, 0o755, 0o600, 0o444]
    for i in range(files):
        parent = rng.choice(dirs)
        stem = f"{rng.choice(ODD_NAMES)}{i}" if every_kind else ""
        kind = rng.random()
        too_deep = every_kind and len(parent.relative_to(root).parts) >= 4
        if kind < (0.25 if every_kind else 0.2) and not too_deep:
            d = parent / (stem or f"d{i}")
            d.mkdir()
            if every_kind:
                os.chmod(d, rng.choice([0o755, 0o750, 0o700]))
            dirs.append(d)
            if catalogs and rng.random() < 0.3:
                (d / ".cvmfscatalog").write_bytes(b"")
        elif not every_kind and kind < 0.3 and made:
            target = rng.choice(made)
            os.symlink(os.path.relpath(target, parent), parent / f"l{i}")
        else:
            size = rng.choice(sizes)
            f = parent / (stem or f"f{i}.dat")
            f.write_bytes(rng.randbytes(size))
            os.chmod(f, rng.choice(modes))
            made.append(f)
    if every_kind:
        for i, f in enumerate(rng.sample(made, 5)):
            where = rng.choice(dirs) if hardlinks_across_dirs else f.parent
            os.link(f, where / f"hard{i}")
            if i == 0:
                os.link(f, where / "hard0b")
        for i in range(12):
            parent = rng.choice(dirs)
            target = rng.choice(made + dirs)
            rel = os.path.relpath(target, parent) if i % 4 else "does/not/exist"
            (parent / f"sym{i}").symlink_to(rel)
        (root / "out").symlink_to("/etc")
        (root / "empty").mkdir()
    if fifo:
        os.mkfifo(root / "fifo")
    if chunked:
        (root / "chunked.bin").write_bytes(rng.randbytes(CHUNKED_SIZE))
    return root
