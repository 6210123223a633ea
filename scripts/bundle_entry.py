"""The one program of the worker bundle (scripts/bundle): hep-exec, preload, hep-proxy and
hep-publish in one PyInstaller executable, picked by the name it was started as.

One executable (the others are symlinks to it) keeps the bundle one interpreter and one set of
libraries. ``PROGRAM -m MODULE ARGS`` runs one of :data:`MODULES` as ``python -m`` would: a
frozen program has no interpreter to give ``-m`` to, and hep-exec starts its node cache
service as ``[sys.executable, "-m", "worker.node.cache_service", …]`` (worker.node.cache_client).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

TOOLS = ("hep-exec", "preload", "hep-proxy", "hep-publish")
# what ``-m`` may name: the modules the code itself starts with sys.executable
MODULES = ("worker.node.cache_service",)


def _clean_environment() -> None:
    """Give children (jobs under hep-exec, the cache service) the environment the caller
    gave us: the bootloader's private variables (_PYI_*) would make another start of a frozen
    program take itself for a stage of ours, and a library path it pointed at the bundle
    would make jobs load our libraries."""
    for key in [k for k in os.environ if k.startswith("_PYI_")]:
        del os.environ[key]
    orig = os.environ.pop("LD_LIBRARY_PATH_ORIG", None)
    if orig is not None:
        os.environ["LD_LIBRARY_PATH"] = orig
    else:
        ours = getattr(sys, "_MEIPASS", None)
        paths = os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
        if ours and ours in paths:
            kept = [p for p in paths if p and p != ours]
            if kept:
                os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(kept)
            else:
                del os.environ["LD_LIBRARY_PATH"]


def _tool(name: str) -> Callable[[], int]:
    """The main function of a tool, imported only when it is the one asked for."""
    if name == "hep-exec":
        from worker.cli import main as exec_main

        return exec_main
    if name == "preload":
        from preload.cli import main as preload_main

        return preload_main
    if name == "hep-proxy":
        from proxy.cli import main as proxy_main

        return proxy_main
    from publish.cli import main as publish_main

    return publish_main


def _module(name: str) -> Callable[[], int]:
    """The main function of one of :data:`MODULES`."""
    from worker.node.cache_service import main as service_main

    return service_main


def main() -> int:
    """Run the tool named by argv[0] (or by argv[1], or ``-m MODULE``) with the rest."""
    _clean_environment()
    argv = sys.argv
    name = os.path.basename(argv[0])
    if len(argv) > 2 and argv[1] == "-m" and argv[2] in MODULES:
        sys.argv = [argv[2], *argv[3:]]
        return _module(argv[2])()
    if name not in TOOLS and len(argv) > 1 and argv[1] in TOOLS:
        name, sys.argv = argv[1], argv[1:]
    if name not in TOOLS:
        print(f"usage: {' | '.join(TOOLS)} ARGS… (or symlinks of those names)", file=sys.stderr)
        return 2
    sys.argv[0] = name  # argparse's prog
    return _tool(name)()


if __name__ == "__main__":
    sys.exit(main())
