"""``.cvmfspublished``: the signed manifest that names a repository's current root catalog."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, NamedTuple

from cvmfs_format.errors import FormatError, SignatureError
from cvmfs_format.hashes import Algorithm, ContentHash

if TYPE_CHECKING:  # signing only (hep-publish, tests): checking never loads cryptography
    from cryptography.hazmat.primitives.asymmetric import rsa

    from cvmfs_format.rsa_keys import Certificate

ROOT_PATH_MD5 = hashlib.md5(b"").hexdigest()
_SEPARATOR = b"\n--\n"


class Manifest(NamedTuple):
    """Parsed manifest fields; unknown keys are kept in ``extra`` and never interpreted."""

    root_catalog: ContentHash
    root_catalog_size: int
    revision: int
    ttl: int = 240
    name: str = ""
    certificate: ContentHash | None = None
    history: ContentHash | None = None
    metainfo: ContentHash | None = None
    reflog: ContentHash | None = None
    timestamp: int = 0
    garbage_collectable: bool = False
    alt_catalog_path: bool = False
    root_path_md5: str = ROOT_PATH_MD5
    extra: tuple[tuple[str, str], ...] = ()

    def to_body(self) -> bytes:
        """Unsigned body in the key order the current publisher writes (C B R D S G A …)."""
        lines = [
            f"C{self.root_catalog.hex}",
            f"B{self.root_catalog_size}",
            f"R{self.root_path_md5}",
            f"D{self.ttl}",
            f"S{self.revision}",
            f"G{'yes' if self.garbage_collectable else 'no'}",
            f"A{'yes' if self.alt_catalog_path else 'no'}",
        ]
        if self.name:
            lines.append(f"N{self.name}")
        if self.certificate:
            lines.append(f"X{self.certificate.hex}")
        if self.history:
            lines.append(f"H{self.history.hex}")
        lines.append(f"T{self.timestamp}")
        if self.metainfo:
            lines.append(f"M{self.metainfo.hex}")
        if self.reflog:
            lines.append(f"Y{self.reflog.hex}")
        return ("\n".join(lines) + "\n").encode()


class SignedManifest(NamedTuple):
    """A manifest together with the exact bytes it was read from."""

    manifest: Manifest
    body: bytes
    hash_line: str | None
    signature: bytes | None
    raw: bytes


def _split(raw: bytes) -> tuple[bytes, str | None, bytes | None]:
    if raw.startswith(b"--\n"):
        return b"", None, None
    idx = raw.find(_SEPARATOR)
    if idx < 0:
        return raw, None, None
    body = raw[: idx + 1]
    rest = raw[idx + len(_SEPARATOR) :]
    nl = rest.find(b"\n")
    if nl < 0:
        raise FormatError(".cvmfspublished: truncated after the '--' line (no hash line)")
    try:
        hash_line = rest[:nl].decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(".cvmfspublished: hash line is not ASCII") from None
    return body, hash_line, rest[nl + 1 :]


def _hash_field(key: str, value: str) -> ContentHash:
    try:
        return ContentHash.parse(value)
    except FormatError:
        raise FormatError(f".cvmfspublished: key {key}: bad hash {value[:60]!r}") from None


def _int_field(key: str, value: str) -> int:
    if not value.isdigit():
        raise FormatError(f".cvmfspublished: key {key}: not a number: {value[:40]!r}")
    return int(value)


def parse_manifest(raw: bytes) -> SignedManifest:
    """Parse manifest bytes (signed or not); raises FormatError with a one-line reason."""
    body, hash_line, signature = _split(raw)
    fields: dict[str, str] = {}
    for lineno, line in enumerate(body.split(b"\n"), 1):
        if not line:
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f".cvmfspublished: line {lineno} is not UTF-8") from None
        key, value = text[0], text[1:]
        if key == "Z" and key in fields:
            fields[key] += "|" + value
        else:
            fields[key] = value
    for required in "CRDS":
        if required not in fields:
            raise FormatError(f".cvmfspublished: required key {required} missing")
    known = set("CBRDSGALNXHTMYZV")
    manifest = Manifest(
        root_catalog=_hash_field("C", fields["C"]),
        root_catalog_size=_int_field("B", fields.get("B", "0")),
        revision=_int_field("S", fields["S"]),
        ttl=_int_field("D", fields["D"]),
        name=fields.get("N", ""),
        certificate=_hash_field("X", fields["X"]) if "X" in fields else None,
        history=_hash_field("H", fields["H"]) if "H" in fields else None,
        metainfo=_hash_field("M", fields["M"]) if "M" in fields else None,
        reflog=_hash_field("Y", fields["Y"]) if "Y" in fields else None,
        timestamp=_int_field("T", fields.get("T", "0")),
        garbage_collectable=fields.get("G") == "yes",
        alt_catalog_path=fields.get("A") == "yes",
        root_path_md5=fields["R"],
        extra=tuple((k, v) for k, v in fields.items() if k not in known),
    )
    return SignedManifest(manifest, body, hash_line, signature, raw)


def sign_manifest(
    manifest: Manifest, key: rsa.RSAPrivateKey, algorithm: Algorithm = Algorithm.SHA1
) -> bytes:
    """Serialize and sign: body, ``--``, hash of body, PKCS#1 v1.5/SHA-1 signature of it."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    body = manifest.to_body()
    hash_line = ContentHash.of(body, algorithm).hex.encode()
    signature = key.sign(hash_line, padding.PKCS1v15(), hashes.SHA1())
    return body + b"--\n" + hash_line + b"\n" + signature


def load_certificate(pem: bytes) -> Certificate:
    from cvmfs_format import rsa_keys  # (checking signatures: not a job whose node did)

    try:
        return rsa_keys.load_certificate(pem)
    except FormatError as e:
        raise FormatError(f"certificate object: {e}") from None


def verify_manifest(
    signed: SignedManifest,
    certificate_pem: bytes,
    expected_name: str | None = None,
) -> Manifest:
    """Check hash line, signature (by the certificate), root path and repository name."""
    if signed.hash_line is None or signed.signature is None:
        raise SignatureError(".cvmfspublished: not signed (no '--' block)")
    try:
        algorithm = ContentHash.parse(signed.hash_line).algorithm
    except FormatError:
        raise SignatureError(f".cvmfspublished: bad hash line {signed.hash_line[:60]!r}") from None
    if ContentHash.of(signed.body, algorithm).hex != signed.hash_line:
        raise SignatureError(".cvmfspublished: body does not match its hash line")
    from cvmfs_format import rsa_keys

    key = load_certificate(certificate_pem).public_key
    if not rsa_keys.verify_pkcs1_sha1(key, signed.signature, signed.hash_line.encode()):
        raise SignatureError(".cvmfspublished: signature does not verify with the certificate")
    m = signed.manifest
    if m.root_path_md5 != ROOT_PATH_MD5:
        raise SignatureError(f".cvmfspublished: root path hash R is {m.root_path_md5!r}")
    if expected_name is not None and m.name != expected_name:
        raise SignatureError(
            f".cvmfspublished: repository name is {m.name!r}, expected {expected_name!r}"
        )
    return m
