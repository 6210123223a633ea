"""preload's writer thread (preload.store.ObjectWriter): verified objects reach their final
names whole, a failure is kept and reported once, nothing is left in the temp dir."""

from __future__ import annotations

import asyncio
from pathlib import Path

from preload.store import ObjectWriter, RepoStore


async def test_objects_land_whole_and_nothing_is_left_behind(tmp_path: Path) -> None:
    store = RepoStore(tmp_path, "w.example.org")
    store.prepare()
    w = ObjectWriter(store, max_pending=1000)
    want = {f"data/{i:02x}/obj{i}": bytes([i]) * (i * 100) for i in range(40)}
    for rel, data in want.items():
        w.put(rel, data)
        await w.room()  # at most ~1000 bytes wait at any time
    await w.close()
    assert w.error is None
    assert {rel: (store.dir / rel).read_bytes() for rel in want} == want
    assert list(store.tmp_dir.iterdir()) == []


async def test_a_failure_is_kept_and_what_follows_is_dropped(tmp_path: Path) -> None:
    store = RepoStore(tmp_path, "w.example.org")
    store.prepare()
    w = ObjectWriter(store)
    w.put("data/00/good", b"x")
    w.put("data/no-such-dir/bad", b"y")
    w.put("data/01/after", b"z")
    await asyncio.wait_for(w.close(), 10)
    assert w.error is not None and w.error.strerror
    assert w.error.filename == f"{store.dir}/data/no-such-dir/bad"
    assert (store.dir / "data/00/good").read_bytes() == b"x"
    assert not (store.dir / "data/01/after").exists()
    assert list(store.tmp_dir.iterdir()) == []
