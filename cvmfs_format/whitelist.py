"""``.cvmfswhitelist``: master-key-signed list of certificate fingerprints, with an expiry."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, NamedTuple

from cvmfs_format.errors import FormatError, WhitelistError
from cvmfs_format.hashes import Algorithm, ContentHash

if TYPE_CHECKING:  # signing only (hep-publish, tests): checking never loads cryptography
    from cryptography.hazmat.primitives.asymmetric import rsa

    from cvmfs_format.rsa_keys import Certificate, RsaPublicKey

_TIME_FORMAT = "%Y%m%d%H%M%S"
_TIME_FIELDS = ((0, 4), (4, 2), (6, 2), (8, 2), (10, 2), (12, 2))  # where _TIME_FORMAT's are


class Whitelist(NamedTuple):
    created: dt.datetime
    expires: dt.datetime
    name: str
    fingerprints: tuple[ContentHash, ...]
    pkcs7: bool
    ca_chain: bool
    body: bytes
    hash_line: str | None
    signature: bytes | None

    def is_expired(self, now: dt.datetime) -> bool:
        """Valid iff (year, month, day, hour) of now < that of the expiry, as cvmfs checks."""

        def hour(t: dt.datetime) -> tuple[int, int, int, int]:
            return (t.year, t.month, t.day, t.hour)

        return not hour(now.astimezone(dt.UTC)) < hour(self.expires)

    def lists(self, certificate_der: bytes) -> bool:
        return any(ContentHash.of(certificate_der, fp.algorithm) == fp for fp in self.fingerprints)


def _parse_time(text: str, what: str) -> dt.datetime:
    if len(text) != 14 or not text.isdigit():
        raise WhitelistError(f".cvmfswhitelist: bad {what} timestamp {text[:40]!r}")
    try:  # by hand: strptime's first call imports and compiles ~3 ms of locale machinery
        y, mo, d, h, mi, s = (int(text[i : i + n]) for i, n in _TIME_FIELDS)
        return dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.UTC)
    except ValueError:
        raise WhitelistError(f".cvmfswhitelist: bad {what} timestamp {text!r}") from None


def fingerprint_text(certificate_der: bytes, algorithm: Algorithm = Algorithm.SHA1) -> str:
    """Uppercase colon-separated fingerprint as written in whitelists."""
    digest = ContentHash.of(certificate_der, algorithm)
    text = ":".join(f"{b:02X}" for b in digest.digest)
    return text + algorithm.value.upper()


def _parse_fingerprint(line: str) -> ContentHash | None:
    token = line.split(" ", 1)[0].split("\t", 1)[0].split("#", 1)[0]
    if not token:
        return None
    try:
        return ContentHash.parse(token.replace(":", "").lower())
    except FormatError:
        raise WhitelistError(f".cvmfswhitelist: bad fingerprint line {line[:80]!r}") from None


def _check_hash_line(body: bytes, hash_line: str) -> None:
    """Checked before anything else is parsed: a body that fails it is tampered with."""
    try:
        algorithm = ContentHash.parse(hash_line).algorithm
    except FormatError:
        raise WhitelistError(f".cvmfswhitelist: bad hash line {hash_line[:60]!r}") from None
    if ContentHash.of(body, algorithm).hex != hash_line:
        raise WhitelistError(".cvmfswhitelist: body does not match its hash line")


def parse_whitelist(raw: bytes) -> Whitelist:
    idx = raw.find(b"\n--\n")
    if idx < 0:
        raise WhitelistError(".cvmfswhitelist: no '--' signature block (truncated?)")
    body = raw[: idx + 1]
    rest = raw[idx + 4 :]
    nl = rest.find(b"\n")
    if nl < 0:
        raise WhitelistError(".cvmfswhitelist: truncated after the '--' line")
    hash_line = rest[:nl].decode("ascii", "replace")
    signature = rest[nl + 1 :]
    _check_hash_line(body, hash_line)
    try:
        lines = body.decode("ascii").split("\n")[:-1]
    except UnicodeDecodeError:
        raise WhitelistError(".cvmfswhitelist: body is not ASCII") from None
    if len(lines) < 3:
        raise WhitelistError(".cvmfswhitelist: fewer than three lines before '--'")
    created = _parse_time(lines[0], "creation")
    if not lines[1].startswith("E"):
        raise WhitelistError(".cvmfswhitelist: line 2 is not an 'E' expiry line")
    expires = _parse_time(lines[1][1:], "expiry")
    if not lines[2].startswith("N"):
        raise WhitelistError(".cvmfswhitelist: line 3 is not an 'N' name line")
    pkcs7 = ca_chain = False
    fingerprints = []
    for line in lines[3:]:
        if line == "Vpkcs7":
            pkcs7 = True
        elif line == "Wcachain":
            ca_chain = True
        else:
            fp = _parse_fingerprint(line)
            if fp is not None:
                fingerprints.append(fp)
    return Whitelist(
        created,
        expires,
        lines[2][1:],
        tuple(fingerprints),
        pkcs7,
        ca_chain,
        body,
        hash_line,
        signature,
    )


def load_public_key(pem: bytes, what: str) -> RsaPublicKey:
    from cvmfs_format import rsa_keys

    try:
        return rsa_keys.load_public_key(pem)
    except FormatError as e:
        raise WhitelistError(f"{what}: {e}") from None


def verify_whitelist(
    wl: Whitelist,
    master_keys: list[RsaPublicKey],
    expected_name: str,
    now: dt.datetime,
    allow_expired: bool = False,
) -> None:
    """Signature by one of the master keys, hash line, name and expiry."""
    if wl.hash_line is None or wl.signature is None:
        raise WhitelistError(".cvmfswhitelist: not signed")
    _check_hash_line(wl.body, wl.hash_line)
    if not master_keys:
        raise WhitelistError(".cvmfswhitelist: no master public keys to verify it with")
    expected = wl.hash_line.encode()
    if not any(_signed_payload(k, wl.signature) == expected for k in master_keys):
        raise WhitelistError(".cvmfswhitelist: signature does not verify with any master key")
    if wl.name != expected_name:
        raise WhitelistError(
            f".cvmfswhitelist: repository name is {wl.name!r}, expected {expected_name!r}"
        )
    if not allow_expired and wl.is_expired(now):
        raise WhitelistError(f".cvmfswhitelist: expired on {wl.expires:%Y-%m-%d %H:%M} UTC")


def _signed_payload(key: RsaPublicKey, signature: bytes) -> bytes | None:
    from cvmfs_format import rsa_keys  # (checking signatures: not a job whose node did)

    em = key.public_decrypt(signature)
    return None if em is None else rsa_keys.pkcs1_type1_payload(em)


def verify_certificate_listed(wl: Whitelist, certificate: Certificate) -> None:
    der = certificate.der
    if not wl.lists(der):
        raise WhitelistError(
            f"certificate {fingerprint_text(der)} is not listed in .cvmfswhitelist"
        )


def raw_rsa_sign(key: rsa.RSAPrivateKey, message: bytes) -> bytes:
    """PKCS#1 v1.5 type-1 padding without DigestInfo, as ``RSA_private_encrypt`` does."""
    numbers = key.private_numbers()
    n = numbers.public_numbers.n
    size = (key.key_size + 7) // 8
    pad = size - 3 - len(message)
    if pad < 8:
        raise ValueError("message too long for RSA key")
    em = b"\x00\x01" + b"\xff" * pad + b"\x00" + message
    return pow(int.from_bytes(em, "big"), numbers.d, n).to_bytes(size, "big")


def make_whitelist(
    name: str,
    certificate_der: bytes,
    master_key: rsa.RSAPrivateKey,
    created: dt.datetime,
    valid_for: dt.timedelta = dt.timedelta(days=30),
    algorithm: Algorithm = Algorithm.SHA1,
) -> bytes:
    """Build and sign a whitelist listing the certificate of ``certificate_der``."""
    der = certificate_der
    created = created.astimezone(dt.UTC)
    body = (
        f"{created:{_TIME_FORMAT}}\n"
        f"E{created + valid_for:{_TIME_FORMAT}}\n"
        f"N{name}\n"
        f"{fingerprint_text(der, algorithm)}\n"
    ).encode()
    hash_line = ContentHash.of(body, algorithm).hex.encode()
    return body + b"--\n" + hash_line + b"\n" + raw_rsa_sign(master_key, hash_line)
