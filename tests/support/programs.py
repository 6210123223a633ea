"""The programs tree: real programs, scripts, a Python package, headers and a library that
run from ``/cvmfs/test.repo`` (shebangs and C sources name that path), plus the small
file/link/variant corner the process tests use (``dir/file``, ``link``, ``up``, ``variant``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.tracing import MOUNT, compile_c

TOOL = r"""
#include <stdio.h>
int main(int argc, char **argv) {
    FILE *f = fopen("/cvmfs/test.repo/etc/conf", "r");
    char line[64] = "";
    if (!f || !fgets(line, sizeof line, f)) { perror("conf"); return 1; }
    printf("tool %s %s", argc > 1 ? argv[1] : "-", line);
    return 0;
}
"""

SELF_EXE = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    char b[512], p[64];
    ssize_t n = readlink("/proc/self/exe", b, sizeof b);
    printf("%.*s\n", (int)n, b);
    snprintf(p, sizeof p, "/proc/%d/exe", (int)getpid());
    n = readlink(p, b, sizeof b);
    printf("%.*s\n", (int)n, b);
    return 0;
}
"""

THREADS = r"""
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static int failures;
static void *worker(void *arg) {
    long i = (long)arg;
    char path[128], want[4096], got[4096];
    snprintf(path, sizeof path, "/cvmfs/test.repo/files/f%ld", i);
    memset(want, 'a' + (int)i, sizeof want);
    for (int k = 0; k < 300; k++) {
        int fd = open(path, O_RDONLY);
        if (fd < 0 || read(fd, got, sizeof got) != sizeof got || memcmp(got, want, sizeof got)) {
            __sync_fetch_and_add(&failures, 1);
        }
        if (fd >= 0) close(fd);
    }
    return NULL;
}
int main(void) {
    pthread_t t[8];
    for (long i = 0; i < 8; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
    printf("threads done failures=%d\n", failures);
    return failures != 0;
}
"""

SPAWN = r"""
#include <spawn.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
extern char **environ;
int main(void) {
    char *argv[] = {"tool", "spawned", NULL};
    pid_t pid; int st;
    setvbuf(stdout, NULL, _IONBF, 0);
    if (posix_spawn(&pid, "/cvmfs/test.repo/bin/tool", NULL, NULL, argv, environ)) return 1;
    waitpid(pid, &st, 0);
    printf("posix_spawn status=%d\n", WEXITSTATUS(st));
    char *argv2[] = {"tool", "vforked", NULL};
    pid = vfork();
    if (pid == 0) { execve("/cvmfs/test.repo/bin/tool", argv2, environ); _exit(127); }
    waitpid(pid, &st, 0);
    printf("vfork status=%d\n", WEXITSTATUS(st));
    return 0;
}
"""


def make_programs_tree(root: Path, build: Path) -> Path:
    """The tree at ``root`` (compiled objects that are not part of it go to ``build``)."""
    for d in ("bin", "lib", "etc", "py/pkg/sub", "include", "src", "files", "mk/src", "dir"):
        (root / d).mkdir(parents=True)
    build.mkdir(parents=True, exist_ok=True)
    (root / "etc/conf").write_text("conf-line\n")
    compile_c(TOOL, root / "bin/tool")
    compile_c(SELF_EXE, root / "bin/self-exe")
    compile_c(THREADS, build / "threads", "-pthread")
    compile_c(SPAWN, build / "spawn")
    for i in range(8):
        (root / f"files/f{i}").write_bytes(bytes([ord("a") + i]) * 4096)
    (root / "bin/main.sh").write_text(
        '#!/bin/bash\nhere=$(dirname "$0")\n. "$here/../lib/a.sh"\nsource "$here/../lib/b.sh"\n'
        '"$here/tool" fromsh\ncd "$here/../lib" && . ./c.sh\necho "A=$A B=$B C=$C pwd=$(pwd)"\n'
    )
    (root / "lib/a.sh").write_text("A=1\n")
    (root / "lib/b.sh").write_text('B=2\n. "$(dirname "${BASH_SOURCE[0]}")/a.sh"\n')
    (root / "lib/c.sh").write_text("C=3\n")
    (root / "py/pkg/__init__.py").write_text("from .sub import mod\nVALUE = mod.value()\n")
    (root / "py/pkg/sub/__init__.py").write_text("")
    (root / "py/pkg/sub/mod.py").write_text(
        "import os\ndef value():\n"
        "    with open(os.path.join(os.path.dirname(__file__), 'data.txt')) as f:\n"
        "        return f.read().strip()\n"
    )
    (root / "py/pkg/sub/data.txt").write_text("forty-two\n")
    (root / "include/mylib.h").write_text("int mylib_answer(void);\n")
    compile_c("int mylib_answer(void) { return 42; }\n", build / "mylib_o", "-c", "-fPIC")
    subprocess.run(
        ["gcc", "-shared", "-o", str(root / "lib/libmylib.so"), str(build / "mylib_o")],
        check=True,
    )
    (root / "src/main.c").write_text(
        '#include <stdio.h>\n#include <mylib.h>\nint main(void) { printf("answer %d\\n", '
        "mylib_answer()); return 0; }\n"
    )
    busybox = shutil.which("busybox")
    if busybox:
        shutil.copy(busybox, root / "bin/busybox")
        (root / "bin/bb-script").write_text(f'#!{MOUNT}/bin/busybox sh\necho "bb $0 $1"\n')
    (root / "bin/interp.sh").write_text('#!/bin/sh\necho "interp $*"\n')
    (root / "bin/nested").write_text(f"#!{MOUNT}/bin/interp.sh -x\nnot shell\n")
    for i in range(8):
        (root / f"mk/src/u{i}.c").write_text(f"int u{i}(void) {{ return {i}; }}\n")
    (root / "mk/Makefile").write_text(
        "SRC := $(dir $(lastword $(MAKEFILE_LIST)))src\n"
        "OBJS := $(patsubst $(SRC)/%.c,%.o,$(wildcard $(SRC)/*.c))\n"
        "all: libu.a\nlibu.a: $(OBJS)\n\tar rcs $@ $^\n%.o: $(SRC)/%.c\n\t$(CC) -c -o $@ $<\n"
    )
    for p in (root / "bin").iterdir():
        p.chmod(0o755)
    shutil.copy(build / "threads", root / "bin/threads")
    shutil.copy(build / "spawn", root / "bin/spawn")
    # the process tests' corner: a file, a symlink to it, a link out, a variant symlink
    (root / "dir/file").write_text("content\n")
    (root / "dir/other").write_text("other\n")
    (root / "link").symlink_to("dir/file")
    (root / "up").symlink_to("../../../../../../../../etc")
    (root / "variant").symlink_to("dir/$(HEP_VARIANT:-file)")
    return root
