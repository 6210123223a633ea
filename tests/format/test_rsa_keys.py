"""cvmfs_format.rsa_keys against the cryptography package as the oracle: the same keys out of
the same PEM files and certificates, the same verdict on every signature, and a FormatError
(never another exception) for anything malformed."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import random

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from cvmfs_format import rsa_keys
from cvmfs_format.errors import FormatError, WhitelistError
from cvmfs_format.manifest import load_certificate
from cvmfs_format.whitelist import load_public_key
from publish.keys import make_certificate

NOW = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)


@pytest.fixture(scope="module", params=[(2048, 65537), (4096, 65537), (2048, 3)])
def key(request: pytest.FixtureRequest) -> rsa.RSAPrivateKey:
    size, e = request.param
    return rsa.generate_private_key(public_exponent=e, key_size=size)


def spki_pem(k: rsa.RSAPrivateKey) -> bytes:
    return k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_public_keys_load_as_cryptography_loads_them(key: rsa.RSAPrivateKey) -> None:
    want = key.public_key().public_numbers()
    pkcs1 = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
    )
    for pem in (spki_pem(key), pkcs1, b"a comment\n" + spki_pem(key).replace(b"\n", b"\r\n")):
        got = rsa_keys.load_public_key(pem)
        assert (got.n, got.e) == (want.n, want.e)
        assert got.size * 8 == key.key_size


def test_certificates_give_their_der_and_key(key: rsa.RSAPrivateKey) -> None:
    cert = make_certificate("keys.example.org", key, NOW)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    got = rsa_keys.load_certificate(b"text before it\n" + pem + b"and after\n")
    assert got.der == cert.public_bytes(serialization.Encoding.DER)
    want = key.public_key().public_numbers()
    assert (got.public_key.n, got.public_key.e) == (want.n, want.e)


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = (
        bytes([n])
        if n < 128
        else bytes([0x80 | ((n.bit_length() + 7) // 8)])
        + n.to_bytes((n.bit_length() + 7) // 8, "big")
    )
    return bytes([tag]) + length + content


def _children(der: bytes) -> list[bytes]:
    """The DER elements inside the SEQUENCE ``der``, whole."""
    out, (_tag, pos, end) = [], rsa_keys._element(der, 0, len(der))
    while pos < end:
        _t, _start, stop = rsa_keys._element(der, pos, end)
        out.append(der[pos:stop])
        pos = stop
    return out


def test_a_version_1_certificate_without_the_version_field(key: rsa.RSAPrivateKey) -> None:
    """X.509 v1 has no [0] version and no extensions: the key is found all the same."""
    v3 = make_certificate("keys.example.org", key, NOW).public_bytes(serialization.Encoding.DER)
    tbs, alg, sig = _children(v3)
    fields = _children(tbs)
    assert fields[0][0] == 0xA0  # the version of a v3 certificate
    v1 = _tlv(0x30, _tlv(0x30, b"".join(fields[1:7])) + alg + sig)
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(v1)
    got = rsa_keys.load_certificate(pem + b"-----END CERTIFICATE-----\n")
    assert got.der == v1 and got.public_key.n == key.public_key().public_numbers().n


def test_signatures_get_the_verdict_cryptography_gives(key: rsa.RSAPrivateKey) -> None:
    pub = rsa_keys.load_public_key(spki_pem(key))
    rng = random.Random(7)
    message = b"1d2c3b4a" * 5
    good = key.sign(message, padding.PKCS1v15(), hashes.SHA1())
    candidates = [good, good[:-1], b"\x00" + good, good[1:] + b"\x00", bytes(len(good))]
    candidates += [(pub.n + 1).to_bytes(len(good) + 1, "big")[-len(good) :]]
    for _ in range(40):
        b = bytearray(good)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        candidates.append(bytes(b))
    # encoded messages made by hand (signed raw): bad block type, padding, a stray byte
    numbers = key.private_numbers()
    size, t = len(good), rsa_keys.SHA1_DIGEST_INFO + hashlib.sha1(message).digest()
    pad = size - 3 - len(t)
    for em in (
        b"\x00\x02" + b"\xff" * pad + b"\x00" + t,
        b"\x00\x01" + b"\xff" * (pad - 1) + b"\xfe\x00" + t,
        b"\x00\x01" + b"\xff" * (pad - 1) + b"\x00\x00" + t,
        b"\x00\x01" + b"\xff" * pad + b"\x00" + t[:-1] + bytes([t[-1] ^ 1]),
        b"\x00\x01" + b"\xff" * pad + b"\x00" + t,  # (the good one, made by hand)
    ):
        raw = pow(int.from_bytes(em, "big"), numbers.d, numbers.public_numbers.n)
        candidates.append(raw.to_bytes(size, "big"))
    other = rsa.generate_private_key(public_exponent=65537, key_size=key.key_size)
    candidates.append(other.sign(message, padding.PKCS1v15(), hashes.SHA1()))
    candidates.append(key.sign(message, padding.PKCS1v15(), hashes.SHA256()))
    for sig in candidates:
        for msg in (message, message + b"x"):
            try:
                key.public_key().verify(sig, msg, padding.PKCS1v15(), hashes.SHA1())
                want = True
            except InvalidSignature:
                want = False
            assert rsa_keys.verify_pkcs1_sha1(pub, sig, msg) is want, (sig.hex()[:16], msg)


def test_a_digest_info_without_its_null_parameters_is_refused(key: rsa.RSAPrivateKey) -> None:
    """The encoded message is compared whole, as OpenSSL 3 does: a DigestInfo spelt another
    way (no NULL) does not pass even though its digest is right."""
    numbers = key.private_numbers()
    n, size = numbers.public_numbers.n, (key.key_size + 7) // 8
    t = bytes.fromhex("301f300706052b0e03021a0414") + hashlib.sha1(b"m").digest()
    em = b"\x00\x01" + b"\xff" * (size - 3 - len(t)) + b"\x00" + t
    sig = pow(int.from_bytes(em, "big"), numbers.d, n).to_bytes(size, "big")
    assert not rsa_keys.verify_pkcs1_sha1(rsa_keys.load_public_key(spki_pem(key)), sig, b"m")


def test_the_whitelist_padding_is_what_rsa_public_decrypt_returns() -> None:
    em = b"\x00\x01" + b"\xff" * 8 + b"\x00" + b"payload"
    assert rsa_keys.pkcs1_type1_payload(em) == b"payload"
    for bad in (
        b"\x00\x02" + em[2:],
        b"\x00\x01" + b"\xff" * 7 + b"\x00p",
        em.replace(b"\xff", b"\xfe", 1),
    ):
        assert rsa_keys.pkcs1_type1_payload(bad) is None


def test_every_truncation_and_many_corruptions_are_a_format_error(key: rsa.RSAPrivateKey) -> None:
    cert = make_certificate("keys.example.org", key, NOW).public_bytes(serialization.Encoding.DER)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def armour(label: bytes, der: bytes) -> bytes:
        body = base64.encodebytes(der)
        return b"-----BEGIN " + label + b"-----\n" + body + b"-----END " + label + b"-----\n"

    for cut in range(len(cert)):
        with pytest.raises(FormatError, match="not a PEM X.509 certificate"):
            rsa_keys.load_certificate(armour(b"CERTIFICATE", cert[:cut]))
    for cut in range(len(spki)):
        with pytest.raises(FormatError, match="not a PEM public key"):
            rsa_keys.load_public_key(armour(b"PUBLIC KEY", spki[:cut]))
    rng = random.Random(11)
    for _ in range(300):
        b = bytearray(cert)
        b[rng.randrange(len(b))] = rng.randrange(256)
        try:  # whatever the byte: a certificate (a harmless change) or one clear error
            rsa_keys.load_certificate(armour(b"CERTIFICATE", bytes(b)))
        except FormatError as e:
            assert str(e) in ("not a PEM X.509 certificate", "public key is not RSA"), e
    for garbage in (
        b"",
        b"no pem here",
        b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
    ):
        with pytest.raises(FormatError):
            rsa_keys.load_certificate(garbage)
        with pytest.raises(FormatError):
            rsa_keys.load_public_key(garbage)


def test_other_kinds_of_key_are_named_as_such() -> None:
    k = ec.generate_private_key(ec.SECP256R1())
    pem = k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(WhitelistError, match=r"^/etc/cvmfs/keys/x.pub: not an RSA public key$"):
        load_public_key(pem, "/etc/cvmfs/keys/x.pub")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec.example.org")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
        .sign(k, hashes.SHA256())
    )
    with pytest.raises(FormatError, match="^certificate object: public key is not RSA$"):
        load_certificate(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(WhitelistError, match="^k: not a PEM public key$"):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "k")
