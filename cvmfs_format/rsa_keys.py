"""RSA public keys, the key of an X.509 certificate, and the PKCS#1 v1.5 signature checks of
CernVM-FS, without the cryptography package.

Why: importing cryptography took 31-35 ms on the test VM, far more than what it was used for
when a job, a preload or the node's service verifies a repository (``pow(s, e, n)`` with a
2048-bit key takes ~50 µs in Python).  Only checks of public data are made here; signing and
making keys (hep-publish, tests) still use cryptography.

What is parsed is the DER of three structures (RFC 5280, RFC 8017): SubjectPublicKeyInfo,
RSAPublicKey and, of a Certificate, the walk to its SubjectPublicKeyInfo.  Lengths are
definite and bounds-checked; anything else is a FormatError.  A certificate's key cannot be
chosen by a server: the certificate must have the fingerprint a master-key-signed whitelist
lists (cvmfs_format.verify).
"""

from __future__ import annotations

import binascii
import hashlib
import re
from dataclasses import dataclass

from cvmfs_format.errors import FormatError

# 1.2.840.113549.1.1.1, as DER content
RSA_ENCRYPTION = bytes.fromhex("2a864886f70d010101")
# DigestInfo { sha1, NULL } before a 20-byte SHA-1 digest (RFC 8017 §9.2, note 1)
SHA1_DIGEST_INFO = bytes.fromhex("3021300906052b0e03021a05000414")

_SEQUENCE, _INTEGER, _BIT_STRING, _OID, _VERSION = 0x30, 0x02, 0x03, 0x06, 0xA0
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_BASE64 = re.compile(rb"[A-Za-z0-9+/=\s]*")


@dataclass(frozen=True)
class RsaPublicKey:
    n: int
    e: int

    @property
    def size(self) -> int:
        """Bytes of the modulus: the length of every signature by this key."""
        return (self.n.bit_length() + 7) // 8

    def public_decrypt(self, signature: bytes) -> bytes | None:
        """The encoded message of ``signature`` (``s^e mod n``, as long as the modulus), or
        None for a signature of the wrong length or out of range."""
        if len(signature) != self.size:
            return None
        s = int.from_bytes(signature, "big")
        if s >= self.n:
            return None
        return pow(s, self.e, self.n).to_bytes(self.size, "big")


@dataclass(frozen=True)
class Certificate:
    der: bytes  # what the whitelist's fingerprints are of
    public_key: RsaPublicKey


