"""A site's CernVM-FS client configuration, read the way the client layers it, without a shell.

The client sources shell fragments (``KEY=VALUE`` lines) from ``/etc/cvmfs`` in a fixed order,
later files winning. We take the plain assignments, quoting and ``$VAR`` expansion included, and
skip (with one warning per line) anything that needs a real shell: guessing a conditional or a
command's output would give a site a configuration it never wrote.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from cvmfs_format.errors import FormatError
from cvmfs_format.proxies import ProxyGroups, ServerGroups, parse_proxies, parse_server_templates

KNOWN_KEYS = (
    "CVMFS_SERVER_URL",
    "CVMFS_HTTP_PROXY",
    "CVMFS_FALLBACK_PROXY",
    "CVMFS_KEYS_DIR",
    "CVMFS_PUBLIC_KEY",
    "CVMFS_REPOSITORIES",
    "CVMFS_TIMEOUT",
    "CVMFS_TIMEOUT_DIRECT",
    "CVMFS_MAX_RETRIES",
)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGN = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=")
_EXPORT_ONLY = re.compile(r"export(\s+[A-Za-z_][A-Za-z0-9_]*)+\s*(#.*)?")
_FUNCTION = re.compile(r"(function\s+\S+|[A-Za-z_][A-Za-z0-9_-]*\s*\(\s*\))")
_FQRN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.))*")
# Shell words that open (+1), close (-1) or continue (0) a compound command.
_KEYWORDS = {"if": 1, "case": 1, "for": 1, "while": 1, "until": 1, "{": 1}
_KEYWORDS |= {"fi": -1, "esac": -1, "done": -1, "}": -1}
_KEYWORDS |= {"then": 0, "elif": 0, "else": 0, "do": 0}


class Setting(NamedTuple):
    """One key's value and the ``file:line`` that set it, so messages can point there."""

    value: str
    source: str


class ClientConfig(NamedTuple):
    """The merged result of every file read, with what could not be read."""

    settings: Mapping[str, Setting]
    files: tuple[str, ...]
    warnings: tuple[str, ...]

    def get(self, key: str) -> str | None:
        setting = self.settings.get(key)
        return None if setting is None else setting.value

    def source(self, key: str) -> str | None:
        setting = self.settings.get(key)
        return None if setting is None else setting.source


class _Unreadable(Exception):
    """Internal: why one line needs a shell; turned into a warning, never raised out."""


Lookup = Callable[[str], str]


def _dollar(s: str, i: int, lookup: Lookup, out: list[str]) -> int:
    """Expand the ``$`` at ``s[i]``; return the index after it."""
    nxt = s[i + 1 : i + 2]
    if nxt == "(":
        raise _Unreadable("arithmetic" if s[i + 2 : i + 3] == "(" else "command substitution")
    if nxt == "{":
        m = _NAME.match(s, i + 2)
        if m is None:
            raise _Unreadable("unsupported expansion '${...}'")
        j = m.end()
        if s.startswith("}", j):
            out.append(lookup(m.group()))
            return j + 1
        if s[j : j + 2] not in (":-", ":="):
            raise _Unreadable(f"unsupported expansion '${{{m.group()}{s[j : j + 2]}...}}'")
        default, k = _scan(s, j + 2, lookup, "braces")
        out.append(lookup(m.group()) or default)
        return k
    m = _NAME.match(s, i + 1)
    if m is not None:
        out.append(lookup(m.group()))
        return m.end()
    if nxt and nxt in "'\"":
        raise _Unreadable(f"quoting ${nxt}...{nxt}")
    if nxt and nxt in "0123456789@*#?$!-":
        raise _Unreadable(f"special parameter '${nxt}'")
    out.append("$")
    return i + 1


