"""The project's own exceptions for bad repository data.

Callers print ``str(exc)`` as a one-line message, so every message names what was being read
and what is wrong with it; raw sqlite3/zlib/cryptography errors never escape this package.
"""


class FormatError(Exception):
    """Data that does not follow the CVMFS format (malformed, truncated, unsupported)."""


class IntegrityError(FormatError):
    """Data whose content hash does not match the hash it is named by."""


class SignatureError(FormatError):
    """A manifest whose hash line or signature does not verify."""


class WhitelistError(FormatError):
    """A whitelist that is malformed, badly signed, expired, or does not list a certificate."""


class CatalogError(FormatError):
    """A file catalog that cannot be opened or lacks what its schema revision requires."""
