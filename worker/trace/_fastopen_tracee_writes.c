/*
 * The in-process handler's writes on host paths (worker/trace/_fastopen_tracee.c, which
 * #includes this in its one translation unit): opens with O_CREAT, O_TRUNC, O_WRONLY or
 * O_RDWR (and O_NOFOLLOW, O_PATH), mkdir, unlink, rename, chmod, utimensat, fchmod ... of
 * what is not under the mount, and execve of host programs, made here where the tracer would
 * let them through.  Why: tar x,
 * cp -r out of /cvmfs, a compiler's output, pip: every file written stopped the program four
 * to six times (tar xf of numpy, taken out of /cvmfs: 8.6x its native time).
 *
 * The tracer's rule (worker/trace/trap/seccomp_stop.c, C_WRITE): a write whose path is under
 * the mount or the shadow tree, or reaches the mount through a host symlink, or whose fd is a
 * RAM file or a shadow directory, fails with EROFS; any other is the kernel's.  Here, only
 * while the mount does not exist on the host (hdr->host_writes, from the start), so no host
 * path can reach it: a path through a host symlink into the mount fails in the kernel
 * (ENOENT) and goes to the tracer; a call that names the mount's own last component (which
 * could create it) is the tracer's.  A failure such a link could explain is asked of the
 * tracer again (a call that failed changed nothing); any other is the tracer's answer too
 * (made_here).
 */

/* A write call's arguments: up to two (dirfd, path) pairs, as the tracer reads them;
 * -1: none (AT_FDCWD for a dirfd).  A pair whose path is NULL or "" is the dirfd itself. */
typedef struct {
    int dirfd[2], path[2];
} write_args_t;

static int write_args(long nr, write_args_t *w)
{
    w->dirfd[0] = w->dirfd[1] = w->path[0] = w->path[1] = -1;
    switch (nr) {
    case 85: case 76: case 83: case 84: case 87: case 90: case 92: case 94: case 132:
    case 235: case 133: case 188: case 189: case 197: case 198:
        /* creat, truncate, mkdir, rmdir, unlink, chmod, chown, lchown, utime, utimes, mknod,
         * setxattr, lsetxattr, removexattr, lremovexattr */
        w->path[0] = 0;
        return 1;
    case 82: case 86: /* rename, link */
        w->path[0] = 0;
        w->path[1] = 1;
        return 1;
    case 91: case 93: case 190: case 199: /* fchmod, fchown, fsetxattr, fremovexattr */
        w->dirfd[0] = 0;
        return 1;
    case 88: /* symlink(target, linkpath): the target is only text */
        w->path[0] = 1;
        return 1;
    case 266: /* symlinkat(target, dirfd, linkpath) */
        w->dirfd[0] = 1;
        w->path[0] = 2;
        return 1;
    case 264: case 316: case 265: /* renameat, renameat2, linkat */
        w->dirfd[0] = 0;
        w->path[0] = 1;
        w->dirfd[1] = 2;
        w->path[1] = 3;
        return 1;
    case 258: case 263: case 268: case 452: case 260: case 261: case 280: case 259:
        /* mkdirat, unlinkat, fchmodat, fchmodat2, fchownat, futimesat, utimensat, mknodat */
        w->dirfd[0] = 0;
        w->path[0] = 1;
        return 1;
    default: /* (setxattrat has six arguments: no room for the cookie) */
        return 0;
    }
}

/* May a write on this absolute host path be made here?  Plainly spelled (no "//", "." or
 * "..": then the spelling says where it is), outside the mount, /proc, /dev and the shadow
 * tree, and not naming the mount's last component (nothing here creates the mount). */
