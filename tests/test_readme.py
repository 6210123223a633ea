"""The README as a newcomer meets it: the "your own software in five commands" block runs as
printed (publish, serve, spec, preload + serve, hep-exec), every relative link in README.md
and docs/*.md leads to a file (and heading) that exists, and the README stays a short front
door that names no design document outside the repository and no issue numbers."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import unicodedata
import uuid
from pathlib import Path

import pytest

from tests.support.repos import PROJECT
from tests.support.waiting import wait_until

README = PROJECT / "README.md"
DOCS = sorted((PROJECT / "docs").glob("*.md"))
MARKER = "<!-- walkthrough"
PORTS = (8001, 8002)  # the block's two hep-proxy instances


def walkthrough() -> str:
    """The fenced block right after the ``<!-- walkthrough …-->`` line of README.md."""
    lines = README.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(MARKER))
    fence = start + 1
    assert lines[fence].startswith("```"), f"README.md:{fence + 1}: no fenced block after marker"
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[fence + 1 : end]) + "\n"


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _marked(token: str) -> list[int]:
    """Processes whose environment carries ``HEP_README_TEST=token`` (the block's servers,
    hep-exec's node cache service): what the test started, wherever it went."""
    pids = []
    needle = f"HEP_README_TEST={token}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


def _kill_marked(token: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _marked(token)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not _marked(token), 5, what="the block's processes to exit")


def _run_block(block: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        ["bash", "-c", "set -euo pipefail\n" + block],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_five_commands_run_as_printed(tmp_path: Path) -> None:
    """The block, pasted into bash in an empty directory with the commands on PATH, publishes,
    serves, preloads, serves again and prints the published file from /cvmfs under hep-exec;
    it stops its servers; run again (as the README invites) it still works."""
    busy = [p for p in PORTS if _port_in_use(p)]
    if busy:
        pytest.skip(f"127.0.0.1:{busy[0]} is in use (the README's walkthrough serves there)")
    block = walkthrough()
    hello = re.search(r"echo '([^']*)' > my-demo/src/hello\.txt", block)
    assert hello, "the walkthrough no longer writes my-demo/src/hello.txt with echo '…'"
    token = uuid.uuid4().hex
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        # the node cache service the job starts: this test's own, gone a second after the job
        "HEP_EXEC_CACHE_DIR": str(tmp_path / "cache"),
        "HEP_EXEC_CACHE_IDLE": "1",
        "HEP_README_TEST": token,
    }
    work = tmp_path / "cwd"
    work.mkdir()
    try:
        for run in ("first run", "second run"):
            t0 = time.monotonic()
            r = _run_block(block, work, env)
            assert r.returncode == 0, f"{run}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
            assert hello.group(1) in r.stdout.splitlines(), f"{run}:\n{r.stdout}\n{r.stderr}"
            assert (work / "my-demo" / "store" / "my.example.org" / ".cvmfspublished").is_file()
            # the block's last line stopped both servers
            wait_until(
                lambda: not any(_port_in_use(p) for p in PORTS), 10,
                what="the walkthrough's servers to stop",
            )  # fmt: skip
            assert time.monotonic() - t0 < 120, f"{run} took {time.monotonic() - t0:.0f} s"
        assert "revision 2" in r.stdout + r.stderr, "the second run publishes revision 2"
    finally:
        _kill_marked(token)


# --- links and wording ---------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    kept = "".join(
        c for c in text if c in " -_" or unicodedata.category(c)[0] in ("L", "N")
    )  # fmt: skip
    return kept.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for _, line in _prose(path):
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_relative_links_lead_somewhere() -> None:
    problems = []
    for page in [README, *DOCS]:
        for n, line in _prose(page):
            for target in LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                where = f"{page.relative_to(PROJECT)}:{n}: {target}"
                file_part, _, anchor = target.partition("#")
                dest = (page.parent / file_part).resolve() if file_part else page
                if not dest.exists():
                    problems.append(f"{where}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    problems.append(f"{where}: no heading with that anchor in {dest.name}")
    assert not problems, "\n".join(problems)


def test_no_design_document_outside_the_repository() -> None:
    for page in [README, *DOCS]:
        assert "../shared/docs/design.md" not in page.read_text(), page


def test_readme_is_a_short_front_door() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    # words a newcomer cannot place
    assert not re.search(r"\bissues?\s+#?\d+", text, re.IGNORECASE), "issue numbers in README"
    assert "seed's table" not in text
    assert MARKER in text
