"""A CernVM-FS repository mounted from the proxy, as a job (or the node's service) sees it.

``fetcher``: the one download client (cvmfs_download) on an event-loop thread of its own;
``repository``: verified manifest, whitelist and catalogs, objects inflated into RAM files;
``repository_files``: a repository's own files for a node's jobs; ``namespace``: path
resolution and stat answers of the /cvmfs name space, sans I/O; ``keys``: master keys.

May import worker.ram and worker.trace, and read the settings (worker.config, worker.sites).
"""
