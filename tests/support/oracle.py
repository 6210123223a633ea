"""The oracle: tools print the same on /cvmfs (through the tracer) as on the source directory.

:data:`SCRIPT` runs find, ls -laR, stat, sha256sum, du, tar, cp -a and :data:`WALKER` (a C
program: openat, fstatat, getdents64 with a rewind, readlinkat, mmap, fstat/statx of the open
fd, fchdir+getcwd) in a directory; :func:`compare` says, section by section, where the two
outputs differ once inode numbers, times and block counts are normalised.
"""

from __future__ import annotations

import re

WALKER = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>
struct d64 { uint64_t ino; int64_t off; unsigned short reclen; unsigned char type; char name[]; };
/* fstat and statx of an open fd say what stat of its path said (cp and install check) */
static int same(int fd, const struct stat *st) {
    struct stat fs; struct statx x;
    if (fstat(fd, &fs) || statx(fd, "", AT_EMPTY_PATH, STATX_BASIC_STATS, &x)) return 0;
    return fs.st_ino == st->st_ino && fs.st_dev == st->st_dev && fs.st_mode == st->st_mode &&
           fs.st_nlink == st->st_nlink && fs.st_uid == st->st_uid && fs.st_size == st->st_size &&
           fs.st_mtim.tv_sec == st->st_mtim.tv_sec && fs.st_mtim.tv_nsec == st->st_mtim.tv_nsec &&
           x.stx_ino == st->st_ino && x.stx_mode == st->st_mode && x.stx_nlink == st->st_nlink &&
           x.stx_mtime.tv_sec == st->st_mtim.tv_sec &&
           makedev(x.stx_dev_major, x.stx_dev_minor) == st->st_dev;
}
static int cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}
static int list(int dfd, char **names) {
    char buf[512]; int n = 0; long r;
    while ((r = syscall(SYS_getdents64, dfd, buf, sizeof buf)) > 0)
        for (long o = 0; o < r;) {
            struct d64 *d = (struct d64 *)(buf + o); o += d->reclen;
            if (!strcmp(d->name, ".") || !strcmp(d->name, "..")) continue;
            names[n] = malloc(strlen(d->name) + 2);
            names[n][0] = '0' + d->type; strcpy(names[n] + 1, d->name); n++;
        }
    if (r < 0) { perror("getdents64"); exit(1); }
    return n;
}
static void walk(int dfd, const char *rel) {
    char *names[4096]; int n = list(dfd, names);
    lseek(dfd, 0, SEEK_SET);
    char *again[4096]; int m = list(dfd, again);
    if (m != n) { printf("rewind mismatch %d %d\n", n, m); }
    qsort(names, n, sizeof *names, cmp);
    for (int i = 0; i < n; i++) {
        const char *name = names[i] + 1; int type = names[i][0] - '0';
        struct stat st;
        if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW)) { perror(name); exit(1); }
        printf("%s/%s type=%d mode=%o size=%lld nlink=%ld", rel, name, type, st.st_mode,
               (long long)(S_ISDIR(st.st_mode) ? 0 : st.st_size), (long)st.st_nlink);
        if (type == 10) {
            char t[4096]; ssize_t k = readlinkat(dfd, name, t, sizeof t);
            printf(" -> %.*s", (int)k, t);
        } else if (type == 8) {
            int fd = openat(dfd, name, O_RDONLY);
            if (fd < 0) { printf(" open failed\n"); continue; }
            struct stat fs; fstat(fd, &fs);
            uint64_t h = 1469598103934665603ULL;
            if (fs.st_size > 0) {
                unsigned char *p = mmap(NULL, fs.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
                if (p == MAP_FAILED) { perror("mmap"); exit(1); }
                for (off_t j = 0; j < fs.st_size; j++) { h ^= p[j]; h *= 1099511628211ULL; }
                munmap(p, fs.st_size);
            }
            printf(" fsize=%lld hash=%016llx same=%d", (long long)fs.st_size, (unsigned long long)h,
                   same(fd, &st));
            close(fd);
        } else if (type == 4) {
            int sub = openat(dfd, name, O_RDONLY | O_DIRECTORY);
            struct stat ds; fstat(sub, &ds);
            printf(" isdir=%d same=%d\n", S_ISDIR(ds.st_mode), same(sub, &st));
            char r2[4096]; snprintf(r2, sizeof r2, "%s/%s", rel, name);
            walk(sub, r2);
            close(sub);
            continue;
        }
        printf("\n");
    }
    char cwd[4096];
    if (fchdir(dfd) || !getcwd(cwd, sizeof cwd)) { perror("fchdir/getcwd"); exit(1); }
    printf("cwd %s\n", cwd);
}
int main(int argc, char **argv) {
    int dfd = open(argv[1], O_RDONLY | O_DIRECTORY);
    if (dfd < 0) { perror(argv[1]); return 1; }
    walk(dfd, ".");
    return 0;
}
"""

SCRIPT = r"""
set -e
cd "$1"
echo "== find"; find top -printf '%p %y %s %m %l %n\n' | LC_ALL=C sort
echo "== ls"; ls -laR --time-style=+T top
echo "== stat"; find top | LC_ALL=C sort | xargs -d '\n' stat
echo "== sha256"; find top -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
echo "== du"; du -sb top; du -abl top | LC_ALL=C sort -k2
echo "== tar"; tar c top | tar t | LC_ALL=C sort
echo "== walker"; "$2" top
echo "== cp"; d=$(mktemp -d); cp -a top "$d/top"; cd "$d"
find top -printf '%p %y %s %m %l %n\n' | LC_ALL=C sort
find top ! -type l -print0 | LC_ALL=C sort -z | xargs -0 stat -c '%n %Y'
cd /; rm -rf "$d"
"""


def sections(text: str) -> dict[str, str]:
    """:data:`SCRIPT`'s output split at its ``== NAME`` lines: {NAME: what followed}."""
    out: dict[str, str] = {}
    for part in text.split("== ")[1:]:
        head, _, body = part.partition("\n")
        out[head] = body
    return out


def normalise(text: str) -> str:
    """Devices and inode numbers (the shadow tree's private tmpfs and the catalog's inodes vs
    the source's), times (the tracer shows the catalog's mtime for all three), block counts
    (tmpfs allocation vs size-derived) and ``ls``'s ``total`` lines (sums of blocks) written
    as placeholders."""
    text = re.sub(r"Device: *\S+[ \t]*", "Device: D ", text)
    text = re.sub(r"Inode: *\d+[ \t]*", "Inode: N ", text)
    text = re.sub(r"Blocks: *\d+[ \t]*", "Blocks: N ", text)
    text = re.sub(r"(?m)^(Access|Modify|Change|Birth): [-0-9].*$", r"\1: T", text)
    text = re.sub(r"(?m)^ Birth: .*$", "", text)
    text = re.sub(r"(?m)^total \d+$", "total N", text)
    return text


SECTIONS = ["find", "ls", "stat", "sha256", "du", "tar", "walker", "cp"]


def compare(want: str, got: str, source: str, mount: str) -> tuple[dict[str, str], dict[str, str]]:
    """The normalised sections of the run on ``source`` (its path written as ``mount``) and
    of the run on ``mount``."""
    return sections(normalise(want.replace(source, mount))), sections(normalise(got))
