"""Live progress line (objects, bytes, rate, ETA) and the end-of-run summary."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class RepoReport:
    """What one repository's preload did; the JSON summary is a list of these."""

    name: str
    status: str = "ok"  # ok | failed | dry-run | unchanged
    revision: int = 0
    previous_revision: int | None = None
    server: str = ""
    files: int = 0
    file_bytes: int = 0
    catalogs: int = 0
    catalogs_fetched: int = 0
    objects: int = 0
    objects_present: int = 0
    objects_fetched: int = 0
    bytes_fetched: int = 0
    to_fetch_objects: int = 0
    to_fetch_bytes: int = 0  # uncompressed size of what is missing (dry-run estimate)
    pruned_objects: int = 0
    pruned_bytes: int = 0
    whole: bool = False  # the selection is the whole revision: the store is a replica of it
    seconds: float = 0.0
    failover: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. include rules matching nothing
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Progress:
    """Counts objects and bytes; redraws one line on a terminal at most ~5 times a second."""

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool | None = None) -> None:
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.label = ""
        self.total_objects = 0
        self.total_weight = 0
        self.done_objects = 0
        self.done_weight = 0
        self.bytes = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._shown = False

    def begin(self, label: str, objects: int, weight: int) -> None:
        self.label, self.total_objects, self.total_weight = label, objects, max(weight, 1)
        self.done_objects = self.done_weight = self.bytes = 0
        self.start = time.monotonic()

    def advance(self, stored: int, weight: int) -> None:
        self.done_objects += 1
        self.done_weight += weight
        self.bytes += stored
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.2:
            self._last = now
            self.draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-6)
        rate = self.bytes / elapsed
        frac = min(self.done_weight / self.total_weight, 1.0)
        eta = duration(elapsed * (1 - frac) / frac) if frac > 0 else "?"
        return (
            f"{self.label}: {self.done_objects}/{self.total_objects} objects, "
            f"{human(self.bytes)} at {human(rate)}/s, {frac:.0%}, ETA {eta}"
        )

    def draw(self, now: float | None = None) -> None:
        self.stream.write("\r\x1b[K" + self.line(now))
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def message(self, text: str) -> None:
        """A line that must stay visible (warnings), printed above the progress line."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()


def summary_lines(r: RepoReport) -> list[str]:
    if r.status == "failed":
        return [f"{r.name}: FAILED: {r.error}"]
    rev = f"revision {r.revision}"
    if r.previous_revision is not None and r.previous_revision != r.revision:
        rev += f" (was {r.previous_revision})"
    head = f"{r.name}: {rev} from {r.server}"
    sel = (
        f"  selected {r.files} files ({human(r.file_bytes)}), {r.objects} objects, "
        f"{r.catalogs} catalogs"
    )
    if r.whole:
        sel += "; the whole revision"
    if r.status == "dry-run":
        todo = (
            f"  would fetch {r.to_fetch_objects} objects (~{human(r.to_fetch_bytes)} "
            f"uncompressed); {r.objects_present} already in the store"
        )
        return [head + " [dry run]", sel, todo]
    rate = r.bytes_fetched / r.seconds if r.seconds > 0 else 0.0
    got = (
        f"  fetched {r.objects_fetched} objects + {r.catalogs_fetched} catalogs, "
        f"{human(r.bytes_fetched)} in {r.seconds:.1f} s ({human(rate)}/s); "
        f"{r.objects_present} objects already present"
    )
    out = [head, sel, got]
    if r.pruned_objects:
        out.append(f"  pruned {r.pruned_objects} objects ({human(r.pruned_bytes)})")
    if r.failover:  # each said on stderr as it happened: counted here, not repeated
        n = len(r.failover)
        out.append(f"  fail-over: said on stderr ({n} line{'s' if n > 1 else ''})")
    return out
