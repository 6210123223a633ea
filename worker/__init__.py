"""hep-exec: /cvmfs for any program, from a RAM cache filled through hep-proxy.

The package is laid out in rooms; each may import the rooms above it in this list, never one
below it (checked by tests/worker/test_layout.py):

- ``worker.trace``: the tracer. The C trap loop and the in-process handler (``_trap``), the
  private tmpfs helper (``_tmpfs``), and their Python side: the policy contract, the answers to
  the trap loop's misses, the answer tables a node's jobs share. Knows nothing of CernVM-FS.
- ``worker.ram``: the RAM files objects are kept in, and the RAM cache over them (LRU by bytes,
  pins, single-flight loads).
- ``worker.repo``: a repository mounted from the proxy: the fetcher (``cvmfs_download``),
  verified manifest and catalogs, objects written into RAM files, the /cvmfs name space, the
  master keys.
- ``worker.node``: the node's cache service shared by a user's jobs, its client and protocol,
  where they meet (``rendezvous``), prefetch from access lists.
- here, at the top: ``cli`` (``hep-exec``), ``config`` (flags, environment and file into one
  frozen ``ExecConfig``) and ``sites`` (the site's CernVM-FS client configuration), which
  every room may read as settings; ``session`` (the data side of one run) and
  ``catalog_policy`` (the tracer's policy over it) join the rooms; ``reach`` checks at start
  that some server answers.
"""
