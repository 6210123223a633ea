"""``preload --spec SPEC.yaml``: bring the selected parts of CVMFS repositories into a store.

Exit codes: 0 every repository done; 1 a repository failed (fetch, verification, store
error), the others were still attempted; 2 bad command line or spec (nothing downloaded);
3 the store is locked by another preload; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from preload.engine import Options, PreloadError, RepoPreload
from preload.fetch import FetchConfig, make_transport
from preload.progress import Progress, RepoReport, summary_lines
from preload.spec import Spec, SpecError, load_keys, load_spec
from preload.store import RepoStore, StoreLock, StoreLocked

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


@dataclass(frozen=True)
class Config:
    spec: Spec
    options: Options
    only: tuple[str, ...]
    json: bool
    progress: bool | None


def parse_args(argv: list[str] | None) -> tuple[Path, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="preload",
        description="Pull selected parts of CVMFS repositories from Stratum-1 servers into a "
        "local store in the Stratum-1 layout (servable by hep-proxy or any web server).",
        epilog="exit codes: 0 ok, 1 a repository failed, 2 bad arguments or spec, "
        "3 store locked by another preload, 130 interrupted",
    )
    p.add_argument("--spec", required=True, type=Path, help="YAML spec (see README)")
    p.add_argument("--dry-run", action="store_true", help="print what would be fetched")
    p.add_argument(
        "--prune",
        action="store_true",
        help="remove objects the kept revision and selection no longer reference",
    )
    p.add_argument(
        "--allow-expired-whitelist",
        action="store_true",
        help="accept a whitelist past its expiry date",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument(
        "--repo",
        action="append",
        default=[],
        metavar="FQRN",
        help="only this repository of the spec (repeatable)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="always draw the progress line",
    )
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", help="never draw the progress line"
    )
    a = p.parse_args(argv)
    return a.spec, a


def build_config(argv: list[str] | None) -> Config:
    spec_path, a = parse_args(argv)
    spec = load_spec(spec_path)
    names = {r.name for r in spec.repositories}
    for n in a.repo:
        if n not in names:
            raise SpecError(f"--repo {n}: not in {spec_path} (has {', '.join(sorted(names))})")
    return Config(
        spec,
        Options(a.dry_run, a.prune, a.allow_expired_whitelist),
        tuple(a.repo),
        a.json,
        a.progress,
    )


async def run_all(cfg: Config, keys: dict[str, list[rsa.RSAPublicKey]]) -> list[RepoReport]:
    spec = cfg.spec
    fc = FetchConfig(
        spec.concurrency,
        spec.timeout,
        spec.connect_timeout,
        spec.retries,
        spec.backoff_init,
        spec.backoff_max,
    )
    progress = Progress(enabled=cfg.progress)
    reports = []
    transport = make_transport(fc)
    try:
        for repo in spec.repositories:
            if cfg.only and repo.name not in cfg.only:
                continue
            job = RepoPreload(
                repo,
                keys[repo.name],
                RepoStore(spec.store, repo.name),
                fc,
                transport,
                cfg.options,
                progress,
            )
            try:
                reports.append(await job.run())
            except PreloadError as e:
                job.report.status, job.report.error = "failed", str(e)
                reports.append(job.report)
            except OSError as e:
                job.report.status = "failed"
                job.report.error = f"{e.filename or spec.store}: {e.strerror}"
                reports.append(job.report)
    finally:
        await transport.close()
    return reports


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = build_config(argv)
        keys = {
            r.name: load_keys(r.keys, f"{cfg.spec.path}: repositories[{r.name}]")
            for r in cfg.spec.repositories
            if not cfg.only or r.name in cfg.only
        }
    except SpecError as e:
        print(f"preload: {e}", file=sys.stderr)
        return EXIT_USAGE
    _event_loop_policy()
    try:
        with StoreLock(cfg.spec.store):
            reports = asyncio.run(run_all(cfg, keys))
    except StoreLocked as e:
        print(f"preload: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except OSError as e:
        print(f"preload: {e.filename or cfg.spec.store}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("preload: interrupted; the store still holds its previous revision", file=sys.stderr)
        return EXIT_INTERRUPTED
    failed = [r for r in reports if r.status == "failed"]
    if cfg.json:
        print(
            json.dumps({"ok": not failed, "repositories": [r.to_json() for r in reports]}, indent=2)
        )
    else:
        for r in reports:
            if r.status != "failed":
                print("\n".join(summary_lines(r)))
    for r in failed:
        print(f"preload: {r.name}: {r.error}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