def _element(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``pos``, within ``end``."""
    if pos + 2 > end:
        raise FormatError("truncated")
    tag, length = buf[pos], buf[pos + 1]
    if tag & 0x1F == 0x1F:
        raise FormatError("unexpected tag")
    pos += 2
    if length & 0x80:
        k = length & 0x7F
        if not 1 <= k <= 4 or pos + k > end:
            raise FormatError("bad length")
        length = int.from_bytes(buf[pos : pos + k], "big")
        pos += k
    if length > end - pos:
        raise FormatError("truncated")
    return tag, pos, pos + length


def _expect(buf: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    got, start, stop = _element(buf, pos, end)
    if got != tag:
        raise FormatError(f"tag {got:#04x} where {tag:#04x} was expected")
    return start, stop


def _positive_integer(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, end) of a positive INTEGER at ``pos``."""
    start, stop = _expect(buf, pos, end, _INTEGER)
    if stop == start or buf[start] & 0x80:
        raise FormatError("not a positive integer")
    return int.from_bytes(buf[start:stop], "big"), stop


def _rsa_public_key(buf: bytes, pos: int, end: int) -> RsaPublicKey:
    """RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }."""
    start, stop = _expect(buf, pos, end, _SEQUENCE)
    n, at = _positive_integer(buf, start, stop)
    e, at = _positive_integer(buf, at, stop)
    if at != stop or n.bit_length() < 512 or e < 3 or e % 2 == 0:
        raise FormatError("not a usable RSA key")
    return RsaPublicKey(n, e)


def _subject_public_key_info(buf: bytes, pos: int, end: int) -> RsaPublicKey:
    """SEQUENCE { SEQUENCE { OID rsaEncryption, params }, BIT STRING { RSAPublicKey } }."""
    start, stop = _expect(buf, pos, end, _SEQUENCE)
    alg_start, alg_stop = _expect(buf, start, stop, _SEQUENCE)
    oid_start, oid_stop = _expect(buf, alg_start, alg_stop, _OID)
    if buf[oid_start:oid_stop] != RSA_ENCRYPTION:
        raise FormatError("not an RSA public key")
    bits_start, bits_stop = _expect(buf, alg_stop, stop, _BIT_STRING)
    if bits_stop != stop or bits_start == bits_stop or buf[bits_start] != 0:
        raise FormatError("bad public key bits")
    return _rsa_public_key(buf, bits_start + 1, bits_stop)


def _pem_blocks(pem: bytes) -> list[tuple[bytes, bytes]]:
    """(label, DER) of each PEM block, in order."""
    out = []
    for m in _PEM.finditer(pem):
        if not _BASE64.fullmatch(m[2]):
            raise FormatError("bad base64")
        try:
            out.append((m[1], binascii.a2b_base64(m[2])))
        except binascii.Error:
            raise FormatError("bad base64") from None
    return out


def load_public_key(pem: bytes) -> RsaPublicKey:
    """The first key of a PEM file: ``PUBLIC KEY`` (SubjectPublicKeyInfo, what CernVM-FS's
    master keys are) or ``RSA PUBLIC KEY`` (PKCS#1).  FormatError "not a PEM public key" or
    "not an RSA public key"."""
    for label, der in _pem_blocks(pem):
        if label not in (b"PUBLIC KEY", b"RSA PUBLIC KEY"):
            continue
        parse = _rsa_public_key if label == b"RSA PUBLIC KEY" else _subject_public_key_info
        try:
            key = parse(der, 0, len(der))
            end = _element(der, 0, len(der))[2]
        except FormatError as e:
            if str(e) == "not an RSA public key":
                raise
            raise FormatError("not a PEM public key") from None
        if end != len(der):
            raise FormatError("not a PEM public key")
        return key
    raise FormatError("not a PEM public key")


def load_certificate(pem: bytes) -> Certificate:
    """The first ``CERTIFICATE`` of a PEM file: its DER and its RSA key.  FormatError "not a
    PEM X.509 certificate" or "public key is not RSA"."""
    for label, der in _pem_blocks(pem):
        if label != b"CERTIFICATE":
            continue
        try:
            start, stop = _expect(der, 0, len(der), _SEQUENCE)
            if stop != len(der):
                raise FormatError("trailing bytes")
            tbs_start, tbs_stop = _expect(der, start, stop, _SEQUENCE)
            at = tbs_start
            tag, _s, after = _element(der, at, tbs_stop)
            if tag == _VERSION:  # [0] EXPLICIT Version, absent in v1
                at = after
            # serialNumber, signature, issuer, validity, subject: then subjectPublicKeyInfo
            for want in (_INTEGER, _SEQUENCE, _SEQUENCE, _SEQUENCE, _SEQUENCE):
                at = _expect(der, at, tbs_stop, want)[1]
            key = _subject_public_key_info(der, at, tbs_stop)
        except FormatError as e:
            if str(e) == "not an RSA public key":
                raise FormatError("public key is not RSA") from None
            raise FormatError("not a PEM X.509 certificate") from None
        return Certificate(der, key)
    raise FormatError("not a PEM X.509 certificate")


def pkcs1_type1_payload(em: bytes) -> bytes | None:
    """What follows ``00 01 FF…FF 00`` (at least 8 FF) in an encoded message, or None: what
    OpenSSL's ``RSA_public_decrypt`` with PKCS#1 padding returns (the whitelist's signature
    is made so, over its hash line without DigestInfo)."""
    if em[:2] != b"\x00\x01":
        return None
    sep = em.find(b"\x00", 2)
    if sep < 10 or em[2:sep] != b"\xff" * (sep - 2):
        return None
    return em[sep + 1 :]


def verify_pkcs1_sha1(key: RsaPublicKey, signature: bytes, message: bytes) -> bool:
    """A PKCS#1 v1.5 signature of SHA-1(``message``) (RSASSA-PKCS1-v1_5, as OpenSSL's
    ``RSA_verify`` with SHA-1 checks it: the whole encoded message compared, not parsed)."""
    em = key.public_decrypt(signature)
    t = SHA1_DIGEST_INFO + hashlib.sha1(message).digest()
    pad = key.size - 3 - len(t)
    return em is not None and pad >= 8 and em == b"\x00\x01" + b"\xff" * pad + b"\x00" + t
