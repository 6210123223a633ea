"""The master keys a job verifies repositories with: read and checked at start, parsed on
first use (cvmfs_format.rsa_keys), which a job that never mounts a repository never needs.

Apart from the configuration (worker.config), which only names the key files.
"""

from __future__ import annotations

import binascii
import hashlib
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, overload

from cvmfs_format.errors import FormatError
from worker.config import ConfigError

if TYPE_CHECKING:
    from cvmfs_format.rsa_keys import RsaPublicKey


class MasterKeys(Sequence["RsaPublicKey"]):
    """Master public keys read at start, parsed on first use; the files are read and their
    PEM armour and base64 checked at start, so a missing, unreadable or garbled key still
    stops hep-exec before the command runs.
    """

    def __init__(self, pems: Sequence[tuple[str, bytes]]) -> None:
        self._pems = list(pems)
        self._keys: list[RsaPublicKey] | None = None
        self._lock = threading.Lock()

    def digest(self) -> str:
        """The keys' identity without parsing them (worker.repo.repository: a node's jobs vouch
        for what they verified with the same keys)."""
        h = hashlib.sha256()
        for pem in sorted(pem for _what, pem in self._pems):
            h.update(hashlib.sha256(pem).digest())
        return h.hexdigest()

    def _parsed(self) -> list[RsaPublicKey]:
        with self._lock:
            if self._keys is None:
                from cvmfs_format.whitelist import load_public_key

                try:
                    self._keys = [load_public_key(pem, what) for what, pem in self._pems]
                except FormatError as e:
                    raise ConfigError(str(e)) from None
            return self._keys

    def __len__(self) -> int:
        return len(self._pems)

    @overload
    def __getitem__(self, i: int) -> RsaPublicKey: ...
    @overload
    def __getitem__(self, i: slice) -> list[RsaPublicKey]: ...
    def __getitem__(self, i: int | slice) -> RsaPublicKey | list[RsaPublicKey]:
        return self._parsed()[i]

    def __iter__(self) -> Iterator[RsaPublicKey]:
        return iter(self._parsed())


_PEM = re.compile(
    rb"-----BEGIN (RSA )?PUBLIC KEY-----\s*([A-Za-z0-9+/=\s]+?)-----END (RSA )?PUBLIC KEY-----"
)


def _check_pem(pem: bytes, what: Path) -> None:
    m = _PEM.search(pem)
    try:
        ok = m is not None and len(binascii.a2b_base64(b"".join(m.group(2).split()))) > 64
    except binascii.Error:
        ok = False
    if not ok:
        raise ConfigError(f"{what}: not a PEM public key")


def load_master_keys(paths: Sequence[Path]) -> MasterKeys:
    """Master keys from files or directories of ``*.pub``; ConfigError names a bad one."""
    pems: list[tuple[str, bytes]] = []
    for path in paths:
        if path.is_dir():
            files = sorted(path.glob("*.pub"))
            if not files:
                raise ConfigError(f"{path}: no *.pub master key in this directory")
        elif path.exists():
            files = [path]
        else:
            raise ConfigError(f"{path}: no such key file or directory")
        for f in files:
            try:
                pem = f.read_bytes()
            except OSError as e:
                raise ConfigError(f"{f}: cannot read ({e.strerror})") from None
            _check_pem(pem, f)
            pems.append((str(f), pem))
    return MasterKeys(pems)
