"""``hep-proxy serve --store DIR [--store DIR2 …] --listen HOST:PORT [--config FILE]``."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from hep_cli import ArgumentParser, add_log_level, add_version, exit_codes

if TYPE_CHECKING:
    from proxy.config import ProxyConfig

PROG = "hep-proxy"
EPILOG = exit_codes(
    (0, "stopped by SIGTERM or SIGINT after finishing in-flight responses"),
    (1, "could not start (store, port, access log), or workers kept dying"),
    (2, "bad arguments or config file"),
    (130, "interrupted before serving"),
)


def parse_args(argv: list[str] | None = None) -> ProxyConfig:
    p = ArgumentParser(
        prog=PROG,
        description="Serve preloaded CernVM-FS stores (Stratum-1 layout) over HTTP.",
        epilog=EPILOG,
    )
    add_version(p, PROG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser(
        "serve",
        help="serve stores under /cvmfs/<fqrn>/",
        description="Serve STORE/<fqrn>/{.cvmfspublished,.cvmfswhitelist,data/} over HTTP, "
        "as a server (CVMFS_SERVER_URL) or as a proxy (CVMFS_HTTP_PROXY). Flags win over "
        "the config file.",
        epilog=EPILOG,
    )
    s.add_argument(
        "--store",
        dest="stores",
        action="append",
        metavar="DIR",
        default=[],
        help="store root holding <fqrn>/.cvmfspublished (repeatable)",
    )
    s.add_argument("--listen", metavar="HOST:PORT", help="address to listen on [127.0.0.1:8000]")
    s.add_argument("--config", type=Path, metavar="FILE", help="YAML config file")
    s.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the port, 1 or more [one per core]",
    )
    s.add_argument(
        "--allow",
        action="append",
        metavar="CIDR",
        default=[],
        help="client network allowed to connect (repeatable) [everyone]",
    )
    s.add_argument(
        "--health-allow",
        dest="health_allow",
        action="append",
        metavar="CIDR",
        default=[],
        help="client network allowed /healthz and /metrics, instead of the default "
        "(repeatable) [loopback and the --allow networks]",
    )
    s.add_argument(
        "--upstream",
        dest="upstreams",
        action="append",
        default=[],
        metavar="FQRN=URL",
        help="fill misses of FQRN from a Stratum-1 base URL (@fqrn@ allowed; "
        "several separated by ';')",
    )
    s.add_argument(
        "--upstream-proxy",
        metavar="LIST",
        help="forward proxies to the upstreams, CVMFS_HTTP_PROXY syntax "
        "('http://squid:3128;DIRECT') [DIRECT]",
    )
    s.add_argument("--access-log", metavar="FILE|-|off", help="access log target [-]")
    s.add_argument(
        "--rate-limit",
        type=float,
        metavar="R",
        help="requests/s per client address and worker [0 = unlimited]",
    )
    s.add_argument(
        "--header-timeout",
        type=float,
        metavar="S",
        help="seconds a client may take to send a request head [10]",
    )
    s.add_argument(
        "--manifest-max-age",
        type=int,
        metavar="S",
        help="Cache-Control max-age of .cvmfs* files [61]",
    )
    add_log_level(s)
    a = p.parse_args(argv)
    from proxy.config import ConfigError, build

    flags = {
        "stores": a.stores,
        "listen": a.listen,
        "workers": a.workers,
        "allow": a.allow,
        "health_allow": a.health_allow,
        "log_level": a.log_level,
        "upstreams": a.upstreams,
        "upstream_proxy": a.upstream_proxy,
        "access_log": a.access_log,
        "rate_limit": a.rate_limit,
        "header_timeout": a.header_timeout,
        "manifest_max_age": a.manifest_max_age,
    }
    try:
        return build(a.config, flags)
    except ConfigError as e:
        p.exit(2, f"{PROG}: {e}\n")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    metrics_dir = tempfile.mkdtemp(prefix="hep-proxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    parent = os.getpid()
    try:
        # imported only now: prometheus-client picks its multiprocess mode at import time
        from proxy.server import ServeError, serve
        from proxy.stores import StoreError

        try:
            return serve(cfg)
        except (ServeError, StoreError) as e:
            print(f"hep-proxy: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"hep-proxy: {e.filename or ''}: {e.strerror}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    finally:
        if os.getpid() == parent:
            shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
