"""The node's cache service: one process per user and node that fetches and holds each object
once for all of that user's jobs, and shares what earlier jobs learnt of the name space.

``cache_service`` (the process), ``cache_client`` (a job's side), ``cache_protocol`` (their
messages, sans I/O), ``rendezvous`` (the private directory, socket and lock where they meet),
``prefetch`` (fetching what an access list names while the command starts).

May import worker.repo, worker.ram and worker.trace, and read the settings.
"""
