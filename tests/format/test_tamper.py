"""Tampering and malformed input are caught with the project's own one-line errors."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
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
from cvmfs_format.manifest import Manifest, parse_manifest, sign_manifest
from cvmfs_format.objects import Suffix, make_object
from cvmfs_format.store import LocalRepository
from cvmfs_format.verify import verify_ensemble, verify_repository
from cvmfs_format.whitelist import load_public_key, make_whitelist
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


def _check(
    repo: Repo, name: str = FQRN, keys: list[rsa.RSAPublicKey] | None = None, now: dt.datetime = NOW
) -> None:
    local = repo.local
    master = keys or [load_public_key(repo.master_pub.read_bytes(), str(repo.master_pub))]
    manifest = verify_ensemble(
        local.read_manifest(), local.read(".cvmfswhitelist"), local.read, name, master, now
    )
    verify_repository(local.read, manifest)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def test_untouched_repository_verifies(repo: Repo) -> None:
    _check(repo)


def test_flipped_byte_in_any_object(repo: Repo) -> None:
    objects = sorted(p for p in (repo.dir / "data").rglob("*") if p.is_file())
    kinds = {p.name[-1] if p.name[-1] in "CPX" else "file" for p in objects}
    assert kinds == {"C", "P", "X", "file"}
    for path in objects:
        original = path.read_bytes()
        for offset in (0, len(original) // 2, -1):
            _flip(path, offset)
            with pytest.raises(IntegrityError, match="content hash mismatch") as err:
                _check(repo)
            assert "\n" not in str(err.value)
            path.write_bytes(original)
    _check(repo)


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
        _check(repo)


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
        _check(repo)


def test_whitelist_signed_by_another_master_key(repo: Repo, tmp_path: Path) -> None:
    keys, _ = load_or_create_keys(repo.keys_dir, FQRN, NOW)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (repo.dir / ".cvmfswhitelist").write_bytes(make_whitelist(FQRN, keys.certificate, other, NOW))
    with pytest.raises(WhitelistError, match="does not verify with any master key"):
        _check(repo)


def test_expired_whitelist(repo: Repo) -> None:
    with pytest.raises(WhitelistError, match="expired on"):
        _check(repo, now=NOW + dt.timedelta(days=31))


def test_certificate_not_in_whitelist(repo: Repo) -> None:
    keys, _ = load_or_create_keys(repo.keys_dir, FQRN, NOW)
    stranger = make_certificate(
        FQRN, rsa.generate_private_key(public_exponent=65537, key_size=2048), NOW
    )
    (repo.dir / ".cvmfswhitelist").write_bytes(make_whitelist(FQRN, stranger, keys.master_key, NOW))
    with pytest.raises(WhitelistError, match="is not listed in .cvmfswhitelist"):
        _check(repo)


def test_manifest_signed_by_another_key(repo: Repo) -> None:
    local = repo.local
    m = parse_manifest(local.read_manifest()).manifest
    intruder = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    local.write_manifest(sign_manifest(m, intruder))
    with pytest.raises(SignatureError, match="signature does not verify with the certificate"):
        _check(repo)


def test_wrong_repository_name(repo: Repo) -> None:
    with pytest.raises(SignatureError, match="repository name is 'tamper.example.org'"):
        _check(repo, name="other.example.org")


# --- malformed input -------------------------------------------------------------------


def test_truncated_manifest(repo: Repo) -> None:
    raw = repo.local.read_manifest()
    for cut in (5, raw.index(b"--\n") + 3, len(raw) - 100):
        with pytest.raises(FormatError) as err:
            m = parse_manifest(raw[:cut])
            _ = m.manifest
            verify_ensemble(
                raw[:cut],
                repo.local.read(".cvmfswhitelist"),
                repo.local.read,
                FQRN,
                [load_public_key(repo.master_pub.read_bytes(), "pub")],
                NOW,
            )
        assert "\n" not in str(err.value)


def _minimal_catalog() -> bytes:
    w = CatalogWriter("")
    w.add(NewEntry(path="", mode=0o40755, size=4096, linkcount=2))
    return w.finish(1, 0, {})


def test_garbage_and_truncated_catalogs() -> None:
    good = _minimal_catalog()
    assert Catalog(good).lookup("") is not None
    for bad in (
        b"",
        b"garbage" * 100,
        good[:50],
        good[: len(good) // 2],
        b"SQLite format 3\0" + b"\xff" * 4000,
    ):
        with pytest.raises(CatalogError) as err:
            c = Catalog(bad, "catalog X")
            c.lookup("")
            c.listing("")
        assert str(err.value).startswith("catalog X: ")


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
        _check(repo)


def test_catalog_object_that_is_not_sqlite(repo: Repo) -> None:
    local = repo.local
    m = parse_manifest(local.read_manifest()).manifest
    h, stored = make_object(b"definitely not sqlite" * 10)
    local.write_object(h.object_path(Suffix.CATALOG), stored)
    keys, _ = load_or_create_keys(repo.keys_dir, FQRN, NOW)
    fake = Manifest(**{**m.__dict__, "root_catalog": h})
    local.write_manifest(sign_manifest(fake, keys.repository_key))
    with pytest.raises(CatalogError, match="root catalog: not an SQLite database"):
        _check(repo)
