"""Include/exclude rules in the cvmfs_shrinkwrap spec syntax, decided per path (sans-I/O).

Syntax, one rule per line (blank lines and ``#`` comments ignored)::

    /a/b/file    include exactly this path (its parent directories pass through)
    /a/b/*       include /a/b and its whole subtree
    ^/a/b/*      include /a/b and its direct contents only
    !/a/b        exclude /a/b and everything below it

The most specific rule wins (the one whose path is deepest); between rules on the same path
the later line wins, so later lines refine earlier ones as in cvmfs_shrinkwrap.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cvmfs_format.paths import is_within, normalize, parent


class RuleError(ValueError):
    """A malformed rule; ``str()`` names the source and line."""


class Kind(enum.Enum):
    EXACT = "exact"
    DEEP = "deep"
    FLAT = "flat"
    EXCLUDE = "exclude"


@dataclass(frozen=True, slots=True)
class Rule:
    kind: Kind
    path: str  # repository path ("" = root)
    order: int
    source: str  # "file:line" for messages

    def applies(self, path: str) -> bool:
        if self.kind is Kind.EXACT:
            return path == self.path
        if self.kind is Kind.FLAT:
            return path == self.path or (path != "" and parent(path) == self.path)
        return is_within(path, self.path)

    @property
    def includes(self) -> bool:
        return self.kind is not Kind.EXCLUDE

    @property
    def text(self) -> str:
        """The rule as it is written in a spec (normalised)."""
        if self.kind is Kind.DEEP:
            return f"{self.path}/*"
        if self.kind is Kind.FLAT:
            return f"^{self.path}/*"
        if self.kind is Kind.EXCLUDE:
            return f"!{self.path or '/'}"
        return self.path or "/"


def parse_rule(line: str, source: str, order: int) -> Rule | None:
    """One spec line -> Rule (None for blank/comment); RuleError names ``source``."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    kind = Kind.EXACT
    if text.startswith("!"):
        kind, text = Kind.EXCLUDE, text[1:].strip()
    elif text.startswith("^"):
        kind, text = Kind.FLAT, text[1:].strip()
    if not text.startswith("/"):
        raise RuleError(f"{source}: rule {line.strip()!r} must start with /, ^/ or !/")
    if text.endswith("/*"):
        text = text[:-2]
        if kind is Kind.EXACT:
            kind = Kind.DEEP
        elif kind is Kind.EXCLUDE:
            pass  # "!/a/*" excludes the subtree, like "!/a"
    elif text == "/*" or text == "*":
        text = ""
    elif kind is Kind.FLAT:
        kind = Kind.EXACT  # '^' without a trailing '*' degrades to an exact include
    if "*" in text:
        raise RuleError(f"{source}: rule {line.strip()!r}: '*' is only allowed as a final '/*'")
    if any(p in ("..", ".") for p in text.split("/")):
        raise RuleError(f"{source}: rule {line.strip()!r}: '.' and '..' are not allowed")
    return Rule(kind, normalize(text), order, source)


@dataclass(frozen=True)
class Rules:
    """An ordered rule set; with no include rule at all, everything is included."""

    rules: tuple[Rule, ...]

    @classmethod
    def parse(cls, lines: list[tuple[str, str]]) -> Rules:
        """``lines`` = (text, source) pairs in order; raises RuleError on the first bad one."""
        out: list[Rule] = []
        for text, source in lines:
            rule = parse_rule(text, source, len(out))
            if rule is not None:
                out.append(rule)
        if not any(r.includes for r in out):
            out.insert(0, Rule(Kind.DEEP, "", -1, "default"))
        return cls(tuple(out))

    @property
    def explicit_includes(self) -> list[Rule]:
        """The include rules a spec wrote (not the implicit "everything")."""
        return [r for r in self.rules if r.includes and r.order >= 0]

    def winner(self, path: str) -> Rule | None:
        """The rule that decides ``path`` (None: no rule covers it, not selected)."""
        return self._winner(path)

    def _winner(self, path: str) -> Rule | None:
        best: Rule | None = None
        for r in self.rules:
            if r.applies(path) and (
                best is None
                or r.path.count("/") > best.path.count("/")
                or (r.path.count("/") == best.path.count("/") and r.order > best.order)
            ):
                best = r
        return best

    def selects(self, path: str) -> bool:
        """Is this entry itself selected (a file's content fetched, a directory listed)?"""
        rule = self._winner(path)
        return rule is not None and rule.includes

    def descend(self, directory: str) -> bool:
        """Could anything strictly below ``directory`` be selected?

        Either a rule names a deeper path (a pass-through to it), or the rule that governs
        the directory's children is an include.
        """
        for r in self.rules:
            if r.includes and r.path != directory and is_within(r.path, directory):
                return True
            if r.kind is Kind.FLAT and r.path == directory:
                return True
        # A hypothetical child governed only by rules covering the directory itself.
        probe = directory + "/\x00"
        rule = self._winner(probe)
        return rule is not None and rule.includes and rule.kind is Kind.DEEP

    def pass_through(self, path: str) -> bool:
        """Directory on the way to a selected path (kept so the tree stays walkable)."""
        return self.descend(path)
