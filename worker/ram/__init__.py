"""RAM files and the RAM cache: where a job's (or a node's) objects live, read-only.

``ramfiles``: sealed memfds or files of a private huge-page tmpfs, written once and handed out
read-only; ``ramcache``: an LRU by bytes over them, with pins and single-flight loads.

May import worker.trace (its tmpfs helper); nothing else of worker.
"""
