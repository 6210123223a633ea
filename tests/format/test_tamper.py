"""Tampering and malformed input are caught with the project's own one-line errors."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cvmfs_format.catalog import Catalog
from cvmfs_format.catalog_writer import CatalogWriter, NewEntry
from cvmfs_format.errors import (
    CatalogError,
    FormatError,
    IntegrityError,
    SignatureError,
    WhitelistError,
)
from cvmfs_format.manifest import parse_manifest, sign_manifest
from cvmfs_format.objects import Suffix, make_object
from cvmfs_format.store import LocalRepository
from cvmfs_format.verify import verify_repository
from cvmfs_format.whitelist import make_whitelist
from publish.keys import load_or_create_keys, make_certificate
from tests.support.repos import Repo, publish_tree

FQRN = "tamper.example.org"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / ".cvmfscatalog").touch()
    (src / "sub" / "data.txt").write_text("payload\n" * 50)
    (src / "top.txt").write_text("top\n")
    (src / "big.bin").write_bytes(bytes(range(256)) * 20000)  # chunked
    repo, _ = publish_tree(src, tmp_path / "store", FQRN, tmp_path / "keys")
    return repo


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def test_untouched_repository_verifies(repo: Repo) -> None:
    manifest = repo.verified_manifest()
    assert manifest.name == FQRN and manifest.revision == 1
    report = verify_repository(repo.local.read, manifest)
    # "", /sub; /sub/.cvmfscatalog, /sub/data.txt, /top.txt, /big.bin (5,120,000 bytes: 2 chunks)
    assert report.catalogs == 2 and report.kinds == {"dir": 2, "file": 4}
    assert report.file_bytes == 0 + 8 * 50 + 4 + 5_120_000
    # every stored object was checked: 1 empty file, 2 small files, 2 chunks; 2 catalogs; 1 cert
    assert report.objects == 5
    assert len(repo.objects()) == report.objects + report.catalogs + 1


def test_flipped_byte_in_any_object(repo: Repo) -> None:
    objects = sorted(p for p in (repo.dir / "data").rglob("*") if p.is_file())
    kinds = {p.name[-1] if p.name[-1] in "CPX" else "file" for p in objects}
    assert kinds == {"C", "P", "X", "file"}
    for path in objects:
        original = path.read_bytes()
        for offset in (0, len(original) // 2, -1):
            _flip(path, offset)
            with pytest.raises(IntegrityError, match="content hash mismatch") as err:
                repo.verify()
            assert "\n" not in str(err.value)
            path.write_bytes(original)
    repo.verify()


@pytest.mark.parametrize(
    ("where", "error", "message"),
    [
        (lambda raw: raw.index(b"\nS") + 2, SignatureError, "does not match its hash line"),
        (lambda raw: raw.index(b"--\n") + 5, SignatureError, "hash line|does not match"),
        (lambda raw: len(raw) - 10, SignatureError, "signature does not verify"),
    ],
)
def test_flipped_byte_in_manifest(
    repo: Repo, where: Callable[[bytes], int], error: type[Exception], message: str
) -> None:
    path = repo.dir / ".cvmfspublished"
    _flip(path, where(path.read_bytes()))
    with pytest.raises(error, match=message):
        repo.verify()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (lambda raw: raw.index(b"\nN") + 3, "does not match its hash line"),
        (lambda raw: raw.index(b"\n--\n") - 3, "does not match its hash line"),
        (lambda raw: len(raw) - 7, "signature does not verify with any master key"),
    ],
)
def test_flipped_byte_in_whitelist(repo: Repo, where: Callable[[bytes], int], message: str) -> None:
    path = repo.dir / ".cvmfswhitelist"
    _flip(path, where(path.read_bytes()))
    with pytest.raises(WhitelistError, match=message):
        repo.verify()


def test_whitelist_signed_by_another_master_key(repo: Repo, tmp_path: Path) -> None:
    keys, _ = load_or_create_keys(repo.keys_dir, FQRN, NOW)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (repo.dir / ".cvmfswhitelist").write_bytes(
        make_whitelist(FQRN, keys.certificate_der, other, NOW)
    )
    with pytest.raises(WhitelistError, match="does not verify with any master key"):
        repo.verify()


def test_expired_whitelist(repo: Repo) -> None:
    with pytest.raises(WhitelistError, match="expired on"):
        repo.verify(now=NOW + dt.timedelta(days=31))


def test_certificate_not_in_whitelist(repo: Repo) -> None:
    keys, _ = load_or_create_keys(repo.keys_dir, FQRN, NOW)
    stranger = make_certificate(
        FQRN, rsa.generate_private_key(public_exponent=65537, key_size=2048), NOW
    )
    (repo.dir / ".cvmfswhitelist").write_bytes(
        make_whitelist(
            FQRN, stranger.public_bytes(serialization.Encoding.DER), keys.master_key, NOW
        )
    )
    with pytest.raises(WhitelistError, match="is not listed in .cvmfswhitelist"):
        repo.verify()


def test_manifest_signed_by_another_key(repo: Repo) -> None:
    local = repo.local
    m = parse_manifest(local.read_manifest()).manifest
    intruder = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    local.write_manifest(sign_manifest(m, intruder))
    with pytest.raises(SignatureError, match="signature does not verify with the certificate"):
        repo.verify()


def test_wrong_repository_name(repo: Repo) -> None:
    with pytest.raises(SignatureError, match="repository name is 'tamper.example.org'"):
        repo.verify(name="other.example.org")


# --- malformed input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cut", "error", "message"),
    [
        (lambda raw: 5, FormatError, r"\.cvmfspublished: required key R missing"),
        (
            lambda raw: raw.index(b"--\n") + 3,
            FormatError,
            r"\.cvmfspublished: truncated after the '--' line \(no hash line\)",
        ),
        (
            lambda raw: len(raw) - 100,
            SignatureError,
            r"\.cvmfspublished: signature does not verify with the certificate",
        ),
    ],
)
def test_truncated_manifest(
    repo: Repo, cut: Callable[[bytes], int], error: type[Exception], message: str
) -> None:
    path = repo.dir / ".cvmfspublished"
    path.write_bytes(path.read_bytes()[: cut(path.read_bytes())])
    with pytest.raises(error, match=message) as err:
        repo.verified_manifest()
    assert "\n" not in str(err.value)


def _minimal_catalog() -> bytes:
    w = CatalogWriter("")
    w.add(NewEntry(path="", mode=0o40755, size=4096, linkcount=2))
    return w.finish(1, 0, {})


def test_minimal_catalog_reads() -> None:
    root = Catalog(_minimal_catalog()).lookup("")
    assert root is not None and root.is_dir


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda good: b"", "not an SQLite database"),
        (lambda good: b"garbage" * 100, "not an SQLite database"),
        (lambda good: good[:50], "not an SQLite database"),
        (lambda good: good[: len(good) // 2], r"cannot read catalog \(.+\)"),
        (
            lambda good: b"SQLite format 3\0" + b"\xff" * 4000,
            r"cannot read catalog \(file is not a database\)",
        ),
    ],
)
def test_garbage_and_truncated_catalogs(bad: Callable[[bytes], bytes], message: str) -> None:
    data = bad(_minimal_catalog())
    with pytest.raises(CatalogError, match=f"^catalog X: {message}$"):
        Catalog(data, "catalog X")


def test_catalog_missing_counter(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    path.write_bytes(_minimal_catalog())
    db = sqlite3.connect(path)
    db.execute("DELETE FROM statistics WHERE counter = 'subtree_special'")
    db.commit()
    db.close()
    with pytest.raises(CatalogError, match="statistics counter subtree_special missing"):
        Catalog(path.read_bytes())


def test_catalog_with_bad_nested_hash(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    path.write_bytes(_minimal_catalog())
    db = sqlite3.connect(path)
    db.execute("INSERT INTO nested_catalogs VALUES ('/x', 'nothex', 0)")
    db.commit()
    db.close()
    with pytest.raises(CatalogError, match="nested catalog /x: bad hash 'nothex'"):
        Catalog(path.read_bytes()).nested()


def test_directory_that_is_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="not a CVMFS repository"):
        LocalRepository(tmp_path, "nothing.here").read_manifest()


def test_missing_object_is_named(repo: Repo) -> None:
    victim = next(p for p in (repo.dir / "data").rglob("*P"))
    victim.unlink()
    with pytest.raises(FormatError, match=f"{victim}: missing"):
        repo.verify()


def test_catalog_object_that_is_not_sqlite(repo: Repo) -> None:
    local = repo.local
    m = parse_manifest(local.read_manifest()).manifest
    h, stored = make_object(b"definitely not sqlite" * 10)
    local.write_object(h.object_path(Suffix.CATALOG), stored)
    keys, _ = load_or_create_keys(repo.keys_dir, FQRN, NOW)
    fake = m._replace(root_catalog=h)
    local.write_manifest(sign_manifest(fake, keys.repository_key))
    with pytest.raises(CatalogError, match="root catalog: not an SQLite database"):
        repo.verify()
