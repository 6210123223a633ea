"""The site's CernVM-FS client configuration, as hep-exec uses it.

A site that runs CernVM-FS already says in ``/etc/cvmfs`` where its repositories come from
(``CVMFS_SERVER_URL``, often per domain in ``domain.d/``), through which squids
(``CVMFS_HTTP_PROXY``) and with which master keys.  hep-exec reads the same files the same
way (cvmfs_format.client_config): what applies to every repository at start, what a
repository's own files add when it is mounted.  Flags, ``HEP_EXEC_*`` and ``--config`` win.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvmfs_format.client_config import (
    ClientConfig,
    parse_config_text,
    site_values,
)
from cvmfs_format.errors import FormatError

if TYPE_CHECKING:
    from worker.config import ExecConfig
    from worker.repo.fetcher import Routes

# hep-exec options a site's configuration can give, by the CernVM-FS key that gives them
SITE_KEYS = {
    "servers": "CVMFS_SERVER_URL",
    "proxies": "CVMFS_HTTP_PROXY",
    "keys": "CVMFS_PUBLIC_KEY or CVMFS_KEYS_DIR",
    "repositories": "CVMFS_REPOSITORIES",
    "timeout": "CVMFS_TIMEOUT / CVMFS_TIMEOUT_DIRECT",
    "retries": "CVMFS_MAX_RETRIES",
}


def site_defines_servers(root: Path) -> bool:
    """Whether any file of the configuration sets ``CVMFS_SERVER_URL`` (servers may be
    given per domain only, and which repositories a job touches is not known at start)."""
    for pattern in (
        "default.conf",
        "default.d/*.conf",
        "default.local",
        "domain.d/*",
        "config.d/*",
    ):
        for path in sorted(root.glob(pattern)):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            settings, _ = parse_config_text(text, str(path), {}, {})
            if (s := settings.get("CVMFS_SERVER_URL")) is not None and s.value.strip():
                return True
    return False


@functools.lru_cache(maxsize=256)
def _repository_values(root: Path, fqrn: str) -> tuple[ClientConfig, dict[str, tuple[Any, str]]]:
    return site_values(root, fqrn, dict(os.environ))


def _value(config: ExecConfig, fqrn: str, name: str) -> Any:
    """``name`` for ``fqrn``: hep-exec's own setting, else the repository's site files."""
    own = getattr(config, name)
    if config.cvmfs_config is None or (name in config.sources and name not in config.site_filled):
        return own
    _, got = _repository_values(config.cvmfs_config, fqrn)
    return got[name][0] if name in got else own


def routes_for(config: ExecConfig, fqrn: str) -> Routes:
    """Where ``fqrn`` comes from; FormatError (one line) if nothing says."""
    from worker.repo.fetcher import routes_of

    servers = _value(config, fqrn, "servers")
    if not servers:
        raise FormatError(
            f"/cvmfs/{fqrn}: no server configured for this repository (--server, or "
            f"CVMFS_SERVER_URL in {config.cvmfs_config}/domain.d or config.d)"
        )
    proxies = _value(config, fqrn, "proxies")
    return routes_of(servers, proxies, fqrn)


def keys_for(config: ExecConfig, fqrn: str) -> tuple[Path, ...]:
    """The master keys that sign ``fqrn`` (a domain's own keys directory, for example)."""
    return tuple(_value(config, fqrn, "keys"))


def describe_sources(config: ExecConfig) -> list[tuple[str, str, str]]:
    """(option, effective value, where it came from) for ``--check``."""
    from worker.config import _FLAG_NAMES

    out = []
    for name in (
        "servers",
        "proxies",
        "keys",
        "repositories",
        "timeout",
        "retries",
        "cvmfs_config",
    ):
        value = getattr(config, name)
        if name == "servers":
            shown = ";".join("|".join(g) for g in value) or "(per repository)"
        elif name in ("keys", "repositories"):
            shown = ":".join(str(v) for v in value) or "(none)"
        else:
            shown = str(value) if value is not None else "none"
        where = config.sources.get(name, "default")
        out.append((_FLAG_NAMES.get(name, name).lstrip("-"), shown, where))
    return out
