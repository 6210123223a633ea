"""``hep-publish SRC_DIR --name FQRN --store DIR [--keys DIR]``.

Everything is checked that can be checked before a key is generated or a byte written: the
name, the source, the store and the keys directory. Only the paths taken import the
cryptography and catalog code, so ``--version`` and usage errors start at once.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cvmfs_format.paths import FQRN_HINT, is_fqrn
from hep_cli import ArgumentParser, add_log_level, add_version, exit_codes, setup_logging

PROG = "hep-publish"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
log = logging.getLogger(PROG)


class UsageError(Exception):
    """A bad argument found after parsing (a path that cannot be used); one line."""


@dataclass(frozen=True)
class PublishConfig:
    source: Path
    name: str
    store: Path
    keys: Path | None  # None: the default key-pair directory
    verify: bool
    log_level: str | None = None
    deprecated_out: bool = False  # the store was given with the old --out


def parse_args(argv: list[str] | None = None) -> PublishConfig:
    p = ArgumentParser(
        prog=PROG,
        description="Publish a directory tree as a signed CernVM-FS repository "
        "(Stratum-1 layout: STORE/FQRN/.cvmfspublished, data/…).",
        epilog=exit_codes(
            (EXIT_OK, "published (and verified)"),
            (
                EXIT_FAILED,
                "a store, key or file problem (one line on stderr); "
                "the previous revision is intact",
            ),
            (EXIT_USAGE, "bad arguments: name, source, store or keys directory unusable"),
            (EXIT_INTERRUPTED, "interrupted; the previous revision is intact"),
        ),
    )
    add_version(p, PROG)
    p.add_argument("source", metavar="SRC_DIR", type=Path, help="directory to publish")
    p.add_argument(
        "--name",
        required=True,
        metavar="FQRN",
        help="fully qualified repository name, e.g. demo.example.org",
    )
    p.add_argument(
        "--store",
        type=Path,
        metavar="DIR",
        help="store root (as preload's store: and hep-proxy's --store); "
        "the repository goes to DIR/FQRN",
    )
    p.add_argument("--out", type=Path, metavar="DIR", help="old name of --store")
    p.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        default=None,
        help="key-pair directory (FQRN.masterkey, .pub, .key, .crt: private keys, keep it "
        "out of the store), created when absent [$XDG_CONFIG_HOME/hep-publish/keys, "
        "default ~/.config/hep-publish/keys]",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip re-reading and verifying what was written",
    )
    add_log_level(p)
    a = p.parse_args(argv)
    if not is_fqrn(a.name):
        p.error(f"--name {a.name!r}: not a fully qualified repository name ({FQRN_HINT})")
    if a.store is not None and a.out is not None and a.store != a.out:
        p.error(f"--store {a.store} and --out {a.out}: give the store once (--store)")
    store = a.store if a.store is not None else a.out
    if store is None:
        p.error("the following arguments are required: --store")
    return PublishConfig(a.source, a.name, store, a.keys, a.verify, a.log_level, a.store is None)


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return p
    return Path("/")


def check_directory(path: Path, what: str) -> None:
    """A directory we are about to write into: usable, or UsageError saying why."""
    existing = _first_existing(path.absolute())
    if not existing.is_dir():
        kind = "is a file" if existing == path.absolute() else f"{existing} is a file"
        raise UsageError(f"{what} {path}: {kind}, not a directory")


def prepare_store(store: Path) -> None:
    """Create the store root and prove that files can be written in it, before any key is
    generated (a store that cannot be written would otherwise be found after the work)."""
    check_directory(store, "--store")
    try:
        store.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=store, prefix=".hep-publish-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno in (errno.EACCES, errno.EPERM):
            reason = "permission denied"
        raise UsageError(f"--store {store}: cannot write there ({reason})") from None


def check_keys_dir(keys: Path) -> None:
    """The key-pair directory must be a directory (or be creatable as one)."""
    check_directory(keys, "--keys")
    if keys.is_dir():
        return
    try:
        keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise UsageError(f"--keys {keys}: cannot create the key directory ({e.strerror})") from None


def run(cfg: PublishConfig) -> int:
    import datetime as dt

    from cvmfs_format.store import LocalRepository
    from cvmfs_format.verify import verify_ensemble, verify_repository
    from cvmfs_format.whitelist import load_public_key
    from publish.keys import load_or_create_keys
    from publish.publisher import default_keys_dir, publish
    from publish.scan import scan

    keys_dir = cfg.keys or default_keys_dir()
    if not cfg.source.is_dir():
        raise UsageError(f"{cfg.source}: not a directory")
    prepare_store(cfg.store)
    check_keys_dir(keys_dir)
    t0 = time.perf_counter()
    now = dt.datetime.now(dt.UTC)
    keys, created = load_or_create_keys(keys_dir, cfg.name, now)
    if created:
        print(f"keys: generated in {keys_dir} ({cfg.name}.masterkey, .pub, .key, .crt)")
    repo = LocalRepository(cfg.store, cfg.name)
    result = publish(scan(cfg.source), cfg.source, repo, keys, now)
    took = time.perf_counter() - t0
    kinds = ", ".join(f"{n} {k}s" for k, n in sorted(result.kinds.items()))
    print(f"published {cfg.name} revision {result.revision} to {repo.dir} in {took:.2f} s")
    print(f"  entries: {result.entries} ({kinds}); {result.file_bytes} bytes of file content")
    print(f"  catalogs: {result.catalogs}; root catalog {result.root_catalog.hex}")
    print(
        f"  objects: {result.objects_written} written ({result.bytes_written} bytes stored), "
        f"{result.objects_reused} already present"
    )
    if cfg.verify:
        t1 = time.perf_counter()
        master = load_public_key(keys.master_public_pem, f"{keys_dir}/{cfg.name}.pub")
        manifest = verify_ensemble(
            repo.read_manifest(), repo.read(".cvmfswhitelist"), repo.read, cfg.name, [master], now
        )
        report = verify_repository(repo.read, manifest)
        print(
            f"verified: signature chain (master key -> whitelist -> certificate -> manifest), "
            f"{report.catalogs} catalogs, {report.objects} objects, {report.entries} entries "
            f"in {time.perf_counter() - t1:.2f} s"
        )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    setup_logging(PROG, cfg.log_level)
    if cfg.deprecated_out:
        log.warning("--out is the old name of --store; write --store %s", cfg.store)
    from cvmfs_format.errors import FormatError

    try:
        return run(cfg)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FormatError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"{PROG}: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the previous revision is intact", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