def _scan(s: str, i: int, lookup: Lookup, mode: str = "word") -> tuple[str, int]:
    """Read from ``s[i]`` one unquoted word, the inside of ``"..."``, or a ``${X:-...}`` default."""
    end = {"word": "", "double": '"', "braces": "}"}[mode]
    out: list[str] = []
    while i < len(s):
        c = s[i]
        if c == end:
            return "".join(out), i + 1
        if mode == "word" and c in " \t;":
            break
        if c == "`":
            raise _Unreadable("command substitution")
        if mode == "word" and c in "|&<>()":
            raise _Unreadable(f"shell operator '{c}'")
        if c == "$":
            i = _dollar(s, i, lookup, out)
        elif mode == "double" or c not in "'\"\\":
            escaped = mode == "double" and c == "\\" and s[i + 1 : i + 2] in ('"', "\\", "$", "`")
            out.append(s[i + 1] if escaped else c)
            i += 2 if escaped else 1
        elif c == "'":
            j = s.find("'", i + 1)
            if j < 0:
                raise _Unreadable("unbalanced quotes")
            out.append(s[i + 1 : j])
            i = j + 1
        elif c == '"':
            quoted, i = _scan(s, i + 1, lookup, "double")
            out.append(quoted)
        else:  # a backslash outside quotes
            if i + 1 >= len(s):
                raise _Unreadable("line continuation")
            out.append(s[i + 1])
            i += 2
    if mode != "word":
        raise _Unreadable("unbalanced quotes" if mode == "double" else "unclosed '${'")
    return "".join(out), i


def _assignment(s: str, lookup: Lookup) -> tuple[str, str] | None:
    """``KEY=VALUE`` (stripped, not a comment) → (key, value); None for a bare ``export KEY``."""
    m = _ASSIGN.match(s)
    if m is None:
        if _EXPORT_ONLY.fullmatch(s):
            return None
        first = re.match(r"[^\s;]*", s)
        word = first.group() if first else ""
        if word.startswith(("$(", "`")):
            raise _Unreadable("command substitution")
        if word in (".", "source"):
            raise _Unreadable("reads another file")
        raise _Unreadable("not a KEY=VALUE assignment")
    value, i = _scan(s, m.end(), lookup)
    rest = s[i:].lstrip()
    if rest.startswith(";"):
        rest = rest[1:].lstrip()
        if rest and not rest.startswith("#"):
            raise _Unreadable("';'-chained commands")
    elif rest and not rest.startswith("#"):
        raise _Unreadable(
            f"shell operator '{rest[0]}'" if rest[0] in "|&<>" else "text after the value"
        )
    return m.group(1), value


def parse_config_text(
    text: str,
    name: str,
    known: Mapping[str, Setting],
    environ: Mapping[str, str] | None = None,
) -> tuple[dict[str, Setting], list[str]]:
    """Pure: one file's text → the settings it makes + one warning per line it cannot read.

    ``known`` holds the settings of earlier files, so ``$VAR`` resolves as the client's shell would.
    """
    made: dict[str, Setting] = {}
    warnings: list[str] = []
    env = environ or {}

    def lookup(key: str) -> str:
        setting = made.get(key) or known.get(key)
        return setting.value if setting is not None else env.get(key, "")

    depth, block = 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        words = re.split(r"[\s;&|()]+", re.sub(r"(^|\s)#.*", "", s))
        why = None
        if depth > 0:
            why = f"part of a shell '{block}' block"
        elif words[0] in _KEYWORDS or _FUNCTION.match(s):
            is_function = _FUNCTION.match(s) is not None
            block = "function" if is_function else words[0]
            why = "function definition" if is_function else f"shell '{words[0]}' statement"
        if why is not None:
            depth = max(0, depth + sum(_KEYWORDS.get(w, 0) for w in words))
        else:
            try:
                pair = _assignment(s, lookup)
            except _Unreadable as exc:
                why = str(exc)
            else:
                if pair is not None:
                    made[pair[0]] = Setting(pair[1], f"{name}:{number}")
        if why is not None:
            warnings.append(f"{name}:{number}: cannot read this line ({why}); ignored")
    return made, warnings


