"""hep-exec configuration: flags > environment (``HEP_EXEC_*``) > YAML file > defaults.

Everything is parsed into one frozen :class:`ExecConfig`; every bad value raises
:class:`ConfigError` with a one-line message naming the source (flag, variable or file) and the
problem, so the CLI can print it and exit 2 instead of showing a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from cvmfs_format.errors import FormatError
from cvmfs_format.proxies import (
    ProxyGroups,
    ServerGroups,
    is_server_like,
    parse_proxies,
    parse_server_templates,
)
from hep_cli import RawDescriptionHelpFormatter, add_version, exit_codes
from worker.ram.ramfiles import BACKINGS
from worker.trace.tracer import TRAP_MODES

if TYPE_CHECKING:
    from cvmfs_format.client_config import ClientConfig

PROG = "hep-exec"
ENV_PREFIX = "HEP_EXEC_"
DEFAULT_RAM = 2 * 1024**3
MIN_RAM = 1024 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_FQRN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SITE_CONFIG = Path("/etc/cvmfs")  # the CernVM-FS client configuration, where a site has one
DIRECT_ONLY = ProxyGroups(((None,),))


class ConfigError(Exception):
    """A bad configuration value; ``str()`` is the one-line message for the user."""


@dataclass(frozen=True)
class ExecConfig:
    """What hep-exec runs with; built by :func:`parse_exec_args` or :func:`build_config`."""

    servers: ServerGroups = ()  # CVMFS_SERVER_URL templates (hep-proxy, Stratum-1s)
    proxies: ProxyGroups = DIRECT_ONLY  # forward proxies (CVMFS_HTTP_PROXY)
    command: tuple[str, ...] = ()
    keys: tuple[Path, ...] = ()
    ram_bytes: int = DEFAULT_RAM
    repositories: tuple[str, ...] = ()
    log_level: str = "warning"
    trap: str = "auto"  # how hot path calls reach the tracer (worker.trace.tracer.run)
    ram_files: str = "auto"  # what cached objects are kept in (worker.ram.ramfiles)
    in_process: bool = True  # opens of /cvmfs files inside tracees (worker/trace/_fastopen.c)
    io_uring: bool = False  # let the command use io_uring (its path calls bypass the tracer)
    timeout: float = 5.0
    connect_timeout: float = 2.0
    retries: int = 1
    backoff_init: float = 0.1
    backoff_max: float = 2.0
    proxy_reset_after: float = 300.0
    mount: str = "/cvmfs"
    check: bool = False
    stats: bool = False
    stats_internals: bool = False  # the trap loop's own counters too (developers, benchmarks)
    shared_cache: bool = True  # one RAM cache service per user and node (worker.node.cache_service)
    cache_dir: Path | None = None  # its runtime directory; None: $XDG_RUNTIME_DIR or /dev/shm
    cache_idle: float = 60.0  # the service exits this long after its last client left
    record_path: Path | None = None  # write the objects opened here, in first-use order
    prefetch_path: Path | None = None  # fetch the objects of this access list at start
    prefetch_concurrency: int = 16
    # of the node's answers for a revision, what a job puts when it mounts it (the rest: a
    # directory at a time, when the job first comes to it; worker/trace/node_answers.py)
    eager_answers: int = 4 << 20
    # a cold file's small siblings fetched with it, at most this many per directory (0: off;
    # worker/node/readahead.py)
    dir_readahead: int = 64
    cache_daemon: bool = False  # run the cache service itself instead of a command
    config_file: Path | None = None
    # the site's CernVM-FS configuration directory (None: not read); what it gave for every
    # repository is in ``site`` (a repository's own files are read when it is mounted)
    cvmfs_config: Path | None = None
    site: ClientConfig | None = field(default=None, compare=False)
    site_filled: frozenset[str] = frozenset()  # options whose value came from ``site``
    warnings: tuple[str, ...] = ()  # said once at start (unreadable site lines, old forms)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def log_level_number(self) -> int:
        return int(getattr(logging, self.log_level.upper()))

    @property
    def verify_signatures(self) -> bool:
        """Signature checks are on whenever master keys are configured."""
        return bool(self.keys)


# ---------------------------------------------------------------- value parsers (pure)

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}


def parse_size(text: str, total_ram: int | None = None) -> int:
    """``2G``, ``512M``, ``1.5GiB``, ``1048576``, or ``25%`` of ``total_ram``; binary units."""
    t = text.strip()
    if t.endswith("%"):
        if total_ram is None:
            raise ValueError(f"{text!r}: percentage given but total RAM unknown")
        try:
            pct = float(t[:-1])
        except ValueError:
            raise ValueError(f"{text!r}: not a percentage") from None
        if not 0 < pct <= 100:
            raise ValueError(f"{text!r}: percentage must be in (0, 100]")
        return int(total_ram * pct / 100)
    m = _SIZE.fullmatch(t)
    if m is None or (m[3] and not m[2] and m[3].lower() != "b"):
        raise ValueError(f"{text!r}: not a size (examples: 2G, 512M, 1.5GiB, 25%)")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def parse_duration(text: str) -> float:
    """Seconds as a number, or with ``ms``/``s``/``m`` suffix."""
    t = text.strip().lower()
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)], factor
            break
    else:
        scale = 1.0
    try:
        value = float(t) * scale
    except ValueError:
        raise ValueError(f"{text!r}: not a duration (examples: 5, 500ms, 2s)") from None
    if value < 0:
        raise ValueError(f"{text!r}: must not be negative")
    return value


def parse_repositories(value: str | Sequence[str]) -> tuple[str, ...]:
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    out = []
    for item in items:
        name = str(item).strip()
        if not _FQRN.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"{name!r}: not a repository name")
        out.append(name)
    return tuple(dict.fromkeys(out))


def parse_keys(value: str | Sequence[str]) -> tuple[Path, ...]:
    """Key files or directories (``:``/``,``-separated); directories contribute ``*.pub``."""
    items = re.split(r"[:,]", value) if isinstance(value, str) else [str(v) for v in value]
    return tuple(Path(i.strip()).expanduser() for i in items if i.strip())


def total_ram_bytes(meminfo: str) -> int | None:
    """``MemTotal`` from the text of /proc/meminfo."""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.MULTILINE)
    return int(m[1]) * 1024 if m else None


def _proxy_text(text: str) -> str:
    """Kept as text until the servers are known (an old-style list names servers)."""
    if not str(text).strip():
        raise ValueError("empty proxy list")
    return str(text).strip()


def _parse_servers(text: str | list[str]) -> ServerGroups:
    groups = parse_server_templates(text)
    for g in groups:
        for url in g:
            if "@fqrn@" not in url and "@org@" not in url and not url.startswith("file:"):
                raise ValueError(
                    f"{url!r} names one repository; hep-exec serves every repository from one "
                    f"list: write {url.rsplit('/cvmfs/', 1)[0]}/cvmfs/@fqrn@"
                )
    return groups


def _parse_cvmfs_config(text: str) -> Path | None:
    t = str(text).strip()
    if t.lower() in ("none", "off", "no"):
        return None
    if not t:
        raise ValueError("empty path (write 'none' to read no CernVM-FS configuration)")
    return Path(t).expanduser()


def _parse_level(text: str) -> str:
    t = text.strip().lower()
    if t not in LOG_LEVELS:
        raise ValueError(f"{text!r}: not a log level ({', '.join(LOG_LEVELS)})")
    return t


def _parse_ram_files(text: str) -> str:
    t = str(text).strip().lower()
    if t not in BACKINGS:
        raise ValueError(f"{text!r}: expected one of {', '.join(BACKINGS)}")
    return t


def _parse_trap(text: str) -> str:
    t = str(text).strip().lower()
    if t not in TRAP_MODES:
        raise ValueError(f"{text!r}: not a trap mode ({', '.join(sorted(TRAP_MODES))})")
    return t


def _parse_int(text: str) -> int:
    try:
        v = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r}: not an integer") from None
    if v < 0:
        raise ValueError(f"{text!r}: must not be negative")
    return v


def _parse_bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "yes", "true", "on"):
        return True
    if t in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{text!r}: not a boolean (1/0, yes/no, true/false, on/off)")


def _parse_path(text: str) -> Path:
    if not str(text).strip():
        raise ValueError("empty path")
    return Path(str(text).strip()).expanduser()


def _parse_concurrency(text: str) -> int:
    v = _parse_int(text)
    if not 1 <= v <= 1024:
        raise ValueError(f"{text!r}: must be between 1 and 1024")
    return v


def _parse_readahead(text: str) -> int:
    v = _parse_int(text)
    if not 0 <= v <= 4096:
        raise ValueError(f"{text!r}: must be between 0 (off) and 4096")
    return v


def _parse_mount(text: str) -> str:
    t = "/" + "/".join(p for p in text.split("/") if p)
    if not text.startswith("/") or t == "/" or any(p in (".", "..") for p in t.split("/")):
        raise ValueError(f"{text!r}: not an absolute directory path")
    return t


# option name -> (parser, YAML key, environment variable suffix)
_OPTIONS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "servers": (_parse_servers, "SERVER"),
    "proxies": (_proxy_text, "PROXY"),
    "cvmfs_config": (_parse_cvmfs_config, "CVMFS_CONFIG"),
    "keys": (parse_keys, "KEYS"),
    "ram_bytes": (parse_size, "RAM"),
    "repositories": (parse_repositories, "REPOSITORIES"),
    "log_level": (_parse_level, "LOG_LEVEL"),
    "trap": (_parse_trap, "TRAP"),
    "ram_files": (_parse_ram_files, "RAM_FILES"),
    "in_process": (_parse_bool, "IN_PROCESS"),
    "io_uring": (_parse_bool, "IO_URING"),
    "timeout": (parse_duration, "TIMEOUT"),
    "connect_timeout": (parse_duration, "CONNECT_TIMEOUT"),
    "retries": (_parse_int, "RETRIES"),
    "backoff_init": (parse_duration, "BACKOFF_INIT"),
    "backoff_max": (parse_duration, "BACKOFF_MAX"),
    "proxy_reset_after": (parse_duration, "PROXY_RESET_AFTER"),
    "mount": (_parse_mount, "MOUNT"),
    "shared_cache": (_parse_bool, "SHARED_CACHE"),
    "cache_dir": (_parse_path, "CACHE_DIR"),
    "cache_idle": (parse_duration, "CACHE_IDLE"),
    "record_path": (_parse_path, "RECORD"),
    "prefetch_path": (_parse_path, "PREFETCH"),
    "prefetch_concurrency": (_parse_concurrency, "PREFETCH_CONCURRENCY"),
    "eager_answers": (parse_size, "EAGER_ANSWERS"),
    "dir_readahead": (_parse_readahead, "DIR_READAHEAD"),
}
# YAML keys: the flag spelling (``proxy``, ``ram``, ``log-level`` or ``log_level`` …)
_YAML_KEYS = {
    "server": "servers",
    "servers": "servers",
    "cvmfs_config": "cvmfs_config",
    "proxy": "proxies",
    "proxies": "proxies",
    "keys": "keys",
    "ram": "ram_bytes",
    "repositories": "repositories",
    "repos": "repositories",
    "log_level": "log_level",
    "trap": "trap",
    "ram_files": "ram_files",
    "in_process": "in_process",
    "io_uring": "io_uring",
    "timeout": "timeout",
    "connect_timeout": "connect_timeout",
    "retries": "retries",
    "backoff_init": "backoff_init",
    "backoff_max": "backoff_max",
    "proxy_reset_after": "proxy_reset_after",
    "mount": "mount",
    "shared_cache": "shared_cache",
    "cache_dir": "cache_dir",
    "cache_idle": "cache_idle",
    "record": "record_path",
    "prefetch": "prefetch_path",
    "prefetch_concurrency": "prefetch_concurrency",
    "eager_answers": "eager_answers",
    "dir_readahead": "dir_readahead",
}
_FILE_NAMES = {
    "servers": "server",
    "proxies": "proxy",
    "ram_bytes": "ram",
    "record_path": "record",
    "prefetch_path": "prefetch",
}
_FLAG_NAMES = {
    "servers": "--server",
    "proxies": "--proxy",
    "cvmfs_config": "--cvmfs-config",
    "keys": "--keys",
    "ram_bytes": "--ram",
    "repositories": "--repositories",
    "log_level": "--log-level",
    "trap": "--trap",
    "ram_files": "--ram-files",
    "in_process": "--no-in-process",
    "io_uring": "--allow-io-uring",
    "timeout": "--timeout",
    "connect_timeout": "--connect-timeout",
    "retries": "--retries",
    "backoff_init": "--backoff-init",
    "backoff_max": "--backoff-max",
    "proxy_reset_after": "--proxy-reset-after",
    "mount": "--mount",
    "shared_cache": "--no-shared-cache",
    "cache_dir": "--cache-dir",
    "cache_idle": "--cache-idle",
    "record_path": "--record",
    "prefetch_path": "--prefetch",
    "prefetch_concurrency": "--prefetch-concurrency",
    "eager_answers": "--eager-answers",
    "dir_readahead": "--dir-readahead",
}


def load_config_file(path: Path) -> dict[str, Any]:
    """Raw option values from a YAML mapping, keyed by ExecConfig field name."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    import yaml  # only when a config file is given: ~16 ms of every job's start otherwise

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _YAML_KEYS.get(str(key).replace("-", "_"))
        if name is None:
            raise ConfigError(
                f"{path}: unknown option {key!r} (known: {', '.join(sorted(set(_YAML_KEYS)))})"
            )
        if isinstance(value, list):
            value = [str(v) for v in value]
            if name in ("proxies", "servers"):
                value = ";".join(value)
        elif value is None or isinstance(value, dict):
            raise ConfigError(f"{path}: option {key!r} needs a value")
        else:
            value = str(value)
        out[name] = value
    return out


