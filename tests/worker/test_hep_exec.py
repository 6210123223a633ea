"""hep-exec end to end: published repositories, nginx on loopback, the real CLI as a process.

Every test runs ``python3 -m worker.cli`` (private RAM cache) against a store built by our
publisher and served by nginx on 127.0.0.1, and checks what the command sees in /cvmfs.
What must hold for the host-directory policy too (programs, exit status, EROFS, SIGKILL, no
ptrace, the oracle) runs with both drivers in test_tracer_programs, test_tracer_process and
test_tracer_oracle.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hep_exec import Served, World, corrupt_copy, hep_exec, hep_exec_cmd
from tests.support.network import dead_url
from tests.support.tracing import ensure_built, env_with, needs_ptrace, ram_dir
from tests.support.trees import make_odd_tree, make_variant_links

pytestmark = needs_ptrace

ODD = "/cvmfs/odd.test.org"
RAM = "/cvmfs/ram.test.org"
RAM_FILES = 20
RAM_FILE_SIZE = 256 * 1024


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """odd.test.org (tests.support.trees.make_odd_tree and variant links) and ram.test.org
    (RAM_FILES random files), sources on tmpfs, served by one nginx."""
    ensure_built()
    base = tmp_path_factory.mktemp("hep-exec")
    with ram_dir() as src:
        served = Served(base / "store", base / "keys")
        make_odd_tree(src / "odd")
        make_variant_links(src / "odd")
        served.publish(src / "odd", "odd.test.org")
        rnd = random.Random(5)
        (src / "ram").mkdir()
        for i in range(RAM_FILES):
            (src / "ram" / f"f{i:02d}").write_bytes(rnd.randbytes(RAM_FILE_SIZE))
        served.publish(src / "ram", "ram.test.org")
        proxy = served.serve(base / "nginx")
        try:
            yield World(served, proxy, src)
        finally:
            served.stop()


def run(w: World, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return w.run(argv, **kw)


def ram_digest(src: Path) -> str:
    """``sha256sum`` of the RAM-test files as they read under /cvmfs, digested once more."""
    lines = "".join(
        f"{hashlib.sha256((src / 'ram' / f'f{i:02d}').read_bytes()).hexdigest()}  {RAM}/f{i:02d}\n"
        for i in range(RAM_FILES)
    )
    return hashlib.sha256(lines.encode()).hexdigest()


# ------------------------------------------------------------------------------ semantics


def test_variant_and_outside_symlinks(world: World) -> None:
    script = (
        f"cat {ODD}/variant/pick; WHICH=b cat {ODD}/variant/pick; "
        f"WHICH=b readlink {ODD}/variant/pick; readlink {ODD}/variant/pick; "
        f"cat {ODD}/links/outside/hostname; cat {ODD}/links/chain2; "
        f"cat {ODD}/nested/inner/deeper/back_to_root; stat -c '%h %i' {ODD}/hard/h1 {ODD}/hard/h3"
    )
    r = run(world, ["bash", "-c", script], keys=world.key("odd.test.org"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:4] == ["A", "B", "b.txt", "a.txt"]
    assert lines[4] == Path("/etc/hostname").read_text().strip()
    assert lines[5:105] == ["leaf"] * 100 and lines[105] == "hello"
    h1, h3 = lines[-2:]
    assert h1 == h3 and h1.startswith("3 ")


# per path: fstat of the open file == stat of the path? and the inode (the same content
# under another inode, "single", comes third: each open's answer is its own path's)
FSTAT_EACH = """
import os, sys
for p in sys.argv[1:]:
    with open(p, "rb") as f:
        a, b = os.fstat(f.fileno()), os.stat(p)
        print(a == b and a.st_dev == b.st_dev, a.st_ino)
