"""``hep-exec [options] -- CMD ARGS…``: run CMD with /cvmfs served from a RAM cache."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (imported by main, with the collector paused: see _started)
    from worker.config import ExecConfig

_job_ran = False  # a command ran (entry exits fast after one)


def _started() -> None:
    """The start is over: collect garbage again from here, but never walk what the start made.

    The start (imports, config, session) makes ~40,000 objects, nearly all kept for the whole
    job, and little garbage; with the cyclic collector on, it ran ~40 times over them (~3 ms
    of ``hep-exec -- true``, paired).  :func:`main` pauses it; here the start's objects are
    moved out of its reach for good (``gc.freeze``), so the collections a long job's upcalls
    cause walk only what the job made since."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _check(config: ExecConfig) -> int:
    """``--check``: tracing, proxies, repositories, RAM limit; exit 0 only if all are fine."""
    _started()
    from worker.session import WorkerSession
    from worker.trace.tracer import check_mode

    problem, mode = check_mode(config.trap, config.in_process)
    ok = problem is None
    how = f"a traced test command ran (trap mode: {mode})"
    print(f"{'ok  ' if ok else 'FAIL'} ptrace + seccomp: {problem or how}")
    from worker.sites import describe_sources

    for option, value, where in describe_sources(config):
        print(f"ok   setting {option} = {value}  [{where}]")
    with WorkerSession(config) as session:
        for line in session.check():
            print(line)
            ok = ok and line.ok
    return 0 if ok else 1


def _reach(config: ExecConfig) -> None:
    """Exit 2 at start (ConfigError) if no server or proxy of the job accepts a connection."""
    from worker.config import ConfigError
    from worker.reach import unreachable

    servers = config.servers
    proxies = config.proxies
    if not servers and config.repositories:  # servers given per domain by the site
        from cvmfs_format.errors import FormatError
        from worker.sites import routes_for

        try:
            routes = [routes_for(config, name) for name in config.repositories]
        except FormatError as e:
            raise ConfigError(str(e)) from None
        servers = tuple(g for r in routes for g in r.servers)
        proxies = routes[0].proxies or proxies
    problem = unreachable(servers, proxies, min(config.connect_timeout, 5.0))
    if problem is not None:
        raise ConfigError(problem)


def _named(config: ExecConfig) -> tuple[str, ...]:
    """The repositories the command names (its arguments, environment, working directory)."""
    from worker.repo.named import named_repositories

    env = (os.fsencode(v) for v in os.environ.values())
    try:
        cwd = [os.getcwdb()]
    except OSError:  # removed under us: the command will say so
        cwd = []
    texts = [*(os.fsencode(a) for a in config.command), *env, *cwd]
    return named_repositories(config.mount.encode(), texts, config.repositories)


def _inside_another_job(config: ExecConfig) -> int | None:
    """Inside another hep-exec job (worker/nested.py), the command runs as it is (exec: no
    return) or the reason it cannot is said (an exit status); None: trace it here."""
    from worker.nested import MARKER, our_tracer_tgid, outer_job, run_inside

    if MARKER not in os.environ:  # (no /proc read at a plain job's start)
        return None
    outer = outer_job(os.environ, our_tracer_tgid())
    if outer is None:
        return None
    options = {
        "--record": config.record_path,
        "--prefetch": config.prefetch_path,
        "--stats": config.stats or config.stats_internals,
    }
    unused = [name for name, value in options.items() if value]
    if unused:
        print(
            f"hep-exec: inside hep-exec job {outer.pid}, whose /cvmfs this command uses: "
            f"{', '.join(unused)} of this hep-exec do not apply",
            file=sys.stderr,
        )
    return run_inside(outer, config.mount, _named(config), config.command)


def _run(config: ExecConfig) -> int:
    from worker.catalog_policy import CatalogPolicy
    from worker.session import WorkerSession
    from worker.trace.tracer import TracerUnavailable, run

    with WorkerSession(config) as session:  # reads the keys: a bad one is said first
        named = _named(config)
        session.ask_ahead(named)
        _reach(config)
        policy = CatalogPolicy(session)
        _started()
        from worker.nested import MARKER, marker_value

        os.environ[MARKER] = marker_value(os.getpid(), config.mount)  # the command's, and theirs
        try:
            result = run(
                list(config.command),
                policy,
                mount=config.mount.encode(),
                trap=config.trap,
                in_process=config.in_process,
                io_uring=config.io_uring,
                node_answers=session.node_answers,
                table_fd=session.take_table(),
                alongside=(lambda: session.mount_ahead(named)) if named else None,
                dispose=session.dispose,
                object_dirs=session.object_dirs(),
            )
        except TracerUnavailable as e:
            print(f"hep-exec: {e}", file=sys.stderr)
            return 2
        finally:
            policy.close()
        global _job_ran
        _job_ran = True
        if config.stats or config.stats_internals:
            for line in session.stats_lines(config.stats_internals):
                print(f"hep-exec: {line}", file=sys.stderr)
            print(f"hep-exec: {result.stats.summary()}", file=sys.stderr)
        if config.stats_internals:
            print(f"hep-exec: open files: {policy.unpinned} objects unpinned", file=sys.stderr)
            for line in result.stats.format().splitlines():
                print(f"hep-exec: {line}", file=sys.stderr)
    return result.status


def main(argv: Sequence[str] | None = None) -> int:
    collecting = gc.isenabled()
    gc.disable()  # until the start is over (_started)
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        if collecting:
            gc.enable()  # (if the start ended early: a usage error, --version)


def _main(args: list[str]) -> int:
    import logging

    from worker.config import ConfigError, parse_exec_args

    try:
        config = parse_exec_args(args)
    except ConfigError as e:
        print(f"hep-exec: {e}", file=sys.stderr)
        return 2
    if config.cache_daemon:
        from worker.node import cache_service

        _started()
        return cache_service.main(args)
    logging.basicConfig(level=config.log_level_number, format="hep-exec: %(message)s")
    for line in config.warnings:
        logging.getLogger("hep_exec").warning("%s", line)
    try:
        if not config.check and (inside := _inside_another_job(config)) is not None:
            return inside
        return _check(config) if config.check else _run(config)
    except ConfigError as e:
        print(f"hep-exec: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """The ``hep-exec`` command: :func:`main`, then, after a job, exit without tearing the
    interpreter down.  Everything a job owes is done by then (the command has exited, the
    node's service has its answers, the shadow tree is gone); collecting and freeing the
    objects of a job that held a repository's catalogs and answers took ~20 ms of its wall
    time.  (Any other exit, such as ``--version`` or a usage error, is the usual one.)"""
    code = main()
    if not _job_ran:
        sys.exit(code)
    import logging  # (imported by main already)

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or its reader went away
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
