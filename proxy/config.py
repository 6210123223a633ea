"""Configuration: a YAML file and command-line flags merged into one frozen ProxyConfig.

Sans-I/O apart from reading the YAML file; flags win over the file, the file over defaults.
Every problem is reported as a one-line :class:`ConfigError` naming the file or flag.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from cvmfs_format.errors import FormatError
from cvmfs_format.proxies import ProxyGroups, parse_proxies, parse_server_urls
from hep_cli import LOG_LEVELS
from proxy.access import Network, parse_networks
from proxy.routing import valid_fqrn


class ConfigError(Exception):
    """Bad configuration; ``str()`` is a one-line message."""


@dataclass(frozen=True)
class ProxyConfig:
    """Everything a worker needs; built once in the CLI and handed to the server."""

    stores: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 0  # 0 = os.cpu_count() (not accepted from a user: "must be 1 or more")
    allow: tuple[Network, ...] = ()
    # who may GET /healthz and /metrics; None: loopback and the allow-list
    health_allow: tuple[Network, ...] | None = None
    log_level: str = "warning"
    upstreams: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    upstream_proxy: ProxyGroups | None = None  # forward proxies on the way (None: DIRECT)
    access_log: str = "-"  # "-" = stdout, "off", or a file path (appended)
    memory_cache_mb: int = 256
    memory_object_kb: int = 256  # objects up to this size are served from RAM, larger by sendfile
    manifest_max_age: int = 61
    data_max_age: int = 259200
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 64
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    send_timeout: float = 60.0
    rate_limit: float = 0.0  # requests/s per client address and worker; 0 = unlimited
    rate_burst: float = 0.0  # 0 = 2 s worth of rate_limit
    upstream_timeout: float = 60.0
    shutdown_timeout: float = 30.0
    backlog: int = 4096

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    @property
    def health_networks(self) -> tuple[Network, ...]:
        """Clients of /healthz and /metrics (empty: everyone, as for ``allow``): by default
        the allow-list plus loopback, so a check from the host itself (its own name often
        resolves to 127.0.1.1) is answered even where the allow-list names only workers."""
        if self.health_allow is not None:
            return self.health_allow
        return (*self.allow, *LOOPBACK) if self.allow else ()

    @property
    def burst(self) -> float:
        return self.rate_burst if self.rate_burst > 0 else max(1.0, 2 * self.rate_limit)


LOOPBACK = parse_networks(["127.0.0.0/8", "::1/128"])

_INT = {
    "port",
    "workers",
    "memory_cache_mb",
    "memory_object_kb",
    "manifest_max_age",
    "data_max_age",
    "max_line_size",
    "max_field_size",
    "max_headers",
    "backlog",
}
_FLOAT = {
    "header_timeout",
    "keepalive_timeout",
    "send_timeout",
    "rate_limit",
    "rate_burst",
    "upstream_timeout",
    "shutdown_timeout",
}
KNOWN = {f.name for f in fields(ProxyConfig)} | {"store", "listen"}


def parse_listen(text: str, what: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def parse_upstream(text: str, what: str = "--upstream") -> tuple[str, tuple[str, ...]]:
    """``FQRN=URL[;URL…]`` (URLs may use ``@fqrn@``) → (fqrn, base URLs)."""
    fqrn, sep, urls = text.partition("=")
    if not sep or not valid_fqrn(fqrn.strip()):
        raise ConfigError(f"{what} {text!r}: expected FQRN=URL")
    fqrn = fqrn.strip()
    try:
        parsed = parse_server_urls(urls, fqrn)
    except FormatError as e:
        raise ConfigError(f"{what} {text!r}: {e}") from None
    for u in parsed:
        if not u.startswith("http://"):
            raise ConfigError(f"{what} {text!r}: only http:// upstreams are supported")
    return fqrn, tuple(parsed)


def _coerce(key: str, value: Any, what: str) -> Any:
    try:
        if key in _INT:
            if isinstance(value, bool):
                raise ValueError
            v = int(value)
            if v < 0:
                raise ValueError
            return v
        if key in _FLOAT:
            f = float(value)
            if f < 0:
                raise ValueError
            return f
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: not a non-negative number: {value!r}") from None
    return value


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    raise TypeError


_FLAG_NAMES = {"stores": "--store", "upstreams": "--upstream"}


def settings_from_mapping(data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Validate raw settings (from YAML, or flags when ``what`` is ``""``) into ProxyConfig
    keyword arguments."""
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        flag = _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))
        label = f"{what}: {raw_key}" if what else flag
        if key not in KNOWN:
            raise ConfigError(f"{what}: unknown setting {raw_key!r}")
        try:
            if key in ("stores", "store"):
                out["stores"] = tuple(Path(p) for p in _as_list(value))
            elif key == "listen":
                out["host"], out["port"] = parse_listen(str(value), label)
            elif key in ("allow", "health_allow"):
                out[key] = parse_networks(_as_list(value))
            elif key == "workers":
                out[key] = _coerce(key, value, label)
                if out[key] < 1:
                    raise ConfigError(f"{label} must be 1 or more (default: one per core)")
            elif key == "log_level":
                level = str(value).lower()
                if level not in LOG_LEVELS:
                    raise ConfigError(f"{label}: {value!r} is not one of {', '.join(LOG_LEVELS)}")
                out[key] = level
            elif key == "upstreams":
                if isinstance(value, Mapping):
                    items = [f"{k}={';'.join(_as_list(v))}" for k, v in value.items()]
                else:
                    items = _as_list(value)
                out["upstreams"] = dict(parse_upstream(i, label) for i in items)
            elif key == "upstream_proxy":
                text = ";".join(_as_list(value))
                try:
                    out["upstream_proxy"] = parse_proxies(text)
                except FormatError as e:
                    raise ConfigError(f"{label}: {e}") from None
            elif key in ("host", "access_log"):
                out[key] = str(value)
            else:
                out[key] = _coerce(key, value, label)
        except TypeError:
            raise ConfigError(f"{label}: expected a string or a list") from None
        except ValueError as e:
            raise ConfigError(f"{label}: {e}") from None
    return out


def load_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return settings_from_mapping(data, str(path))


def build(config_file: Path | None, flags: Mapping[str, Any]) -> ProxyConfig:
    """Defaults, then the file, then the flags that were given (None = not given)."""
    cfg = ProxyConfig()
    if config_file is not None:
        cfg = replace(cfg, **load_file(config_file))
    given = {k: v for k, v in flags.items() if v is not None and v != []}
    cfg = replace(cfg, **settings_from_mapping(given, ""))
    if not cfg.stores:
        raise ConfigError("no store given (--store DIR or 'stores:' in the config file)")
    return cfg
