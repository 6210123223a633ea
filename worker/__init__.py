"""hep-exec: /cvmfs for any program, from a RAM cache filled through hep-proxy.

Data side (pure Python): configuration, fetcher, RAM cache of read-only RAM files, mounted
repositories and the path semantics of the /cvmfs name space. The ptrace tracer calls into
these through its policy object.
"""
