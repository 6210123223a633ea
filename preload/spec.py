"""The YAML spec: parsed into frozen dataclasses, every error naming file, line and key.

Nothing here touches the network; keys and rule files are read when the spec is loaded, so a
bad spec is refused before any download.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cvmfs_format.access_list import AccessListError, read_access_list
from cvmfs_format.errors import FormatError
from cvmfs_format.paths import FQRN_HINT, is_fqrn
from cvmfs_format.proxies import ProxyGroups, parse_proxies, parse_server_urls
from cvmfs_format.rsa_keys import RsaPublicKey
from cvmfs_format.whitelist import load_public_key
from preload.rules import RuleError, Rules


class SpecError(ValueError):
    """A spec that cannot be used; ``str()`` is the one-line message."""


@dataclass(frozen=True)
class RepoSpec:
    name: str
    servers: tuple[str, ...]
    proxies: ProxyGroups
    keys: tuple[Path, ...]
    rules: Rules
    revision: int | None = None
    # paths named by hep-exec access lists (``access_list:``), selected exactly
    access_paths: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Spec:
    path: Path
    store: Path
    repositories: tuple[RepoSpec, ...]
    concurrency: int = 16
    timeout: float = 10.0
    connect_timeout: float = 5.0
    retries: int = 2
    backoff_init: float = 0.5
    backoff_max: float = 2.0


_TOP_KEYS = {
    "store",
    "concurrency",
    "timeout",
    "connect_timeout",
    "retries",
    "backoff_init",
    "backoff_max",
    "repositories",
    "cvmfs_config",
}
_REPO_KEYS = {
    "name",
    "servers",
    "proxies",
    "keys",
    "include",
    "exclude",
    "rules",
    "revision",
    "access_list",
    "cvmfs_config",
}


class _Node:
    """A YAML value with the line it started on (1-based)."""

    def __init__(self, value: Any, line: int) -> None:
        self.value = value
        self.line = line


def _convert(node: yaml.Node) -> _Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, _Node] = {}
        for k, v in node.value:
            out[str(k.value)] = _convert(v)
            out[str(k.value)].line = k.start_mark.line + 1
        return _Node(out, line)
    if isinstance(node, yaml.SequenceNode):
        return _Node([_convert(v) for v in node.value], line)
    assert isinstance(node, yaml.ScalarNode)
    return _Node(
        yaml.safe_load(yaml.serialize(node)) if node.tag != "tag:yaml.org,2002:str" else node.value,
        line,
    )


class _Ctx:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, node: _Node | int, key: str, problem: str) -> SpecError:
        line = node if isinstance(node, int) else node.line
        return SpecError(f"{self.path}:{line}: {key}: {problem}")

    def string(self, node: _Node, key: str) -> str:
        if not isinstance(node.value, str) or not node.value.strip():
            raise self.fail(node, key, f"expected a non-empty string, got {node.value!r}")
        return node.value.strip()

    def strings(self, node: _Node, key: str) -> list[tuple[str, int]]:
        """A string (``;`` or newline separated) or a list of strings, with their lines."""
        if isinstance(node.value, str):
            return [(s, node.line) for s in re.split(r"[;\n]", node.value) if s.strip()]
        if isinstance(node.value, list):
            return [(self.string(n, key), n.line) for n in node.value]
        raise self.fail(node, key, "expected a string or a list of strings")

    def number(self, node: _Node, key: str, lo: float, hi: float, integer: bool) -> float:
        v = node.value
        ok = isinstance(v, int) if integer else isinstance(v, int | float)
        if not ok or isinstance(v, bool) or not lo <= v <= hi:
            kind = "an integer" if integer else "a number"
            raise self.fail(node, key, f"expected {kind} in [{lo:g}, {hi:g}], got {v!r}")
        return float(v)


def _known_keys(
    ctx: _Ctx, mapping: dict[str, _Node], known: set[str], where: str
) -> dict[str, _Node]:
    """Keys spelled with dashes or underscores alike (``connect-timeout``, as hep-proxy's and
    hep-exec's YAML take them), each known and given once."""
    out: dict[str, _Node] = {}
    for raw, v in mapping.items():
        k = raw.replace("-", "_")
        if k not in known:
            raise ctx.fail(v, f"{where}{raw}", f"unknown key (known: {', '.join(sorted(known))})")
        if k in out:
            raise ctx.fail(v, f"{where}{raw}", f"given twice (as {k} or {k.replace('_', '-')})")
        out[k] = v
    return out


def _resolve(p: str) -> Path:
    return Path(p).expanduser()


def load_keys(paths: tuple[Path, ...], what: str) -> list[RsaPublicKey]:
    """Master public keys: files, or directories whose ``*.pub`` files are all used."""
    keys = []
    for p in paths:
        files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
        if p.is_dir() and not files:
            raise SpecError(f"{what}: keys: directory {p} holds no *.pub file")
        for f in files:
            try:
                pem = f.read_bytes()
            except OSError as e:
                raise SpecError(f"{what}: keys: {f}: {e.strerror}") from None
            try:
                keys.append(load_public_key(pem, str(f)))
            except FormatError as e:
                raise SpecError(f"{what}: keys: {e}") from None
    return keys


def _rules(ctx: _Ctx, repo: dict[str, _Node], where: str) -> Rules:
    lines: list[tuple[str, str]] = []
    if "rules" in repo:
        node = repo["rules"]
        rules_file = _resolve(ctx.string(node, f"{where}.rules"))
        try:
            text = rules_file.read_text()
        except OSError as e:
            raise ctx.fail(node, f"{where}.rules", f"{rules_file}: {e.strerror}") from None
        lines += [(t, f"{rules_file}:{i}") for i, t in enumerate(text.splitlines(), 1)]
    if "include" in repo:
        for text, line in ctx.strings(repo["include"], f"{where}.include"):
            lines.append((text, f"{ctx.path}:{line}: {where}.include"))
    if "exclude" in repo:
        for text, line in ctx.strings(repo["exclude"], f"{where}.exclude"):
            t = text.strip()
            lines.append(("!" + t.lstrip("!"), f"{ctx.path}:{line}: {where}.exclude"))
    if "access_list" in repo and not any(not t.strip().startswith(("!", "#")) for t, _ in lines):
        # an access list alone selects exactly its paths, not the default "everything"
        lines.insert(0, ("!/", f"{ctx.path}: {where}.access_list"))
    try:
        return Rules.parse(lines)
    except RuleError as e:
        raise SpecError(str(e)) from None


def _site(
    ctx: _Ctx, node: _Node | None, where: str, inherited: Path | None
) -> tuple[Path | None, _Node | None]:
    """The CernVM-FS configuration directory a repository's servers, proxies and keys may
    come from (``cvmfs_config:``; a repository's own wins over the spec's)."""
    if node is None:
        return inherited, None
    text = ctx.string(node, where)
    if text.strip().lower() == "none":
        return None, node
    root = _resolve(text)
    if not root.is_dir():
        raise ctx.fail(node, where, f"{root}: no such CernVM-FS configuration directory")
    return root, node


def _from_site(ctx: _Ctx, root: Path, node: _Node | None, name: str, where: str) -> dict[str, Any]:
    """What the site's files say for repository ``name`` (as the real client reads them)."""
    from cvmfs_format.client_config import site_values
    from cvmfs_format.proxies import expand_servers

    try:
        cfg, got = site_values(root, name)
    except FormatError as e:
        if node is not None:
            raise ctx.fail(node, where, str(e)) from None
        raise SpecError(f"{ctx.path}: {where}: {e}") from None
    for line in cfg.warnings:
        logging.getLogger("preload").warning("%s", line)
    out: dict[str, Any] = {}
    if "servers" in got:
        out["servers"] = [u for g in expand_servers(got["servers"][0], name) for u in g]
    if "proxies" in got:
        out["proxies"] = got["proxies"][0]
    if "keys" in got:
        out["keys"] = tuple(got["keys"][0])
    return out


def _repository(
    ctx: _Ctx, node: _Node, index: int, site: tuple[Path | None, _Node | None] = (None, None)
) -> RepoSpec:
    where = f"repositories[{index}]"
    if not isinstance(node.value, dict):
        raise ctx.fail(node, where, "expected a mapping with name, servers, keys, …")
    repo = _known_keys(ctx, node.value, _REPO_KEYS, f"{where}.")
    if "name" not in repo:
        raise ctx.fail(node, where, "required key 'name' missing")
    name = ctx.string(repo["name"], f"{where}.name")
    if not is_fqrn(name):
        raise ctx.fail(
            repo["name"],
            f"{where}.name",
            f"{name!r} is not a fully qualified repository name ({FQRN_HINT})",
        )
    where = f"repositories[{name}]"
    root, root_node = _site(ctx, repo.get("cvmfs_config"), f"{where}.cvmfs_config", site[0])
    root_node = root_node or site[1]
    from_site = _from_site(ctx, root, root_node, name, f"{where}.cvmfs_config") if root else {}
    for required in ("servers", "keys"):
        if required not in repo and required not in from_site:
            also = f" (and {root} does not say)" if root else ""
            raise ctx.fail(node, where, f"required key {required!r} missing{also}")
    if "servers" in repo:
        server_items = ctx.strings(repo["servers"], f"{where}.servers")
        try:
            servers = parse_server_urls([s for s, _ in server_items], name)
        except FormatError as e:
            raise ctx.fail(repo["servers"], f"{where}.servers", str(e)) from None
    else:
        servers = from_site["servers"]
    proxies_text = None
    if "proxies" in repo:
        pnode = repo["proxies"]
        if isinstance(pnode.value, list):
            proxies_text = ";".join(ctx.string(n, f"{where}.proxies") for n in pnode.value)
        else:
            proxies_text = ctx.string(pnode, f"{where}.proxies")
    try:
        proxies = parse_proxies(proxies_text)
    except FormatError as e:
        raise ctx.fail(repo["proxies"], f"{where}.proxies", str(e)) from None
    if proxies_text is None and "proxies" in from_site:
        proxies = from_site["proxies"]
    if "keys" in repo:
        keys = tuple(_resolve(k) for k, _ in ctx.strings(repo["keys"], f"{where}.keys"))
    else:
        keys = from_site["keys"]
    revision = None
    if "revision" in repo and repo["revision"].value is not None:
        revision = int(ctx.number(repo["revision"], f"{where}.revision", 1, 2**63, True))
    access: set[str] = set()
    if "access_list" in repo:
        for text, _line in ctx.strings(repo["access_list"], f"{where}.access_list"):
            try:
                entries = read_access_list(_resolve(text))
            except AccessListError as e:
                raise ctx.fail(repo["access_list"], f"{where}.access_list", str(e)) from None
            access.update(e.path for e in entries if e.fqrn == name)
    return RepoSpec(
        name,
        tuple(servers),
        proxies,
        keys,
        _rules(ctx, repo, where),
        revision,
        frozenset(access),
    )


def parse_spec(text: str, path: Path) -> Spec:
    """YAML text -> Spec; SpecError names ``path``, the line and the key."""
    ctx = _Ctx(path)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{path}:{line}: not valid YAML ({problem})") from None
    if root is None:
        raise SpecError(f"{path}: empty spec")
    top = _convert(root)
    if not isinstance(top.value, dict):
        raise ctx.fail(top, "spec", "expected a mapping at the top level")
    d = _known_keys(ctx, top.value, _TOP_KEYS, "")
    for required in ("store", "repositories"):
        if required not in d:
            raise ctx.fail(top, required, "required key missing")
    repos_node = d["repositories"]
    if not isinstance(repos_node.value, list) or not repos_node.value:
        raise ctx.fail(repos_node, "repositories", "expected a non-empty list")
    site = _site(ctx, d.get("cvmfs_config"), "cvmfs_config", None)
    repos = tuple(_repository(ctx, n, i, site) for i, n in enumerate(repos_node.value))
    names = [r.name for r in repos]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ctx.fail(repos_node, "repositories", f"{sorted(dup)[0]} listed twice")
    kw: dict[str, Any] = {}
    limits = {
        "concurrency": (1, 1024, True),
        "timeout": (0.1, 3600, False),
        "connect_timeout": (0.1, 3600, False),
        "retries": (0, 100, True),
        "backoff_init": (0, 600, False),
        "backoff_max": (0, 3600, False),
    }
    for key, (lo, hi, integer) in limits.items():
        if key in d:
            num = ctx.number(d[key], key, lo, hi, integer)
            kw[key] = int(num) if integer else num
    store = _resolve(ctx.string(d["store"], "store"))
    return Spec(path=path, store=store, repositories=repos, **kw)


def load_spec(path: Path) -> Spec:
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text") from None
    return parse_spec(text, path)
