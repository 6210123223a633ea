"""hep-publish: turn a directory tree into a genuine signed CVMFS repository."""
