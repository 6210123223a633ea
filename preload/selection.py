"""Catalog walk that decides which catalogs and objects a rule set needs (sans-I/O).

The walk lists only directories the rules can reach, so nested catalogs outside the selection
are never fetched. When a listing needs a nested catalog that is not loaded, the directory is
parked and :meth:`Selector.step` returns the catalog reference; the caller fetches it, calls
:meth:`Selector.attach`, and steps again. Files are selected one by one (file granularity).

The walk also finds out whether the selection is the whole revision (:attr:`Selection.whole`):
it is unless the rules kept it out of some directory or left some regular file out, whatever
made them do so (an exclude, a ``^`` or exact rule, an access list). External files never
count: their content is not in the repository.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cvmfs_format.catalog import Catalog, CatalogTree, NeedCatalog, NestedRef
from cvmfs_format.hashes import ContentHash
from cvmfs_format.objects import Suffix
from preload.rules import Rule, Rules


@dataclass(frozen=True, slots=True)
class Wanted:
    """An object to have in the store: where it lives and what it is for."""

    relpath: str
    hash: ContentHash
    suffix: Suffix
    size: int  # uncompressed bytes (file or chunk), for progress estimates
    path: str  # first repository path that needs it, for messages


@dataclass
class Selection:
    files: int = 0
    file_bytes: int = 0
    objects: dict[str, Wanted] = field(default_factory=dict)
    catalogs: dict[str, ContentHash] = field(default_factory=dict)  # mountpoint -> hash
    # every directory walked, every catalog loaded, every regular file selected: a store
    # holding the selection holds the revision (once the walk is done)
    whole: bool = True
    # rules that decided at least one entry of the walk -> did one decide a non-directory
    matched: dict[Rule, bool] = field(default_factory=dict)

    @property
    def object_bytes(self) -> int:
        return sum(w.size for w in self.objects.values())

    def catalog_paths(self) -> set[str]:
        return {h.object_path(Suffix.CATALOG) for h in self.catalogs.values()}


class Selector:
    """Resumable walk of a :class:`CatalogTree` under a :class:`Rules` set."""

    def __init__(
        self,
        tree: CatalogTree,
        root_hash: ContentHash,
        rules: Rules,
        exact: frozenset[str] = frozenset(),
    ) -> None:
        self.tree = tree
        self.rules = rules
        self.exact = exact  # paths selected besides the rules (an access list)
        self._exact_dirs = {parent for p in exact for parent in _ancestors(p)}
        self.result = Selection(catalogs={"": root_hash})
        self._pending: list[str] = [""] if self._descend("") else []
        self.result.whole = bool(self._pending)
        self._parked: dict[str, tuple[NestedRef, list[str]]] = {}

    @property
    def done(self) -> bool:
        return not self._pending and not self._parked

    def step(self) -> list[NestedRef]:
        """Walk as far as the loaded catalogs allow; returns the catalogs needed next."""
        while self._pending:
            directory = self._pending.pop()
            try:
                children = self.tree.listing(directory)
            except NeedCatalog as need:
                _ref, dirs = self._parked.setdefault(need.ref.path, (need.ref, []))
                dirs.append(directory)
                continue
            for child in children:
                rule = self.rules.winner(child.path)
                if rule is not None:
                    self.result.matched[rule] = self.result.matched.get(rule, False) or (
                        not child.is_dir
                    )
                if child.is_dir:
                    if self._descend(child.path):
                        self._pending.append(child.path)
                    else:
                        self.result.whole = False
                elif child.is_regular and not child.is_external:
                    if child.path in self.exact or (rule is not None and rule.includes):
                        self._select_file(child.path, child.hash, child.size, child.is_chunked)
                    else:
                        self.result.whole = False
        return [ref for ref, _ in self._parked.values()]

    def _descend(self, directory: str) -> bool:
        return directory in self._exact_dirs or self.rules.descend(directory)

    def _select_file(
        self, path: str, content: ContentHash | None, size: int, chunked: bool
    ) -> None:
        self.result.files += 1
        self.result.file_bytes += size
        if chunked:
            for c in self.tree.chunks(path):
                self._want(c.hash, Suffix.PARTIAL, c.size, path)
        elif content is not None:
            self._want(content, Suffix.FILE, size, path)

    def _want(self, h: ContentHash, suffix: Suffix, size: int, path: str) -> None:
        rel = h.object_path(suffix)
        if rel not in self.result.objects:
            self.result.objects[rel] = Wanted(rel, h, suffix, size, path)

    def attach(self, ref: NestedRef, catalog: Catalog) -> None:
        """A needed catalog arrived (verified by the caller): resume its parked directories."""
        self.tree.attach(ref.path, catalog)
        self.result.catalogs[ref.path] = ref.hash
        _, dirs = self._parked.pop(ref.path)
        self._pending.extend(dirs)


def _ancestors(path: str) -> list[str]:
    """``/a/b/c`` -> ``["", "/a", "/a/b"]``: the directories a walk passes on its way."""
    parts = path.split("/")[1:-1]
    return ["", *("/" + "/".join(parts[: i + 1]) for i in range(len(parts)))]