static int writable_host(const char *base, const char *p)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    if (!__atomic_load_n(&h->host_writes, __ATOMIC_RELAXED) || !h->shadow_len ||
        !host_path(base, p))
        return 0;
    unsigned long n, slash;
    if (!plainly_spelled(p, 1, &n, &slash) || in_shadow(h, p, n))
        return 0;
    unsigned long last = slash + 1, end = n;
    while (end > last && p[end - 1] == '/')
        end--; /* "name/" */
    unsigned long m = h->mount_len, mb = m;
    while (mb > 0 && h->mount[mb - 1] != '/')
        mb--;
    if (end - last != m - mb)
        return 1;
    for (unsigned long k = 0; k < m - mb; k++)
        if (p[last + k] != h->mount[mb + k])
            return 1;
    return 0; /* ".../cvmfs" */
}

static int writable_fd(const char *base, long fd);

/* The n of "/proc/self/fd/<n>" (glibc's fchmodat with AT_SYMLINK_NOFOLLOW: an O_PATH open,
 * then chmod of that), or -1. */
static long proc_self_fd(const char *p)
{
    /* byte by byte: a string would be .rodata, which the blob cannot have */
    if (p[0] != '/' || p[1] != 'p' || p[2] != 'r' || p[3] != 'o' || p[4] != 'c' ||
        p[5] != '/' || p[6] != 's' || p[7] != 'e' || p[8] != 'l' || p[9] != 'f' ||
        p[10] != '/' || p[11] != 'f' || p[12] != 'd' || p[13] != '/' || !p[14])
        return -1;
    long n = 0;
    for (int i = 14; p[i]; i++) {
        if (p[i] < '0' || p[i] > '9' || i > 22)
            return -1;
        n = n * 10 + (p[i] - '0');
    }
    return n;
}

/* The same for a path as a call gives it: relative ones joined to the cwd or the dirfd's
 * directory (absolute_of: a shadow directory stands for the mount, a host one as
 * host_joined says), that absolute form written to abs; "/proc/self/fd/<n>" as the fd
 * itself (abs ""). */
static int writable_at(const char *base, long dirfd, const char *p, char *abs, unsigned long cap)
{
    long fd = proc_self_fd(p);
    abs[0] = 0;
    if (fd >= 0)
        return writable_fd(base, fd);
    if (p[0] != '/')
        return absolute_of(base, dirfd, 0, p, abs, cap) && writable_host(base, abs);
    unsigned long n = 0;
    while (p[n] && n + 1 < cap)
        n++;
    if (p[n])
        return 0;
    for (unsigned long k = 0; k <= n; k++)
        abs[k] = p[k];
    return writable_host(base, abs);
}

/* May a write on what this fd is open on be made here?  Not one of our RAM files (any file
 * on their file systems) nor a directory of the shadow tree (fd_is_ours, the tracer's). */
static int writable_fd(const char *base, long fd)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    if (!__atomic_load_n(&h->host_writes, __ATOMIC_RELAXED) || !h->shadow_len ||
        __atomic_load_n(&h->ram_devs_full, __ATOMIC_ACQUIRE))
        return 0;
    uint64_t st[18]; /* struct stat */
    if (fo_syscall6(5, fd, (long)st, 0, 0, 0, cookie_of(base)) != 0)
        return 0;
    for (int i = 0; i < 4; i++) {
        uint64_t d = __atomic_load_n(&h->ram_devs[i], __ATOMIC_ACQUIRE);
        if (d && d == st[0])
            return 0;
    }
    char link[1100];
    long n = read_dir_link(base, fd, link, sizeof link);
    return n > 0 && n < (long)sizeof link && !in_shadow(h, link, (unsigned long)n);
}

/*
 * The call made here; its result is the tracer's answer too when it succeeded, or failed
 * otherwise than where a host symlink may lead into the mount, which the kernel cannot
 * follow: ENOENT and ENOTDIR of a call on one path (`where`, absolute; NULL: two paths) where
 * host_missing says they stand (EEXIST stands: O_CREAT|O_EXCL of a link into the mount is
 * EEXIST natively too).  Else it is asked again of the tracer (a call that failed changed
 * nothing).  Why: make, cmake, `rm -f` and `mkdir -p` remove what
 * is not there and make what is, each failure a stop before.
 */
