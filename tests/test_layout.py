"""The house rules of the layout (worker/__init__.py, docs/architecture.md): no import runs
upward, no tool imports another, no source file grows past what a reader takes in at once."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from tests.support.repos import PROJECT

# worker's rooms, lowest first: each may import those before it, never one after it
ROOMS = ("trace", "ram", "repo", "node")
# read by every room as settings; they import only constants from the rooms
SETTINGS = ("worker.config", "worker.sites")
TOOLS = ("preload", "proxy", "publish", "worker")
SHARED = ("cvmfs_format", "cvmfs_download")
MAX_LINES = 820


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (lazy imports inside functions too)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _tracked(*patterns: str) -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "--", *patterns], cwd=PROJECT, capture_output=True, text=True
    ).stdout.split()
    return [PROJECT / n for n in names if (PROJECT / n).is_file()]


def _python_files(package: str) -> list[Path]:
    return sorted((PROJECT / package).rglob("*.py"))


def test_no_worker_room_imports_a_room_above_it() -> None:
    wrong = []
    for path in _python_files("worker"):
        parts = path.relative_to(PROJECT / "worker").parts
        if len(parts) < 2:
            continue  # the top: cli, config, session ... may import every room
        room = ROOMS.index(parts[0])
        for line, name in _imports(path):
            segments = name.split(".")
            if segments[0] != "worker" or len(segments) < 2 or name in SETTINGS:
                continue
            if segments[1] not in ROOMS:
                if segments[1] not in ("config", "sites") and name != "worker":
                    wrong.append(f"{path.relative_to(PROJECT)}:{line}: imports {name}")
            elif ROOMS.index(segments[1]) > room:
                wrong.append(f"{path.relative_to(PROJECT)}:{line}: imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_tracer_reads_no_settings() -> None:
    """worker.trace knows nothing of hep-exec's configuration: it takes values."""
    wrong = [
        f"{path.relative_to(PROJECT)}:{line}: imports {name}"
        for path in _python_files("worker/trace")
        for line, name in _imports(path)
        if name.startswith(SETTINGS)
    ]
    assert not wrong, "\n".join(wrong)


def test_formats_and_the_download_client_import_no_tool_and_no_tool_another() -> None:
    wrong = []
    for package in (*SHARED, *TOOLS):
        allowed = {package, "hep_cli", *SHARED} if package in TOOLS else {package}
        if package == "cvmfs_download":
            allowed.add("cvmfs_format")
        for path in _python_files(package):
            for line, name in _imports(path):
                top = name.split(".")[0]
                if top in (*SHARED, *TOOLS, "hep_cli") and top not in allowed:
                    wrong.append(f"{path.relative_to(PROJECT)}:{line}: imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_source_file_is_longer_than_a_reader_takes_in() -> None:
    sources = _tracked("*.py", "*.c", "*.h", "*.pyi", "bench/*", "scripts/*", ".ci/*")
    long = [
        f"{p.relative_to(PROJECT)}: {n} lines"
        for p in sources
        if (n := len(p.read_bytes().splitlines())) > MAX_LINES
    ]
    assert not long, f"over {MAX_LINES} lines:\n" + "\n".join(long)
