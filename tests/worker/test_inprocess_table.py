"""The in-process answers' table grows (worker/trace/_fastopen_table.c): a job starts with a
small one and moves its answers into bigger ones as it learns more, so a job pays for the
table it needs, not for the biggest.  Tracees that read the old size keep reading the old
table, so an answer withdrawn after a move (an evicted RAM file) must be gone from every
table.

Real hep-exec against a tree of 2,400 files published by our publisher and served by nginx
on loopback; a C program compiled here stats, opens and checksums every file, round after
round, and the bytes it prints are compared with the source files.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hep_exec import CLI, Served, World
from tests.support.tracing import compile_c, ensure_built, env_with, needs_ptrace, ram_dir

pytestmark = needs_ptrace

FQRN = "grow.test.org"
MOUNT = f"/cvmfs/{FQRN}"
DIRS, PER_DIR = 40, 60  # 2,400 files: their stats and opens outgrow the first table 4 times

PROGRAM = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ROUNDS LIST: every file of LIST (one path a line) stat'ed, opened and checksummed, ROUNDS
 * times.  The first round prints "path size checksum"; every later one prints how many
 * files gave another size or checksum, or an fstat unlike their stat. */
int main(int argc, char **argv) {
    int rounds = atoi(argv[1]);
    FILE *list = fopen(argv[2], "r");
    static char paths[4000][256];
    static unsigned long long sums[4000];
    static long long sizes[4000];
    int n = 0;
    while (n < 4000 && fgets(paths[n], sizeof paths[n], list))
        paths[n][strcspn(paths[n], "\n")] = 0, n++;
    for (int r = 0; r < rounds; r++) {
        int bad = 0;
        for (int i = 0; i < n; i++) {
            struct stat a, b;
            if (stat(paths[i], &a))
                return printf("%s: stat: %s\n", paths[i], strerror(errno)), 3;
            int fd = open(paths[i], O_RDONLY);
            if (fd < 0 || fstat(fd, &b))
                return printf("%s: open: %s\n", paths[i], strerror(errno)), 4;
            unsigned long long h = 1469598103934665603ULL;
            unsigned char buf[8192];
            ssize_t k;
            while ((k = read(fd, buf, sizeof buf)) > 0)
                for (ssize_t j = 0; j < k; j++) h = (h ^ buf[j]) * 1099511628211ULL;
            close(fd);
            int same = a.st_ino == b.st_ino && a.st_size == b.st_size && a.st_mode == b.st_mode;
            if (r == 0) {
                sums[i] = h, sizes[i] = a.st_size;
                printf("%s %lld %016llx %d\n", paths[i], (long long)a.st_size, h, same);
            } else if (h != sums[i] || a.st_size != sizes[i] || !same) {
                bad++;
            }
        }
        if (r > 0)
            printf("round %d: %d differ\n", r, bad);
    }
    return 0;
}
"""


