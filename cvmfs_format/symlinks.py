"""Variant symlinks ``$(VAR)`` / ``$(VAR:-default)``, expanded with the format's own rules."""

from __future__ import annotations

from collections.abc import Mapping


def expand_symlink(raw: str, env: Mapping[str, str]) -> str:
    """Expand like cvmfs ``ExpandSymlink``.

    ``$(NAME)`` -> env value or ``""``; ``$(NAME:-def)`` -> env value if set (even empty),
    else ``def``. The first ``)`` closes; an unclosed ``$(`` stays literal.
    """
    if "$(" not in raw:
        return raw
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        if raw.startswith("$(", i) and i < n - 2:
            close = raw.find(")", i + 2)
            if close < 0:
                out.append(raw[i:])
                break
            expr = raw[i + 2 : close]
            name, sep, default = expr.partition(":-")
            if name in env:
                out.append(env[name])
            elif sep:
                out.append(default)
            i = close + 1
        else:
            out.append(raw[i])
            i += 1
    return "".join(out)