"""


def test_fstat_of_an_open_file_says_what_stat_of_its_path_says(
    world: World, trap_mode: str, ram_files: str, tmp_path: Path
) -> None:
    """An open /cvmfs file is a RAM file underneath; fstat, statx and stat of /dev/stdin still
    show the catalog's inode, mode and times, so cp and install accept it (they compare)."""
    h1, h3 = f"{ODD}/hard/h1", f"{ODD}/hard/h3"
    fmt = "%i %h %a %s %Y %d"
    script = (
        f"cp {h1} {tmp_path}/plain && cp -p {h1} {tmp_path}/kept && "
        f"install -m 600 {h1} {tmp_path}/installed && "
        f"stat -c '{fmt}' {h1} && stat -L -c '{fmt}' /dev/stdin < {h1} && "
        f"python3 -c '{FSTAT_EACH}' {h1} {h3} {ODD}/hard/single {h1}"
    )
    r = run(world, ["bash", "-c", script], keys=world.key("odd.test.org"))
    assert r.returncode == 0, r.stderr
    by_path, by_fd, *each = r.stdout.splitlines()
    assert by_fd == by_path
    ino, nlink, mode, _size, mtime, _dev = by_path.split()
    assert nlink == "3"
    assert [line.split()[0] for line in each] == ["True"] * 4, each
    assert each[0].split()[1] == each[1].split()[1] == ino != each[2].split()[1], "hardlinks"
    for name in ("plain", "kept", "installed"):
        assert (tmp_path / name).read_bytes() == (world.src / "odd/hard/h1").read_bytes()
    kept = os.stat(tmp_path / "kept")
    assert (oct(kept.st_mode & 0o7777)[2:], int(kept.st_mtime)) == (mode, int(mtime))
    assert os.stat(tmp_path / "installed").st_mode & 0o777 == 0o600


def test_host_symlinks_into_cvmfs(world: World, trap_mode: str, tmp_path: Path) -> None:
    """Links on the host that point into /cvmfs (a CMSSW work area, ln -s /cvmfs/..., a
    site's /opt/exp_soft -> /cvmfs/...) lead where they point; the links themselves stay host
    symlinks, and a path that is missing stays missing."""
    area = tmp_path / "area"
    area.mkdir()
    (area / "hello").symlink_to(f"{ODD}/hello.txt")
    (area / "odd").symlink_to(ODD)
    (area / "rel").symlink_to("../area/odd/dir")  # relative, through another host link
    (area / "exe").symlink_to(f"{ODD}/exec.sh")
    (area / "gone").symlink_to(f"{ODD}/no/such")
    (area / "loop").symlink_to("loop")
    script = (
        "cat hello; head -n1 odd/dir/sub/deep/leaf.txt; head -n1 rel/sub/deep/leaf.txt; "
        "./exe; ls odd/hard | tr '\\n' ' '; echo; readlink hello; stat -c %F hello; "
        "stat -L -c '%F %s' hello; stat -c %F odd/; cat odd/links/chain2 | wc -l; "
        "cd odd/dir && pwd -P && wc -c < a.txt; cd ..; "
        f"cd {area}; cat gone 2>&1; cat loop 2>&1; cat odd/nothing 2>&1; cat hello/ 2>&1; "
        "echo x > odd/new || true; rm odd/hello.txt || true; rm hello && echo link removed"
    )
    r = run(world, ["bash", "-c", script], keys=world.key("odd.test.org"), cwd=area)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "hello",
        "leaf",
        "leaf",
        "hi",
        "h1 h2 h3 single ",
        f"{ODD}/hello.txt",
        "symbolic link",
        "regular file 6",
        "directory",
        "100",
        f"{ODD}/dir",
        "5000",
        "cat: gone: No such file or directory",
        "cat: loop: Too many levels of symbolic links",
        "cat: odd/nothing: No such file or directory",
        "cat: hello/: Not a directory",
        "link removed",
    ], r.stderr
    assert "odd/new: Read-only file system" in r.stderr
    assert "'odd/hello.txt': Read-only file system" in r.stderr


