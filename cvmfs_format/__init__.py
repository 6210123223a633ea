"""CernVM-FS wire and disk formats: bytes in, values out, no network I/O.

Every tool of the project (publisher, preload, proxy, worker) reads and writes repositories
through this package, so a format rule lives in exactly one place.
"""

from cvmfs_format.errors import (
    CatalogError,
    FormatError,
    IntegrityError,
    SignatureError,
    WhitelistError,
)

__all__ = ["CatalogError", "FormatError", "IntegrityError", "SignatureError", "WhitelistError"]
