"""One CernVM-FS download client for preload, hep-proxy's upstream fill and hep-exec.

``core`` decides what the CernVM-FS download manager decides, with no I/O: which server and
which forward proxy to try next (server fail-over, proxy groups ``a|b;c`` with load-balancing
and DIRECT), when a host or a proxy counts as failed and for how long, the no-cache retry of a
corrupt answer, back-off with jitter, and how big and how slow an answer may be.  ``h1`` is the
transport (HTTP/1.1 on raw asyncio for ``http://``; ``http``'s aiohttp one inside it for
``https://``, or alone with ``CVMFS_DOWNLOAD_TRANSPORT=aiohttp``), ``wire`` what they share,
``heap`` keeps the process's big buffers reused, and ``client`` puts it together: bounded,
verified downloads with one vocabulary of errors (``errors``), each one line naming the URL
and what failed.

May import :mod:`cvmfs_format` (hashes, proxy lists); never the tools that use it.
"""