@pytest.mark.slow
def test_chunked_file_reads_whole(world: World) -> None:
    r = run(world, ["sha256sum", f"{ODD}/big.bin"])
    want = subprocess.run(["sha256sum", str(world.src / "odd/big.bin")], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == want.stdout.decode().split()[0]


def test_unknown_repository_is_enoent_with_one_log_line(world: World) -> None:
    r = run(world, ["bash", "-c", "cat /cvmfs/nope.test.org/x; echo rc=$?"])
    assert r.stdout == "rc=1\n"
    assert "No such file or directory" in r.stderr
    logs = [line for line in r.stderr.splitlines() if line.startswith("hep-exec:")]
    assert len(logs) == 1 and "/cvmfs/nope.test.org" in logs[0], r.stderr


def test_cvmfs_lists_the_configured_repositories(world: World) -> None:
    r = run(
        world,
        ["bash", "-c", "ls /cvmfs; ls /cvmfs/ram.test.org | wc -l"],
        options=["--repositories", "odd.test.org,ram.test.org"],
    )
    assert (r.returncode, r.stdout) == (0, f"odd.test.org\nram.test.org\n{RAM_FILES}\n"), r.stderr


def test_wrong_master_key_refuses_the_repository(world: World) -> None:
    r = run(world, ["cat", f"{ODD}/hello.txt"], keys=world.key("ram.test.org"))
    assert r.returncode != 0 and r.stdout == ""
    assert "odd.test.org" in r.stderr


# ------------------------------------------------------------------------------ faults


def test_proxy_killed_mid_run_fails_over_to_the_second(world: World, tmp_path: Path) -> None:
    first = world.served.serve(tmp_path / "first")
    second = world.served.serve(tmp_path / "second")
    go = tmp_path / "go"
    half = RAM_FILES // 2
    script = (
        f"for i in $(seq -f %02g 0 {half - 1}); do cat {RAM}/f$i >/dev/null; done; echo half; "
        f"while [ ! -e {go} ]; do sleep 0.05; done; sha256sum {RAM}/* | sha256sum"
    )
    proc = subprocess.Popen(
        hep_exec_cmd(f"{first};{second}", ["bash", "-c", script], options=["--stats-internals"]),
        env=env_with(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "half\n"
        world.served.servers[-2].stop()  # the first proxy dies
        go.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.split()[0] == ram_digest(world.src)
    assert re.search(r"fetch: \d+ requests, .* [1-9]\d* failures", err), err


def _object_of(store: Path, fqrn: str, content: bytes) -> str:
    """The store path (relative) of the data object holding ``content``."""
    for obj in (store / fqrn / "data").glob("*/*"):
        try:
            if zlib.decompress(obj.read_bytes()) == content:
                return str(obj.relative_to(store))
        except zlib.error:
            continue
    raise AssertionError("object not found")


@pytest.mark.slow
def test_corrupt_object_is_refetched_from_the_other_proxy(world: World, tmp_path: Path) -> None:
    content = (world.src / "ram/f03").read_bytes()
    bad_root = tmp_path / "bad-store"
    corrupt_copy(world.store, bad_root, _object_of(world.store, "ram.test.org", content))
    bad = world.served.serve(tmp_path / "bad", root=bad_root)
    good = world.served.serve(tmp_path / "good")
    r = hep_exec(f"{bad};{good}", ["sha256sum", f"{RAM}/f03"], options=["--stats-internals"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == hashlib.sha256(content).hexdigest()
    assert re.search(r"[1-9]\d* corrupt", r.stderr), r.stderr
    # only the lying proxy: an I/O error, never the wrong bytes
    r = hep_exec(bad, ["bash", "-c", f"cat {RAM}/f03 | wc -c; cat {RAM}/f04 | wc -c"])
    assert r.stdout == f"0\n{RAM_FILE_SIZE}\n", r.stderr
    assert "Input/output error" in r.stderr
    assert any(f"{RAM}/f03" in line for line in r.stderr.splitlines() if "hep-exec" in line)


@pytest.mark.slow
def test_ram_limit_smaller_than_the_working_set(world: World) -> None:
    script = f"sha256sum {RAM}/* | sha256sum; sha256sum {RAM}/* | sha256sum; cat {RAM}/* | wc -c"
    r = run(world, ["bash", "-c", script], options=["--ram", "2M", "--stats-internals"])
    assert r.returncode == 0, r.stderr
    digest = ram_digest(world.src)
    assert r.stdout.split() == [digest, "-", digest, "-", str(RAM_FILES * RAM_FILE_SIZE)]
    m = re.search(r"(\d+) evictions", r.stderr)
    assert m and int(m[1]) >= RAM_FILES, r.stderr
    assert "0 cache-full" in r.stderr and "Cannot allocate memory" not in r.stderr


def _without_user_namespaces(argv: list[str]) -> list[str]:
    """``argv`` run where no user namespace can be made (a site that disabled them): in a
    user namespace of ours whose ``user.max_user_namespaces`` is 0."""
    limit = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "sh", "-c", limit, "sh", *argv]


@pytest.mark.slow
def test_ram_files_without_user_namespaces(world: World) -> None:
    """auto falls back to sealed memfds (and --check says why); tmpfs refuses in one line."""
    probe = subprocess.run(_without_user_namespaces(["true"]), capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a user namespace here: {probe.stderr.decode().strip()}")
    cat = ["cat", f"{ODD}/hello.txt"]
    r = subprocess.run(
        _without_user_namespaces(hep_exec_cmd(world.proxy, cat)),
        env=env_with({"HEP_EXEC_RAM_FILES": "auto"}),
        capture_output=True,
        text=True,
    )
    assert (r.returncode, r.stdout) == (0, (world.src / "odd/hello.txt").read_text()), r.stderr
    check = [sys.executable, "-m", "worker.cli", "--check", "--no-shared-cache"]
    r = subprocess.run(
        _without_user_namespaces([*check, "--server", world.proxy]),
        env=env_with({"HEP_EXEC_RAM_FILES": "auto"}),
        capture_output=True,
        text=True,
    )
    line = [ln for ln in r.stdout.splitlines() if "RAM files" in ln]
    assert line and "sealed memfds" in line[0] and "refused" in line[0], r.stdout
    r = subprocess.run(
        _without_user_namespaces(hep_exec_cmd(world.proxy, cat, options=["--ram-files", "tmpfs"])),
        env=env_with({"HEP_EXEC_RAM_FILES": "auto"}),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--ram-files tmpfs" in lines[0] and "namespaces" in lines[0], lines


@pytest.mark.slow
def test_check_reports_tracer_proxies_repositories_and_ram(world: World) -> None:
    dead = dead_url()
    cmd = [sys.executable, "-m", "worker.cli", "--check", "--no-shared-cache", "--ram", "64M"]
    keys = ["--keys", str(world.key("odd.test.org")), "--repositories", "odd.test.org"]
    r = subprocess.run(
        [*cmd, "--server", world.proxy, *keys], env=env_with(), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ok   ptrace + seccomp")
    assert any(line.startswith(f"ok   server {world.proxy}") for line in lines)
    # every effective setting, and where it came from
    assert f"ok   setting server = {world.proxy}/cvmfs/@fqrn@  [--server]" in lines, r.stdout
    assert "ok   setting proxy = DIRECT  [default]" in lines, r.stdout
    assert any(
        line.startswith("ok   repository odd.test.org: revision 1") and "signature verified" in line
        for line in lines
    ), r.stdout
    assert any(line.startswith("ok   RAM cache limit: 64.0 MiB") for line in lines)
    assert any(line.startswith("ok   RAM files: ") for line in lines), r.stdout
    r = subprocess.run(
        [*cmd, "--server", f"{dead};{world.proxy}", *keys],
        env=env_with(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert any(line.startswith(f"FAIL server {dead}") for line in r.stdout.splitlines())


def test_stats_count_hits_misses_bytes_and_syscalls(world: World) -> None:
    r = run(
        world, ["bash", "-c", f"cat {ODD}/hello.txt {ODD}/hello.txt"], options=["--stats-internals"]
    )
    assert r.returncode == 0
    assert re.search(r"cache: \d+ hits, [1-9]\d* misses", r.stderr), r.stderr
    assert re.search(r"used, in (tmpfs|memfd) files", r.stderr), r.stderr
    assert re.search(r"fetch: [1-9]\d* requests, [\d.]+ (B|KiB)", r.stderr)
    assert "trapped syscalls:" in r.stderr and "openat" in r.stderr


def test_stats_speak_the_users_language(world: World) -> None:
    """Plain --stats: cache, fetches, repositories and one line on system calls; the trap
    loop's counters only with --stats-internals."""
    r = run(world, ["bash", "-c", f"cat {ODD}/hello.txt {ODD}/hello.txt"], options=["--stats"])
    assert r.returncode == 0, r.stderr
    assert re.search(r"cache: \d+ hits, [1-9]\d* misses", r.stderr), r.stderr
    assert re.search(
        r"system calls: [1-9]\d* on /cvmfs answered by stopping the program \(\S+\), \d+ "
        r"answered inside it without a stop, \d+ stopped that were not for /cvmfs",
        r.stderr,
    ), r.stderr
    for internal in ("upcall", "C-cache", "call sites", "unpinned", "trapped syscalls"):
        assert internal not in r.stderr, (internal, r.stderr)


NOFOLLOW = """
import ctypes, os, struct
libc = ctypes.CDLL(None, use_errno=True)
def openat2(path, flags, resolve):
    fd = libc.syscall(437, -100, path.encode(), struct.pack("QQQ", flags, 0, resolve), 24)
    return os.read(fd, 6) if fd >= 0 else ctypes.get_errno()
print(os.read(os.open(ROOT + "/hello.txt", os.O_RDONLY | os.O_NOFOLLOW), 6))
try:
    os.open(ROOT + "/links/rel", os.O_RDONLY | os.O_NOFOLLOW)
except OSError as e:
    print(e.errno)
print(openat2(ROOT + "/hello.txt", os.O_RDONLY | os.O_NOFOLLOW, 0x04))
print(openat2(ROOT + "/links/rel", os.O_RDONLY | os.O_NOFOLLOW, 0))
"""


def test_o_nofollow_and_openat2_open_files(world: World) -> None:
    """Files are memfd magic links: O_NOFOLLOW (tar) and openat2's RESOLVE_NO_SYMLINKS must
    still open them, and still refuse a /cvmfs symlink with ELOOP."""
    code = f"ROOT = {ODD!r}\n" + NOFOLLOW
    r = run(world, [sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["b'hello\\n'", "40", "b'hello\\n'", "40"]
