#!/usr/bin/env python3
"""The whole path on one machine: publish → Stratum-1 → preload → hep-proxy → hep-exec.

Run by ``./demo`` (after it installed the project into .venv). Everything it starts runs on
127.0.0.1 and is stopped at the end; its files go to demo-out/.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-out"
FQRN = "demo.example.org"
STRATUM1_PORT = 8000  # configs/demo.yaml names this port
BIN = Path(sys.executable).parent


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def done(t0: float) -> None:
    print(f"   ({time.perf_counter() - t0:.2f} s)", flush=True)


def shown(cmd: Sequence[str | Path], replace: dict[str, str] | None = None) -> str:
    """The command as you would type it in the clone (once .venv/bin is on PATH)."""
    words = []
    for c in cmd:
        w = str(c)
        if w.startswith(str(BIN) + "/"):
            w = w.removeprefix(str(BIN) + "/")
        elif w.startswith(str(ROOT) + "/"):
            w = w.removeprefix(str(ROOT) + "/")
        words.append((replace or {}).get(w) or shlex.quote(w))
    return " ".join(words)


def run(*cmd: str | Path, quiet: bool = False, replace: dict[str, str] | None = None) -> str:
    print(f"   $ {shown(cmd, replace)}", flush=True)
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, text=True, capture_output=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"demo: {Path(str(cmd[0])).name} failed with exit {result.returncode}")
    if not quiet:
        print("   " + result.stdout.rstrip().replace("\n", "\n   "), flush=True)
    return result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def serve(store: Path, port: int, log: Path) -> Iterator[str]:
    """hep-proxy serving ``store`` on 127.0.0.1:port until the block ends."""
    cmd: list[str | Path] = [BIN / "hep-proxy", "serve", "--store", store]
    cmd += ["--listen", f"127.0.0.1:{port}"]
    cmd += ["--workers", "1", "--access-log", log]
    print(f"   $ {shown(cmd)} &", flush=True)
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            if proc.poll() is not None:
                err = proc.stderr.read().strip() if proc.stderr else ""
                raise SystemExit(f"demo: hep-proxy on port {port} exited: {err}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/healthz", timeout=1).read()
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"demo: hep-proxy on port {port} did not come up")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    if port_in_use(STRATUM1_PORT):
        print(
            f"demo: 127.0.0.1:{STRATUM1_PORT} is in use (configs/demo.yaml serves the demo "
            "Stratum-1 there); stop whatever listens on it and run ./demo again",
            file=sys.stderr,
        )
        return 2
    t_all = time.perf_counter()
    for sub in ("src", "stratum1", "preload-store", "logs"):
        shutil.rmtree(OUT / sub, ignore_errors=True)
    (OUT / "logs").mkdir(parents=True)

    t0 = step("1. publish the sample software tree as a signed repository (hep-publish)")
    src = OUT / "src"
    shutil.copytree(ROOT / "publish" / "sample_tree", src, symlinks=True)
    if shutil.which("cc"):
        run("cc", "-O2", "-o", src / "bin" / "hello", src / "share" / "hello.c", quiet=True)
    keys = OUT / "keys"
    run(BIN / "hep-publish", src, "--name", FQRN, "--store", OUT / "stratum1", "--keys", keys)
    done(t0)

    t0 = step(f"2. a Stratum-1 on 127.0.0.1:{STRATUM1_PORT} (hep-proxy serving the repository)")
    with serve(OUT / "stratum1", STRATUM1_PORT, OUT / "logs" / "stratum1.log"):
        done(t0)
        t0 = step("3. preload --spec configs/demo.yaml (login node: verify, select, fetch)")
        run(BIN / "preload", "--spec", "configs/demo.yaml", "--no-progress")
        done(t0)

    proxy_port = free_port()
    t0 = step(
        f"4. the site proxy on 127.0.0.1:{proxy_port} (hep-proxy serving the preloaded store; "
        "the Stratum-1 is gone)"
    )
    with serve(OUT / "preload-store", proxy_port, OUT / "logs" / "site-proxy.log") as proxy:
        done(t0)
        job = (ROOT / "scripts" / "demo-job.sh").read_text()
        t0 = step(f"5. hep-exec -- bash: a job on a worker node sees /cvmfs/{FQRN}")
        run(
            BIN / "hep-exec",
            "--server",
            proxy,
            "--keys",
            OUT / "keys" / f"{FQRN}.pub",
            "--ram",
            "256M",
            "--no-shared-cache",
            "--",
            "bash",
            "-c",
            job,
            replace={job: '"$(cat scripts/demo-job.sh)"'},
        )
        done(t0)

    print(
        f"\ndemo finished in {time.perf_counter() - t_all:.1f} s; everything it started is "
        f"stopped. Files and logs: {OUT.relative_to(ROOT)}/\n"
        "To run the commands above yourself (from this directory), put them on PATH:\n"
        f'    export PATH="{BIN}:$PATH"'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