def build_config(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    file_values: Mapping[str, Any],
    *,
    file_name: str = "config file",
    total_ram: int | None = None,
    **extra: Any,
) -> ExecConfig:
    """Merge raw values (flags > env > file) and parse each once, naming its source on error."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, (parse, env_suffix) in _OPTIONS.items():
        env_name = ENV_PREFIX + env_suffix
        if flags.get(name) is not None:
            raw, where = flags[name], _FLAG_NAMES[name]
        elif environ.get(env_name, "").strip():
            raw, where = environ[env_name], env_name
        elif file_values.get(name) is not None:
            raw, where = file_values[name], f"{file_name}: {_FILE_NAMES.get(name, name)}"
        else:
            continue
        try:
            values[name] = parse_size(raw, total_ram) if name == "ram_bytes" else parse(raw)
        except (ValueError, FormatError) as e:
            raise ConfigError(f"{where}: {e}") from None
        sources[name] = where
    warnings: list[str] = []
    site, filled = _from_site(values, sources, environ, warnings)
    _servers_and_proxies(values, sources, site, warnings)
    if values.get("ram_bytes", DEFAULT_RAM) < MIN_RAM:
        raise ConfigError(f"{sources['ram_bytes']}: RAM limit must be at least 1M")
    record = values.get("record_path")
    if record is not None and not record.parent.is_dir():
        raise ConfigError(
            f"{sources['record_path']}: {record.parent}: no such directory for the access list"
        )
    if values.get("timeout", 1.0) <= 0:
        raise ConfigError(f"{sources['timeout']}: timeout must be positive")
    return ExecConfig(
        **values,
        **extra,
        site=site,
        site_filled=frozenset(filled),
        warnings=tuple(warnings),
        sources=sources,
    )


def _from_site(
    values: dict[str, Any], sources: dict[str, str], environ: Mapping[str, str], warnings: list[str]
) -> tuple[ClientConfig | None, set[str]]:
    """Read the site's CernVM-FS configuration (``--cvmfs-config``, default /etc/cvmfs where
    it exists) and take from it what flags, environment and config file did not set."""
    from cvmfs_format.client_config import site_values

    if "cvmfs_config" in values:
        root = values["cvmfs_config"]
        if root is not None and not root.is_dir():
            raise ConfigError(
                f"{sources['cvmfs_config']}: {root}: no such CernVM-FS configuration directory"
            )
    else:
        root = SITE_CONFIG if SITE_CONFIG.is_dir() else None
        values["cvmfs_config"] = root
        sources["cvmfs_config"] = "default" if root is not None else "none (no /etc/cvmfs)"
    if root is None:
        return None, set()
    try:
        site, got = site_values(root, None, environ)
    except FormatError as e:
        raise ConfigError(str(e)) from None
    warnings.extend(site.warnings)
    filled = set()
    for name, (value, where) in got.items():
        if name not in values:
            values[name], sources[name] = value, where
            filled.add(name)
    return site, filled


def _servers_and_proxies(
    values: dict[str, Any], sources: dict[str, str], site: ClientConfig | None, warnings: list[str]
) -> None:
    """Servers and forward proxies as CernVM-FS names them; a ``--proxy`` list of base URLs
    with no server anywhere is the old form (hep-proxies named as proxies): taken as servers,
    with a line saying what to write instead."""
    from worker.sites import site_defines_servers

    text = values.pop("proxies", None)
    where = sources.pop("proxies", "")
    if text is not None and not isinstance(text, str):  # a site's value, already parsed
        values["proxies"], sources["proxies"] = text, where
        text = None
    items = [i.strip() for i in re.split(r"[;|]", text or "") if i.strip()]
    has_servers = "servers" in values or (
        values.get("cvmfs_config") is not None and site_defines_servers(values["cvmfs_config"])
    )
    if text is not None and not has_servers and items:
        if any(i.upper() == "DIRECT" for i in items):
            raise ConfigError(
                f"{where}: DIRECT needs a server: give --server URL (hep-proxy or a Stratum-1, "
                "e.g. http://host:port/cvmfs/@fqrn@)"
            )
        try:
            values["servers"] = parse_server_templates(text)
        except FormatError:
            raise ConfigError(
                f"{where}: {text!r} is not a list of URLs (a forward proxy is http://host:port "
                "or DIRECT; a server, given with --server, http://host:port/cvmfs/@fqrn@)"
            ) from None
        sources["servers"] = f"{where} (read as servers)"
        warnings.append(
            f"{where} {text!r} names servers, which hep-exec now takes from --server "
            f"(HEP_EXEC_SERVER, CVMFS_SERVER_URL); --proxy names forward proxies, as "
            f"CVMFS_HTTP_PROXY does. Write: --server "
            f"'{';'.join('|'.join(g) for g in values['servers'])}'"
        )
        return
    if text is not None:
        server_like = [i for i in items if is_server_like(i)]
        if server_like:
            raise ConfigError(
                f"{where}: {server_like[0]!r} is a server, not a forward proxy: "
                f"give it as --server {server_like[0]}"
            )
        try:
            values["proxies"] = parse_proxies(text)
        except FormatError as e:
            raise ConfigError(f"{where}: {e}") from None
        sources["proxies"] = where
    if not has_servers:
        raise ConfigError(
            "no server configured: give --server URL (hep-proxy or a Stratum-1, e.g. "
            f"http://host:port/cvmfs/@fqrn@), {ENV_PREFIX}SERVER, 'server:' in a config file, "
            "or CVMFS_SERVER_URL in the CernVM-FS configuration (--cvmfs-config)"
        )


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _arg_parser() -> _Parser:
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} [options] -- CMD ARGS…",
        description="Run CMD so that it and its children see /cvmfs/<repository>/… read-only, "
        "served from RAM and fetched through hep-proxy; no FUSE, no root, no disk.",
        epilog="Precedence: flags > HEP_EXEC_* environment variables > --config FILE "
        "(also HEP_EXEC_CONFIG) > the CernVM-FS configuration (--cvmfs-config).\n\n"
        + exit_codes(
            (0, "the command's own exit status (128+N if a signal N killed it)"),
            (1, "--check: something is not ok"),
            (2, "a bad option or configuration value, no server reachable, or tracing refused"),
            (130, "interrupted (Ctrl-C) before the command ran"),
        ),
        formatter_class=RawDescriptionHelpFormatter,
    )
    add_version(p, PROG)
    a = p.add_argument
    a(
        "--server",
        dest="servers",
        metavar="LIST",
        help="hep-proxy instances or Stratum-1s, CVMFS_SERVER_URL syntax: "
        "'http://a:8080/cvmfs/@fqrn@;http://b/cvmfs/@fqrn@' (; fails over, | load-balances; "
        "a bare http://host:port means http://host:port/cvmfs/@fqrn@) [HEP_EXEC_SERVER]",
    )
    a(
        "--proxy",
        dest="proxies",
        metavar="LIST",
        help="forward proxies (site squids), CVMFS_HTTP_PROXY syntax: "
        "'http://a:3128|http://b:3128;DIRECT' (| load-balances, ; fails over) "
        "[HEP_EXEC_PROXY, default DIRECT]",
    )
    a(
        "--cvmfs-config",
        dest="cvmfs_config",
        metavar="DIR",
        help="read the site's CernVM-FS client configuration from DIR (default.local, "
        "domain.d/, config.d/; flags and HEP_EXEC_* win), or 'none' "
        "[HEP_EXEC_CVMFS_CONFIG, default /etc/cvmfs where it exists]",
    )
    a(
        "--keys",
        metavar="PATH",
        help="master public keys: *.pub files or directories, "
        "':'-separated; enables signature checks [HEP_EXEC_KEYS]",
    )
    a(
        "--ram",
        dest="ram_bytes",
        metavar="SIZE",
        help="RAM cache limit, e.g. 2G, 512M, 25%% [HEP_EXEC_RAM, default 2G]",
    )
    a(
        "--repositories",
        "--repos",
        dest="repositories",
        metavar="LIST",
        help="repositories to offer under /cvmfs (comma-separated) "
        "[HEP_EXEC_REPOSITORIES, default: whatever the proxy serves that the command touches]",
    )
    a("--config", dest="config_file", metavar="FILE", help="YAML file with the same options")
    a(
        "--log-level",
        dest="log_level",
        metavar="LEVEL",
        help="debug, info, warning, error [HEP_EXEC_LOG_LEVEL, default warning]",
    )
    a(
        "--trap",
        metavar="MODE",
        help="auto, notify (seccomp user notification, Linux >= 6.6) or ptrace: how open/stat "
        "reach the tracer [HEP_EXEC_TRAP, default auto]",
    )
    a(
        "--ram-files",
        dest="ram_files",
        metavar="KIND",
        help="what the RAM cache keeps files in: tmpfs (a private huge-page tmpfs, needs "
        "user namespaces; 1 MiB reads ~1.5x faster), memfd, or auto (tmpfs where it helps "
        "and works) [HEP_EXEC_RAM_FILES, default auto]",
    )
    a("--timeout", metavar="SECONDS", help="per-request timeout [HEP_EXEC_TIMEOUT, 5]")
    a(
        "--connect-timeout",
        dest="connect_timeout",
        metavar="SECONDS",
        help="connect timeout [HEP_EXEC_CONNECT_TIMEOUT, 2]",
    )
    a("--retries", metavar="N", help="extra rounds over all servers [HEP_EXEC_RETRIES, 1]")
    a("--backoff-init", dest="backoff_init", metavar="SECONDS", help=argparse.SUPPRESS)
    a("--backoff-max", dest="backoff_max", metavar="SECONDS", help=argparse.SUPPRESS)
    a(
        "--proxy-reset-after",
        dest="proxy_reset_after",
        metavar="SECONDS",
        help="how long a failed server or proxy is avoided [HEP_EXEC_PROXY_RESET_AFTER, 300]",
    )
    a("--mount", metavar="DIR", help=argparse.SUPPRESS)
    a(
        "--check",
        action="store_true",
        help="report ptrace, seccomp, servers, repositories, RAM, and where each setting came from",
    )
    a("--stats", action="store_true", help="print cache, fetch and system call figures at exit")
    a(
        "--stats-internals",
        action="store_true",
        help="--stats and the trap loop's own counters (for developers)",
    )
    a(
        "--no-in-process",
        dest="in_process",
        action="store_const",
        const="0",
        help="answer every open in the tracer, never inside the command's processes "
        "[HEP_EXEC_IN_PROCESS=0]",
    )
    a(
        "--allow-io-uring",
        dest="io_uring",
        action="store_const",
        const="1",
        help="let the command use io_uring; its opens and stats of /cvmfs paths then fail or "
        "see an empty tree (off: io_uring_setup gives ENOSYS and programs fall back) "
        "[HEP_EXEC_IO_URING=1]",
    )
    a(
        "--no-shared-cache",
        dest="shared_cache",
        action="store_const",
        const="0",
        help="keep a private RAM cache instead of the node's shared cache service "
        "[HEP_EXEC_SHARED_CACHE=0]",
    )
    a(
        "--cache-dir",
        dest="cache_dir",
        metavar="DIR",
        help="runtime directory of the shared cache service (mode 0700, yours) "
        "[HEP_EXEC_CACHE_DIR, default $XDG_RUNTIME_DIR/hep-exec or /dev/shm/hep-exec-UID]",
    )
    a(
        "--cache-idle",
        dest="cache_idle",
        metavar="SECONDS",
        help="the shared cache service exits this long after its last client "
        "[HEP_EXEC_CACHE_IDLE, 60]",
    )
    a(
        "--eager-answers",
        dest="eager_answers",
        metavar="SIZE",
        help="of what the node's earlier jobs learnt about a repository revision, how much "
        "a job takes when it mounts it; the rest a directory at a time "
        "[HEP_EXEC_EAGER_ANSWERS, 4M]",
    )
    a(
        "--dir-readahead",
        dest="dir_readahead",
        metavar="N",
        help="when a file the node does not hold is opened, fetch up to N of its directory's "
        "small files with it (0: off) [HEP_EXEC_DIR_READAHEAD, 64]",
    )
    a(
        "--cache-daemon",
        action="store_true",
        help="run the shared cache service in the foreground (no command)",
    )
    a(
        "--record",
        dest="record_path",
        metavar="FILE",
        help="write the access list (objects opened, first use first) at exit [HEP_EXEC_RECORD]",
    )
    a(
        "--prefetch",
        dest="prefetch_path",
        metavar="FILE",
        help="fetch the objects of this access list in parallel while the command starts "
        "[HEP_EXEC_PREFETCH]",
    )
    a(
        "--prefetch-concurrency",
        dest="prefetch_concurrency",
        metavar="N",
        help="parallel fetches of --prefetch [HEP_EXEC_PREFETCH_CONCURRENCY, 16]",
    )
    a("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def parse_exec_args(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    total_ram: int | None = None,
) -> ExecConfig:
    """``hep-exec [options] -- CMD ARGS…`` -> ExecConfig; raises ConfigError (one line)."""
    argv = list(argv if argv is not None else sys.argv[1:])
    environ = os.environ if environ is None else environ
    if "--" in argv:
        cut = argv.index("--")
        options, command = argv[:cut], argv[cut + 1 :]
    else:
        options, command = argv, []
    ns = _arg_parser().parse_args(options)
    if ns.command:
        if command:
            raise ConfigError(f"unexpected argument {ns.command[0]!r} before '--'")
        command = list(ns.command)
    if not command and not ns.check and not ns.cache_daemon:
        raise ConfigError(f"no command given (usage: {PROG} [options] -- CMD ARGS…)")
    config_file = ns.config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    file_values: dict[str, Any] = {}
    if config_file:
        file_values = load_config_file(Path(config_file))
    if total_ram is None:
        try:
            total_ram = total_ram_bytes(Path("/proc/meminfo").read_text())
        except OSError:
            total_ram = None
    flags = {name: getattr(ns, name) for name in _OPTIONS}
    return build_config(
        flags,
        environ,
        file_values,
        file_name=str(config_file),
        total_ram=total_ram,
        command=tuple(command),
        check=ns.check,
        stats=ns.stats,
        stats_internals=ns.stats_internals,
        cache_daemon=ns.cache_daemon,
        config_file=Path(config_file) if config_file else None,
    )
