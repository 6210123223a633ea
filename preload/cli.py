"""``preload --spec SPEC.yaml``: bring the selected parts of CVMFS repositories into a store.

Exit codes: 0 every repository done; 1 a repository failed (fetch, verification, store
error, or a selection of no file at all), the others were still attempted; 2 bad command line
or spec (nothing downloaded); 3 the store is locked by another preload; 130 interrupted.

With ``--json`` stdout is exactly one JSON object on one line, whatever happens (cron appends
it to a ``.jsonl`` file); the one-line errors still go to stderr. The spec, keys and download
code are imported only once the command line parsed, so ``--version`` and usage errors are
instant.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hep_cli import ArgumentParser, add_log_level, add_version, exit_codes, setup_logging

if TYPE_CHECKING:
    from cvmfs_format.rsa_keys import RsaPublicKey
    from preload.engine import Options
    from preload.progress import RepoReport
    from preload.spec import Spec

PROG = "preload"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EPILOG = exit_codes(
    (EXIT_OK, "every repository preloaded (or dry run done)"),
    (
        EXIT_FAILED,
        "a repository failed (servers, verification, store, or the spec selects "
        "no file of it); the others were still attempted",
    ),
    (EXIT_USAGE, "bad arguments, spec or keys; nothing downloaded"),
    (EXIT_LOCKED, "the store is locked by another preload"),
    (EXIT_INTERRUPTED, "interrupted; the store keeps its previous revision"),
)


class UsageError(Exception):
    """Bad command line (``str()`` is the one-line message)."""


class _Parser(ArgumentParser):
    """Usage errors raise, so that ``--json`` can still print its one JSON line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.usage_message(message))


@dataclass(frozen=True)
class Config:
    spec: Spec
    options: Options
    only: tuple[str, ...]
    json: bool
    progress: bool | None


def parse_args(argv: list[str] | None) -> tuple[Path, Any]:
    p = _Parser(
        prog=PROG,
        description="Pull selected parts of CVMFS repositories from Stratum-1 servers into a "
        "local store in the Stratum-1 layout (servable by hep-proxy or any web server).",
        epilog=EPILOG,
    )
    add_version(p, PROG)
    p.add_argument("--spec", required=True, type=Path, help="YAML spec (docs/preload.md)")
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
    p.add_argument(
        "--json",
        action="store_true",
        help="print the summary as one JSON object on one line on stdout (also on errors)",
    )
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
    add_log_level(p)
    a = p.parse_args(argv)
    return a.spec, a


def check_store(spec: Spec) -> None:
    """The spec's ``store:`` must be a directory, or a path where one can be made."""
    from preload.spec import SpecError

    for p in (spec.store, *spec.store.absolute().parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == spec.store else f"{p} is a file"
                raise SpecError(f"{spec.path}: store: {spec.store}: {what}, not a directory")
            return


def build_config(spec_path: Path, a: Any) -> Config:
    from preload.engine import Options
    from preload.spec import SpecError, load_spec

    spec = load_spec(spec_path)
    names = {r.name for r in spec.repositories}
    for n in a.repo:
        if n not in names:
            raise SpecError(f"--repo {n}: not in {spec_path} (has {', '.join(sorted(names))})")
    check_store(spec)
    return Config(
        spec,
        Options(a.dry_run, a.prune, a.allow_expired_whitelist),
        tuple(a.repo),
        a.json,
        a.progress,
    )


async def run_all(cfg: Config, keys: dict[str, list[RsaPublicKey]]) -> list[RepoReport]:
    from preload.engine import PreloadError, RepoPreload
    from preload.fetch import FetchConfig, make_transport
    from preload.progress import Progress
    from preload.store import RepoStore

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
    import asyncio

    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _record(ok: bool, spec: Path | None, **fields: Any) -> str:
    """The ``--json`` line: one object, one line, with when and which spec."""
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    head = {"ok": ok, "finished": stamp, "spec": str(spec) if spec else None}
    return json.dumps({**head, **fields}, separators=(", ", ": "))


def _fail(message: str, code: int, as_json: bool, spec: Path | None) -> int:
    """One line on stderr; with ``--json`` also the error object on stdout."""
    print(f"{PROG}: {message}", file=sys.stderr)
    if as_json:
        print(_record(False, spec, exit=code, error=message, repositories=[]))
    return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    try:
        spec_path, a = parse_args(args)
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE, as_json, None)
    setup_logging(PROG, a.log_level)
    from preload.spec import SpecError, load_keys

    try:
        cfg = build_config(spec_path, a)
        keys = {
            r.name: load_keys(r.keys, f"{cfg.spec.path}: repositories[{r.name}]")
            for r in cfg.spec.repositories
            if not cfg.only or r.name in cfg.only
        }
    except SpecError as e:
        return _fail(str(e), EXIT_USAGE, a.json, spec_path)
    import asyncio

    from preload.store import StoreLock, StoreLocked

    _event_loop_policy()
    try:
        with StoreLock(cfg.spec.store):
            reports = asyncio.run(run_all(cfg, keys))
    except StoreLocked as e:
        return _fail(str(e), EXIT_LOCKED, a.json, spec_path)
    except OSError as e:
        return _fail(
            f"{e.filename or cfg.spec.store}: {e.strerror}", EXIT_FAILED, a.json, spec_path
        )
    except KeyboardInterrupt:
        message = "interrupted; the store still holds its previous revision"
        return _fail(message, EXIT_INTERRUPTED, a.json, spec_path)
    failed = [r for r in reports if r.status == "failed"]
    code = EXIT_FAILED if failed else EXIT_OK
    if cfg.json:
        repositories = [r.to_json() for r in reports]
        print(_record(not failed, spec_path, exit=code, repositories=repositories))
    else:
        from preload.progress import summary_lines

        for r in reports:
            if r.status != "failed":
                print("\n".join(summary_lines(r)))
    for r in failed:
        print(f"{PROG}: {r.name}: {r.error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
