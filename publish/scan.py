"""Read a source directory into plain values (the publisher's only file-system input)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

CATALOG_MARKER = ".cvmfscatalog"


@dataclass
class SourceNode:
    """One path of the source tree, with what the catalog needs to know about it."""

    path: str  # repository path: "" for the root, else "/a/b"
    st: os.stat_result
    symlink: str = ""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: list[SourceNode] = field(default_factory=list)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def has_catalog_marker(self) -> bool:
        return any(c.path.endswith("/" + CATALOG_MARKER) for c in self.children)


def _xattrs(path: Path) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out: dict[bytes, bytes] = {}
    for name in names:
        if not name.startswith("user."):
            continue
        try:
            out[name.encode()] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


def scan(root: Path) -> SourceNode:
    """Walk ``root`` without following symlinks; children sorted by name."""

    def visit(fs_path: Path, repo_path: str, st: os.stat_result) -> SourceNode:
        node = SourceNode(repo_path, st, xattrs=_xattrs(fs_path))
        if stat.S_ISLNK(st.st_mode):
            node.symlink = os.readlink(fs_path)
        elif stat.S_ISDIR(st.st_mode):
            with os.scandir(fs_path) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                node.children.append(
                    visit(Path(e.path), f"{repo_path}/{e.name}", e.stat(follow_symlinks=False))
                )
        return node

    return visit(root, "", root.stat())