def config_paths(fqrn: str | None) -> list[str]:
    """The files the client reads for ``fqrn``, relative to the config root, later winning."""
    paths = ["default.conf", "default.d/*.conf", "default.local"]
    if fqrn is None:
        return paths
    if not _FQRN.fullmatch(fqrn):
        raise FormatError(f"{fqrn!r} is not a repository name")
    if "." in fqrn:
        domain = fqrn.split(".", 1)[1]
        paths += [f"domain.d/{domain}.conf", f"domain.d/{domain}.local"]
    return [*paths, f"config.d/{fqrn}.conf", f"config.d/{fqrn}.local"]


def load_client_config(
    root: Path, fqrn: str | None, environ: Mapping[str, str] | None = None
) -> ClientConfig:
    """Thin I/O edge: read the files of ``config_paths`` that exist under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FormatError(f"{root}: CernVM-FS configuration directory does not exist")
    settings: dict[str, Setting] = {}
    files: list[str] = []
    warnings: list[str] = []
    for rel in config_paths(fqrn):
        candidates = sorted(root.glob(rel)) if "*" in rel else [root / rel]
        for path in candidates:
            if not path.exists():
                continue
            try:
                text = path.read_bytes().decode("utf-8", errors="replace")
            except OSError as exc:
                raise FormatError(f"{path}: cannot read ({exc.strerror or 'unreadable'})") from None
            made, notes = parse_config_text(text, str(path), settings, environ)
            settings.update(made)
            files.append(str(path))
            warnings.extend(notes)
    return ClientConfig(settings, tuple(files), tuple(warnings))


def _setting(cfg: ClientConfig, key: str) -> Setting | None:
    """A setting with a non-empty value; ``KEY=`` clears a key the way the client treats it."""
    setting = cfg.settings.get(key)
    return setting if setting is not None and setting.value.strip() else None


def config_float(cfg: ClientConfig, key: str) -> float | None:
    """A positive number of seconds (``CVMFS_TIMEOUT``, ``CVMFS_TIMEOUT_DIRECT``); None if unset."""
    setting = _setting(cfg, key)
    if setting is None:
        return None
    try:
        seconds = float(setting.value.strip())
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise FormatError(f"{setting.source}: {key}={setting.value}: not a number of seconds")
    return seconds


def config_int(cfg: ClientConfig, key: str) -> int | None:
    """A whole number, 0 or more (``CVMFS_MAX_RETRIES``); None if unset."""
    setting = _setting(cfg, key)
    if setting is None:
        return None
    if not re.fullmatch(r"[0-9]+", setting.value.strip()):
        raise FormatError(
            f"{setting.source}: {key}={setting.value}: not a whole number (0 or more)"
        )
    return int(setting.value.strip())


def config_keys(cfg: ClientConfig) -> list[Path] | None:
    """Public key files: ``CVMFS_PUBLIC_KEY`` (``:``-separated) wins over ``CVMFS_KEYS_DIR``."""
    public = _setting(cfg, "CVMFS_PUBLIC_KEY")
    if public is not None:
        keys = [Path(p.strip()) for p in public.value.split(":") if p.strip()]
        for key in keys:
            if not key.is_file():
                raise FormatError(f"{public.source}: CVMFS_PUBLIC_KEY: {key}: no such file")
        return keys
    keys_dir = _setting(cfg, "CVMFS_KEYS_DIR")
    if keys_dir is None:
        return None
    directory = Path(keys_dir.value.strip())
    if not directory.is_dir():
        raise FormatError(f"{keys_dir.source}: CVMFS_KEYS_DIR={directory}: no such directory")
    keys = sorted(p for p in directory.glob("*.pub") if p.is_file())
    if not keys:
        raise FormatError(f"{keys_dir.source}: CVMFS_KEYS_DIR={directory}: no *.pub key in it")
    return keys


def config_repositories(cfg: ClientConfig) -> list[str] | None:
    """``CVMFS_REPOSITORIES``; names without a dot get ``CVMFS_DEFAULT_DOMAIN`` as in the client."""
    setting = _setting(cfg, "CVMFS_REPOSITORIES")
    if setting is None:
        return None
    domain = (cfg.get("CVMFS_DEFAULT_DOMAIN") or "").strip().strip(".")
    names: list[str] = []
    for item in setting.value.split(","):
        name = item.strip()
        if not name:
            continue
        if "." not in name and domain:
            name = f"{name}.{domain}"
        if not _FQRN.fullmatch(name):
            raise FormatError(
                f"{setting.source}: CVMFS_REPOSITORIES: {name!r} is not a repository name"
            )
        if name not in names:
            names.append(name)
    return names


def _servers(cfg: ClientConfig) -> ServerGroups | None:
    text = cfg.get("CVMFS_SERVER_URL")
    if text is None or not text.strip():
        return None
    try:
        return parse_server_templates(text)
    except FormatError as e:
        raise FormatError(f"{cfg.source('CVMFS_SERVER_URL')}: CVMFS_SERVER_URL: {e}") from None


def _proxies(cfg: ClientConfig) -> ProxyGroups | None:
    """``CVMFS_HTTP_PROXY``, then ``CVMFS_FALLBACK_PROXY`` as the last resort."""
    main, fallback = cfg.get("CVMFS_HTTP_PROXY"), cfg.get("CVMFS_FALLBACK_PROXY")
    if not (main or "").strip() and not (fallback or "").strip():
        return None
    groups: list[tuple[str | None, ...]] = []
    for key, text in (("CVMFS_HTTP_PROXY", main), ("CVMFS_FALLBACK_PROXY", fallback)):
        if text and text.strip():
            if text.strip().lower() == "auto":
                raise FormatError(
                    f"{cfg.source(key)}: {key}=auto (WPAD proxy discovery) is not supported: "
                    "name the proxies, or DIRECT"
                )
            try:
                groups.extend(parse_proxies(text).groups)
            except FormatError as e:
                raise FormatError(f"{cfg.source(key)}: {key}: {e}") from None
    return ProxyGroups(tuple(groups))


def site_values(
    root: Path, fqrn: str | None, environ: Mapping[str, str] | None = None
) -> tuple[ClientConfig, dict[str, tuple[Any, str]]]:
    """The configuration of ``fqrn`` (None: what every repository gets) and the values it
    gives the project's tools (servers, proxies, keys, repositories, timeout, retries), each
    with the file and line it came from: hep-exec and preload read a site the same way."""
    cfg = load_client_config(root, fqrn, environ)
    got: dict[str, tuple[Any, str]] = {}

    def put(name: str, value: Any, key: str) -> None:
        if value is not None:
            got[name] = (value, str(cfg.source(key)))

    put("servers", _servers(cfg), "CVMFS_SERVER_URL")
    proxies = _proxies(cfg)
    put(
        "proxies",
        proxies,
        "CVMFS_HTTP_PROXY" if cfg.get("CVMFS_HTTP_PROXY") else "CVMFS_FALLBACK_PROXY",
    )
    keys = config_keys(cfg)
    if keys is not None:
        key = "CVMFS_PUBLIC_KEY" if cfg.get("CVMFS_PUBLIC_KEY") else "CVMFS_KEYS_DIR"
        put("keys", tuple(keys), key)
    repos = config_repositories(cfg)
    if repos:
        put("repositories", tuple(repos), "CVMFS_REPOSITORIES")
    direct = proxies is None or all(p is None for g in proxies.groups for p in g)
    timeouts = {k: config_float(cfg, k) for k in ("CVMFS_TIMEOUT", "CVMFS_TIMEOUT_DIRECT")}
    timeout_key = "CVMFS_TIMEOUT_DIRECT" if direct else "CVMFS_TIMEOUT"
    put("timeout", timeouts[timeout_key], timeout_key)
    put("retries", config_int(cfg, "CVMFS_MAX_RETRIES"), "CVMFS_MAX_RETRIES")
    return cfg, got
