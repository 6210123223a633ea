"""The repositories a job names before it touches them, so they can be mounted while it starts.

A job's command line, environment and working directory usually say which repositories it
will read (``PYTHONPATH=/cvmfs/sft.cern.ch/...``, ``source /cvmfs/cms.cern.ch/cmsset_default.sh``,
``cd /cvmfs/...``).  Mounting those on a thread of their own while the command starts (its
shell, its interpreter, ld.so: 10-15 ms before its first /cvmfs call in a warm Python job)
takes the mount off the command's path.  A guess that turns out wrong costs a mount nobody
uses; it never changes an answer (a failed mount is said, as before, by the call that needs
it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from worker.repo.repository import REPOSITORY_NAME

MAX_NAMED = 8  # more than a job's own few: the rest are mounted when touched, as before
_NAME = re.compile(rb"[A-Za-z0-9_.-]+")
_ENDS = (b"", b"/", b":", b";", b" ", b'"', b"'", b"\t", b"\n", b",")  # what may follow a name


def named_repositories(
    mount: bytes, texts: Iterable[bytes], configured: Iterable[str] = ()
) -> tuple[str, ...]:
    """The repository names that follow ``mount + "/"`` in ``texts`` (arguments, environment
    values, the working directory), in order of first appearance, each once.  With
    ``configured`` names, only those; otherwise names that look like host names
    (``sft.cern.ch``): ``/cvmfs/lib`` or ``/cvmfs/*`` name nothing."""
    head = mount.rstrip(b"/") + b"/"
    allowed = set(configured)
    found: list[str] = []
    for text in texts:
        start = text.find(head)
        while start >= 0 and len(found) < MAX_NAMED:
            after = start + len(head)
            got = _NAME.match(text, after)
            # a path of its own ("/work/cvmfs/..." is not), the name ending at "/" or the end
            whole = start == 0 or not _NAME.match(text, start - 1)
            if whole and got and text[got.end() : got.end() + 1] in _ENDS:
                name = got.group().decode()
                if _acceptable(name, allowed) and name not in found:
                    found.append(name)
            start = text.find(head, after)
    return tuple(found)


def _acceptable(name: str, allowed: set[str]) -> bool:
    return name in allowed if allowed else bool(REPOSITORY_NAME.fullmatch(name))
