"""The tracer: runs a command so that it sees /cvmfs, knowing nothing of CernVM-FS.

C (README.md and trap/README.md here): ``_trap``, the ptrace + seccomp trap loop and the
in-process open/stat handler mapped into tracees; ``_tmpfs``, a private tmpfs mounted in a user
namespace (the shadow tree here, RAM files in worker.ram). Python: ``tracer`` (run, the shadow
tree, statistics), ``answers`` (a miss: walk the path through the policy, return an action),
``policy`` (the contract with whatever knows the name space; ``hostpolicy`` serves host
directories), ``node_answers`` (the answer tables a node's jobs share), ``tracee_env``.

Imports nothing from the other rooms of worker, nor its settings.
"""
