"""Real repositories for tests: the 2015 fixture from ../shared, and trees we publish."""

from __future__ import annotations

import datetime as dt
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cvmfs_format.hashes import ContentHash
from cvmfs_format.manifest import Manifest, load_certificate, parse_manifest, sign_manifest
from cvmfs_format.objects import Suffix, make_object, verify_object
from cvmfs_format.rsa_keys import RsaPublicKey
from cvmfs_format.store import LocalRepository
from cvmfs_format.verify import verify_ensemble, verify_repository
from cvmfs_format.whitelist import load_public_key, make_whitelist
from publish.keys import load_or_create_keys
from publish.publisher import PublishResult, publish
from publish.scan import scan

PROJECT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("HEP_SHARED_DIR", PROJECT.parent / "shared"))
FIXTURE_DIR = SHARED / "fixtures" / "legacy_aufs_repo_21"
FIXTURE_FQRN = "legacy_aufs.cern.ch"
SHARED_MISSING = f"shared material not found at {SHARED} (set HEP_SHARED_DIR)"
FIXTURE_FILES = ("legacy_aufs_repo.tar.gz", "keys.tar.gz")


def fixture_missing() -> str | None:
    """Why the 2015 repository cannot be unpacked here (None: it can)."""
    absent = [n for n in FIXTURE_FILES if not (FIXTURE_DIR / n).is_file()]
    if not absent:
        return None
    if not FIXTURE_DIR.is_dir():
        return SHARED_MISSING
    return f"shared fixture incomplete: {FIXTURE_DIR} has no {', '.join(absent)}"


@dataclass(frozen=True)
class Repo:
    """A repository on disk: ``store/fqrn`` holds the Stratum-1 layout."""

    store: Path
    fqrn: str
    master_pub: Path
    keys_dir: Path

    @property
    def local(self) -> LocalRepository:
        return LocalRepository(self.store, self.fqrn)

    @property
    def dir(self) -> Path:
        return self.store / self.fqrn

    def objects(self) -> list[str]:
        """Every stored object (catalogs, files, chunks, certificate), as ``data/XX/NAME``
        relative to :attr:`dir`, sorted."""
        return sorted(
            str(p.relative_to(self.dir))
            for p in (self.dir / "data").glob("??/*")
            if p.is_file() and not p.is_symlink() and not p.parent.is_symlink()
        )

    def verified_manifest(
        self,
        *,
        name: str | None = None,
        keys: list[RsaPublicKey] | None = None,
        now: dt.datetime | None = None,
    ) -> Manifest:
        """The manifest, after checking the signature chain as a client does (whitelist signed
        by the master key, manifest signed by the certificate the whitelist lists)."""
        local = self.local
        master = keys or [load_public_key(self.master_pub.read_bytes(), str(self.master_pub))]
        return verify_ensemble(
            local.read_manifest(),
            local.read(".cvmfswhitelist"),
            local.read,
            name or self.fqrn,
            master,
            now or dt.datetime.now(dt.UTC),
        )

    def verify(
        self,
        *,
        name: str | None = None,
        keys: list[RsaPublicKey] | None = None,
        now: dt.datetime | None = None,
    ) -> Manifest:
        """:meth:`verified_manifest`, then every catalog and object reachable from it."""
        manifest = self.verified_manifest(name=name, keys=keys, now=now)
        verify_repository(self.local.read, manifest)
        return manifest


def unpack_fixture(dest: Path, resign: bool = True) -> Repo:
    """Unpack the 2015 repository; with ``resign`` its whitelist gets a fresh 30-day expiry.
    Skips the calling test, saying why, when ../shared (HEP_SHARED_DIR) does not hold it."""
    reason = fixture_missing()
    if reason is not None:
        pytest.skip(reason)
    for name in FIXTURE_FILES:
        with tarfile.open(FIXTURE_DIR / name) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 (Debian 12 has 3.11.2)
                tar.extractall(dest, filter="data")
            else:
                tar.extractall(dest)  # our own fixture, from ../shared
    keys_dir = dest / "etc" / "cvmfs" / "keys"
    repo = Repo(dest / "srv" / "cvmfs", FIXTURE_FQRN, keys_dir / f"{FIXTURE_FQRN}.pub", keys_dir)
    if resign:
        master = serialization.load_pem_private_key(
            (keys_dir / f"{FIXTURE_FQRN}.masterkey").read_bytes(), None
        )
        assert isinstance(master, rsa.RSAPrivateKey)
        local = repo.local
        cert_hash = parse_manifest(local.read_manifest()).manifest.certificate
        assert cert_hash is not None
        pem = verify_object(local.read(cert_hash.object_path(Suffix.CERTIFICATE)), cert_hash)
        wl = make_whitelist(
            FIXTURE_FQRN, load_certificate(pem).der, master, dt.datetime.now(dt.UTC)
        )
        (repo.dir / ".cvmfswhitelist").write_bytes(wl)
    return repo


def publish_tree(
    source: Path, store: Path, fqrn: str, keys_dir: Path
) -> tuple[Repo, PublishResult]:
    """Publish ``source`` with the real publisher (same code path as hep-publish)."""
    keys, _ = load_or_create_keys(keys_dir, fqrn, dt.datetime.now(dt.UTC))
    result = publish(scan(source), source, LocalRepository(store, fqrn), keys)
    return Repo(store, fqrn, keys_dir / f"{fqrn}.pub", keys_dir), result


def add_metainfo(repo: Repo, info: bytes) -> ContentHash:
    """Give the published revision a meta-information object (``M``, JSON in real
    repositories; hep-publish writes none): stored first, then the manifest re-signed with
    the repository's keys naming it."""
    h, stored = make_object(info)
    repo.local.write_object(h.object_path(Suffix.METAINFO), stored)
    keys, _ = load_or_create_keys(repo.keys_dir, repo.fqrn, dt.datetime.now(dt.UTC))
    manifest = parse_manifest(repo.local.read_manifest()).manifest
    repo.local.write_manifest(sign_manifest(manifest._replace(metainfo=h), keys.repository_key))
    return h