# The same walk by THREADS threads at once, each starting at its own place in the list: their
# first touches trap while the others look up answers in the table the tracer is growing
# (and, under a RAM limit, withdrawing from).  Printed: thread 0's first reading of each file
# ("path size checksum"), then, per file, in how many readings of any thread fstat of the
# open fd disagreed with stat of the path (files with the same content share one RAM file,
# whose fstat says the path opened last: docs/hep-exec.md), then how many readings' bytes or
# size differ from thread 0's first.
THREADED = r"""
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAXN 4000
#define THREADS 4
static char paths[MAXN][256];
static int n, rounds;
static unsigned long long sums[THREADS][MAXN];
static long long sizes[THREADS][MAXN];
static int unlike[MAXN], bad[THREADS], failed[THREADS];

static void *walk(void *arg) {
    int t = (int)(long)arg;
    for (int r = 0; r < rounds; r++)
        for (int k = 0; k < n; k++) {
            int i = (k + t * n / THREADS) % n;
            struct stat a, b;
            int fd = -1;
            if (stat(paths[i], &a) || (fd = open(paths[i], O_RDONLY)) < 0 || fstat(fd, &b)) {
                fprintf(stderr, "%s: %s\n", paths[i], strerror(errno));
                failed[t] = 1;
                return NULL;
            }
            unsigned long long h = 1469598103934665603ULL;
            unsigned char buf[8192];
            ssize_t got;
            while ((got = read(fd, buf, sizeof buf)) > 0)
                for (ssize_t j = 0; j < got; j++) h = (h ^ buf[j]) * 1099511628211ULL;
            close(fd);
            if (a.st_ino != b.st_ino || a.st_size != b.st_size || a.st_mode != b.st_mode)
                __atomic_fetch_add(&unlike[i], 1, __ATOMIC_RELAXED);
            if (r == 0)
                sums[t][i] = h, sizes[t][i] = a.st_size;
            else if (h != sums[t][i] || a.st_size != sizes[t][i])
                bad[t]++;
        }
    return NULL;
}

int main(int argc, char **argv) {
    rounds = atoi(argv[1]);
    FILE *list = fopen(argv[2], "r");
    while (n < MAXN && fgets(paths[n], sizeof paths[n], list))
        paths[n][strcspn(paths[n], "\n")] = 0, n++;
    pthread_t th[THREADS];
    for (long t = 0; t < THREADS; t++)
        pthread_create(&th[t], NULL, walk, (void *)t);
    for (int t = 0; t < THREADS; t++)
        pthread_join(th[t], NULL);
    int differ = 0;
    for (int t = 0; t < THREADS; t++) {
        if (failed[t])
            return 3;
        differ += bad[t];
        for (int i = 0; i < n; i++)
            differ += sums[t][i] != sums[0][i] || sizes[t][i] != sizes[0][i];
    }
    for (int i = 0; i < n; i++)
        printf("%s %lld %016llx\n", paths[i], sizes[0][i], sums[0][i]);
    for (int i = 0; i < n; i++)
        printf("%d\n", unlike[i]);
    printf("threads: %d differ\n", differ);
    return 0;
}
"""


def fnv(data: bytes) -> str:
    h = 1469598103934665603
    for b in data:
        h = ((h ^ b) * 1099511628211) & (2**64 - 1)
    return f"{h:016x}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    ensure_built()
    base = tmp_path_factory.mktemp("grow")
    with ram_dir() as src:
        top = src / "tree"
        for d in range(DIRS):
            (top / f"d{d:02d}").mkdir(parents=True)
            for f in range(PER_DIR):
                body = os.urandom(200 + 37 * f)
                if f % 20 == 10:  # one object for many paths
                    body = b"shared\n"
                elif f % 20 == 0 and d in (0, DIRS - 1):
                    # one object for a path in the first directory and one in the last: the
                    # tracer finds it shared after the table has grown, and withdraws the
                    # first one's answer from the tables it was moved into
                    body = b"pair %d\n" % f
                (top / f"d{d:02d}" / f"f{f:02d}").write_bytes(body)
        served = Served(base / "store", base / "keys")
        served.publish(top, FQRN)
        prog = compile_c(PROGRAM, base / "prog")
        threaded = compile_c(THREADED, base / "threaded", "-pthread")
        listing = base / "paths.txt"
        listing.write_text(
            "".join(f"{MOUNT}/d{d:02d}/f{f:02d}\n" for d in range(DIRS) for f in range(PER_DIR))
        )
        proxy = served.serve(base / "nginx")
        try:
            tools = {"prog": prog, "threaded": threaded, "paths": listing}
            yield World(served, proxy, top, tools=tools)
        finally:
            served.stop()


def expected_first_round(w: World) -> list[str]:
    out = []
    for d in range(DIRS):
        for f in range(PER_DIR):
            data = (w.src / f"d{d:02d}" / f"f{f:02d}").read_bytes()
            out.append(f"{MOUNT}/d{d:02d}/f{f:02d} {len(data)} {fnv(data)} 1")
    return out