static long made_here(const char *base, long nr, const long *a, const char *where, int *done)
{
    long r = fo_syscall6(nr, a[0], a[1], a[2], a[3], a[4], cookie_of(base));
    if ((r == -ENOENT_ || r == -20) &&
        (!where || !where[0] || !host_missing(base, nr, a, where, r)))
        return 0; /* asked again of the tracer: its errno (EROFS through a link) */
    __atomic_fetch_add(&((fo_counters_t *)(base + FO_CNT_OFF))->host, 1, __ATOMIC_RELAXED);
    *done = 1;
    return r;
}

/* open(at) of an absolute host path (`where`) with FO_REFUSE's flags but FO_REFUSE_HOST's:
 * a write, or a read with O_NOFOLLOW or O_PATH (which host_path allowed). */
static long host_open_written(const char *base, long nr, const long *a, const char *where,
                              int *done)
{
    long oflags = nr == 2 ? a[1] : a[2];
    if ((oflags & (03 | 0100 | 01000)) && !writable_host(base, where))
        return 0;
    return made_here(base, nr, a, where, done);
}

/* A write call other than open: made here where every path and fd it names may be. */
static long host_write(const char *base, long nr, const long *a, int *done)
{
    write_args_t w;
    char abs[1024]; /* one buffer (the program's stack): the last path's absolute form */
    int paths = 0;
    if (!write_args(nr, &w))
        return 0;
    abs[0] = 0;
    for (int i = 1; i >= 0; i--) {
        long d = w.dirfd[i] >= 0 ? (long)(int)a[w.dirfd[i]] : AT_FDCWD_;
        const char *p = w.path[i] >= 0 ? (const char *)a[w.path[i]] : 0;
        if (w.dirfd[i] >= 0 && d >= 0 && (!p || !p[0])) {
            if (!writable_fd(base, d))
                return 0; /* fchmod, utimensat(fd, NULL), ... of the fd itself */
        } else if (w.path[i] >= 0) {
            if (!p || !p[0] || !writable_at(base, d, p, abs, sizeof abs))
                return 0;
            paths++;
        }
    }
    return made_here(base, nr, a, paths == 1 ? abs : 0, done);
}

/* execve of a regular host file: made here (it returns only when it failed, which the
 * tracer then answers again, a #! script whose interpreter is under the mount among them),
 * where the tracer would let it through.  Not a FIFO, whose exec waits for a writer.  A file
 * that is not there is ENOENT here where that stands (host_missing: execvp and Python's
 * subprocess try each PATH entry).  Why: each stopped the program, on top of the stops an
 * exec always takes. */
static long host_exec(const char *base, const long *a)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    const char *p = (const char *)a[0], *where = p;
    char abs[1024];
    uint64_t st[18]; /* struct stat */
    fo_counters_t *cnt = (fo_counters_t *)(base + FO_CNT_OFF);
    if (p && p[0] && p[0] != '/' && absolute_of(base, AT_FDCWD_, 0, p, abs, sizeof abs))
        where = abs;
    if (p && where[0] == '/' && __atomic_load_n(&h->host_writes, __ATOMIC_RELAXED) &&
        host_path(base, where)) {
        long r = fo_syscall6(4, (long)p, (long)st, 0, 0, 0, cookie_of(base));
        if ((r == -ENOENT_ || r == -20 /* ENOTDIR */) && host_missing(base, 59, a, where, r)) {
            __atomic_fetch_add(&cnt->host, 1, __ATOMIC_RELAXED);
            return r;
        }
        if (r == 0 && (((const uint32_t *)st)[6] & S_IFMT_) == 0100000) {
            __atomic_fetch_add(&cnt->host, 1, __ATOMIC_RELAXED);
            fo_syscall6(59, a[0], a[1], a[2], 0, 0, cookie_of(base));
            __atomic_fetch_sub(&cnt->host, 1, __ATOMIC_RELAXED); /* it failed: the tracer's */
        }
    }
    return fo_syscall6(59, a[0], a[1], a[2], a[3], a[4], a[5]);
}
