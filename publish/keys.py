"""Master key, repository key and certificate, in the ``/etc/cvmfs/keys`` file naming."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from cvmfs_format.errors import FormatError


@dataclass(frozen=True)
class KeySet:
    master_key: rsa.RSAPrivateKey
    repository_key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def master_public_pem(self) -> bytes:
        return self.master_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def make_certificate(fqrn: str, key: rsa.RSAPrivateKey, now: dt.datetime) -> x509.Certificate:
    """Self-signed, 365 days, CN like cvmfs_server's: only an envelope for the public key."""
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"{fqrn} CernVM-FS Release Managers")]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _load_private(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as e:
        raise FormatError(f"{path}: cannot load private key ({e})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise FormatError(f"{path}: not an RSA private key")
    return key


def load_or_create_keys(keys_dir: Path, fqrn: str, now: dt.datetime) -> tuple[KeySet, bool]:
    """Reuse ``<fqrn>.{masterkey,key,crt}`` from ``keys_dir``, generating what is absent."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    master_path = keys_dir / f"{fqrn}.masterkey"
    repo_path = keys_dir / f"{fqrn}.key"
    cert_path = keys_dir / f"{fqrn}.crt"
    pub_path = keys_dir / f"{fqrn}.pub"
    created = False
    if master_path.exists():
        master = _load_private(master_path)
    else:
        master = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_private(master_path, _private_pem(master))
        created = True
    if repo_path.exists() and cert_path.exists():
        repo_key = _load_private(repo_path)
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            raise FormatError(f"{cert_path}: not a PEM certificate") from None
    else:
        repo_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = make_certificate(fqrn, repo_key, now)
        repo_path.unlink(missing_ok=True)
        _write_private(repo_path, _private_pem(repo_key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        created = True
    keys = KeySet(master, repo_key, cert)
    if not pub_path.exists() or pub_path.read_bytes() != keys.master_public_pem:
        pub_path.write_bytes(keys.master_public_pem)
    return keys, created