def run_rounds(
    w: World, rounds: int, *options: str, program: str = "prog"
) -> tuple[list[str], str]:
    r = w.run(
        [str(w.tools[program]), str(rounds), str(w.tools["paths"])],
        options=["--stats-internals", *options],
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout.splitlines(), r.stderr


def table(stderr: str) -> tuple[int, int, int]:
    """(answers, slots, times grown) of the in-process table at the end, from
    --stats-internals."""
    m = re.search(r"in-process table: (\d+) answers in (\d+) slots \(grown (\d+) times", stderr)
    assert m, f"no 'in-process table' line in hep-exec --stats-internals output:\n{stderr}"
    return int(m[1]), int(m[2]), int(m[3])


def test_a_job_that_outgrows_the_table_answers_in_process_from_the_bigger_one(
    world: World,
) -> None:
    world.needs_named_files()
    n = DIRS * PER_DIR
    lines, err = run_rounds(world, 3)
    assert lines == [*expected_first_round(world), "round 1: 0 differ", "round 2: 0 differ"]
    answers, slots, grown = table(err)
    # it started at 1,024 slots and grew as the job learnt answers
    assert answers >= 2 * n and slots >= 2 * answers and slots >= 8192 and grown >= 3, err
    m = re.search(r"in-process opens: (\d+) .* stats: (\d+) ", err)
    assert m, err
    # every open and stat of rounds 2 and 3 found its answer in the table it had grown into
    # (fstat is the kernel's, on the RAM file)
    assert int(m[1]) >= 2 * n and int(m[2]) >= 2 * n, err


def test_evictions_after_the_table_grew_withdraw_the_answers_from_every_table(
    world: World,
) -> None:
    """A RAM limit far below the tree: files are evicted all along, and their published opens
    withdrawn, in the table they were put in and in every table it grew into."""
    lines, err = run_rounds(world, 3, "--ram", "1M")
    assert lines == [*expected_first_round(world), "round 1: 0 differ", "round 2: 0 differ"]
    evictions = re.search(r"(\d+) evictions", err)
    assert evictions and int(evictions[1]) > 1000, err
    answers, slots, grown = table(err)
    assert answers >= DIRS * PER_DIR and slots >= 8192 and grown >= 3, err


@pytest.mark.parametrize("ram", ["1G", "1M"])
def test_threads_that_walk_the_tree_while_the_table_grows_read_the_same_bytes(
    world: World, ram: str
) -> None:
    """Four threads walk the tree at once from different places: one thread's first touch
    makes the tracer put answers, grow the table and (under --ram 1M) withdraw evicted files'
    answers, while the other threads look up the table they read the size of.  Every reading
    of every thread is the source's bytes and size, and fstat agrees with stat for every file
    whose content no other path shares."""
    world.needs_named_files()
    lines, err = run_rounds(world, 2, "--ram", ram, program="threaded")
    n = DIRS * PER_DIR
    assert len(lines) == 2 * n + 1, err[-3000:]
    firsts = [line.rsplit(" ", 1)[0] for line in expected_first_round(world)]
    assert lines[:n] == firsts and lines[-1] == "threads: 0 differ", err[-3000:]
    shared = {i for i in range(n) if (i % PER_DIR) % 20 == 10 or (
        (i % PER_DIR) % 20 == 0 and i // PER_DIR in (0, DIRS - 1))}  # fmt: skip
    unlike = [firsts[i] for i in range(n) if i not in shared and lines[n + i] != "0"]
    assert not unlike, unlike[:10]
    answers, slots, grown = table(err)
    assert answers >= n and slots >= 8192 and grown >= 3, err
    if ram == "1M":
        evictions = re.search(r"(\d+) evictions", err)
        assert evictions and int(evictions[1]) > 1000, err


def test_the_table_without_in_process_answers_is_not_reported(world: World) -> None:
    """--no-in-process: no table, and the same bytes (the oracle of the tests above)."""
    lines, err = run_rounds(world, 2, "--no-in-process")
    assert lines == [*expected_first_round(world), "round 1: 0 differ"]
    assert "in-process table" not in err, err


def test_a_warm_node_job_sizes_its_table_for_the_node_s_answers_when_it_mounts(
    world: World, cache_dir: Path
) -> None:
    """The node's service says at connect how many bytes of answers it holds for each
    repository: a job sizes its table for them as it begins the mount (while it is empty), so
    it never moves them once they are put."""
    world.needs_named_files()
    argv = [*CLI, "--server", world.proxy, "--cache-dir", str(cache_dir), "--stats-internals",
            "--", str(world.tools["prog"]), "2", str(world.tools["paths"])]  # fmt: skip
    runs = [subprocess.run(argv, env=env_with(), capture_output=True, text=True, timeout=300)
            for _job in ("warming", "warm")]  # fmt: skip
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.splitlines() == [*expected_first_round(world), "round 1: 0 differ"]
    assert table(runs[0].stderr)[2] >= 3, runs[0].stderr  # the node knew nothing: it grew
    answers, slots, grown = table(runs[1].stderr)
    assert "answers ahead from the node" in runs[1].stderr, runs[1].stderr
    assert answers >= 2 * DIRS * PER_DIR and slots >= 2 * answers and grown == 1, runs[1].stderr


def test_a_job_after_an_idle_moment_gets_a_table_the_service_made_ahead(
    world: World, cache_dir: Path
) -> None:
    """When no job runs, the node's service makes the next job's table file and faults its
    pages in (worker/node/table_pool.py): the next job's put of the node's answers finds its
    memory there, and reads the same bytes."""
    world.needs_named_files()
    argv = [*CLI, "--server", world.proxy, "--cache-dir", str(cache_dir), "--stats-internals",
            "--", str(world.tools["prog"]), "2", str(world.tools["paths"])]  # fmt: skip
    runs = []
    for _job in ("warming", "after the service made a table", "another"):
        runs.append(subprocess.run(argv, env=env_with(), capture_output=True, text=True,
                                   timeout=300))  # fmt: skip
        time.sleep(1.5)  # (the table is made when the last job has gone)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.splitlines() == [*expected_first_round(world), "round 1: 0 differ"]
    made_ahead = "its memory made ahead by the node's service"
    assert made_ahead not in runs[0].stderr, runs[0].stderr  # the node had no answers yet
    for r in runs[1:]:
        assert made_ahead in r.stderr and table(r.stderr)[2] == 1, r.stderr


def test_the_table_pool_makes_one_table_at_a_time_of_the_size_asked(tmp_path: Path) -> None:
    """TablePool: nothing ready until it is filled; then one file of the table's whole size
    with pages already allocated, given once; a node with few answers gets none."""
    from worker.node.table_pool import MIN_BYTES, TablePool

    expected = [MIN_BYTES // 2]
    pool = TablePool(lambda: None, lambda: expected[0])
    try:
        pool.refill()  # too few answers on the node: nothing is made
        assert pool.take() is None and pool.made == 0
        expected[0] = 4 << 20
        pool.refill()
        pool.refill()  # (one at a time)
        deadline = time.monotonic() + 30
        while pool.made == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        fd = pool.take()
        assert fd is not None and pool.take() is None and (pool.made, pool.given) == (1, 1)
        try:
            st = os.fstat(fd)
            assert st.st_size > 128 << 20 and st.st_blocks * 512 >= 4 << 20, st
            assert os.pread(fd, 1 << 16, 0) == bytes(1 << 16)  # never written: all zeros
        finally:
            os.close(fd)
    finally:
        pool.close()
