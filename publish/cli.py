"""``hep-publish SRC_DIR --name FQRN --out DIR [--keys DIR]``."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cvmfs_format.errors import FormatError
from cvmfs_format.store import LocalRepository
from cvmfs_format.verify import verify_ensemble, verify_repository
from cvmfs_format.whitelist import load_public_key
from publish.keys import load_or_create_keys
from publish.publisher import default_keys_dir, publish
from publish.scan import scan


@dataclass(frozen=True)
class PublishConfig:
    source: Path
    name: str
    out: Path
    keys: Path
    verify: bool


def parse_args(argv: list[str] | None = None) -> PublishConfig:
    p = argparse.ArgumentParser(
        prog="hep-publish",
        description="Publish a directory tree as a signed CernVM-FS repository "
        "(Stratum-1 layout: OUT/FQRN/.cvmfspublished, data/…).",
    )
    p.add_argument("source", metavar="SRC_DIR", type=Path, help="directory to publish")
    p.add_argument(
        "--name", required=True, metavar="FQRN", help="repository name, e.g. demo.example.org"
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="store root; the repository goes to DIR/FQRN",
    )
    p.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        default=None,
        help="keys directory with FQRN.masterkey/.pub/.key/.crt, created when absent "
        f"[{default_keys_dir()}]",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip re-reading and verifying what was written",
    )
    a = p.parse_args(argv)
    if "/" in a.name or not a.name or a.name.startswith("."):
        p.error(f"--name {a.name!r}: not a repository name")
    return PublishConfig(a.source, a.name, a.out, a.keys or default_keys_dir(), a.verify)


def run(cfg: PublishConfig) -> int:
    if not cfg.source.is_dir():
        print(f"hep-publish: {cfg.source}: not a directory", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    now = dt.datetime.now(dt.UTC)
    keys, created = load_or_create_keys(cfg.keys, cfg.name, now)
    if created:
        print(f"keys: generated in {cfg.keys} ({cfg.name}.masterkey, .pub, .key, .crt)")
    repo = LocalRepository(cfg.out, cfg.name)
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
        master = load_public_key(keys.master_public_pem, f"{cfg.keys}/{cfg.name}.pub")
        manifest = verify_ensemble(
            repo.read_manifest(), repo.read(".cvmfswhitelist"), repo.read, cfg.name, [master], now
        )
        report = verify_repository(repo.read, manifest)
        print(
            f"verified: signature chain (master key -> whitelist -> certificate -> manifest), "
            f"{report.catalogs} catalogs, {report.objects} objects, {report.entries} entries "
            f"in {time.perf_counter() - t1:.2f} s"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        return run(cfg)
    except FormatError as e:
        print(f"hep-publish: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"hep-publish: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hep-publish: interrupted; the previous revision is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
