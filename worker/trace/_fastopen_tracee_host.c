/*
 * The in-process handler's host paths (worker/trace/_fastopen_tracee.c, which #includes this
 * in its one translation unit): which calls it makes itself, as the tracer would let them
 * through, and when the kernel's ENOENT or ENOTDIR for one is the tracer's answer too.
 */

/* A path the tracer lets through untouched when the kernel finds it: absolute, outside the
 * mount, not under /proc or /dev (magic links the tracer maps: /proc/self/exe, fd links into
 * the mirror, /dev/fd/N ...) but /dev/null (every shell's "> /dev/null"). */
static int host_path(const char *base, const char *p)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    if (!p || p[0] != '/')
        return 0;
    unsigned long i = 0;
    while (i < h->mount_len && p[i] == h->mount[i])
        i++;
    if (i == h->mount_len)
        return 0; /* the mount, or a name that starts like it: the tracer's */
    if (p[1] == 'p' && p[2] == 'r' && p[3] == 'o' && p[4] == 'c')
        return 0;
    if (p[1] == 'e' && p[2] == 't' && p[3] == 'c' && p[4] == '/' && p[5] == 'm' && p[6] == 't' &&
        p[7] == 'a' && p[8] == 'b' && !p[9])
        return 0; /* /etc/mtab: the tracer's mount table (trap/proc_files.c) */
    if (p[1] == 'd' && p[2] == 'e' && p[3] == 'v')
        return p[4] == '/' && p[5] == 'n' && p[6] == 'u' && p[7] == 'l' && p[8] == 'l' && !p[9];
    return 1;
}

/* Does a call on this host path follow a symlink in its last component? */
static int follows_last(long nr, const long *a)
{
    switch (nr) {
    case 6: case 89: case 267: case 192: case 195: /* lstat, readlink(at), l*xattr */
        return 0;
    case 262: case 439: /* newfstatat, faccessat2 */
        return !(a[3] & AT_SYMLINK_NOFOLLOW_);
    case 332: /* statx */
        return !(a[2] & AT_SYMLINK_NOFOLLOW_);
    default: /* open(at) (never with O_NOFOLLOW here), stat, access, faccessat, *xattr */
        return 1;
    }
}

/* Is the absolute path p in normal form: no "//", "." or ".." component, and no trailing "/"
 * unless `trailing`?  Its length in *len, its last slash before a name in *slash; not past
 * 1000 bytes.  Such a path's spelling says where it is (host_missing, writable_host). */
static int plainly_spelled(const char *p, int trailing, unsigned long *len, unsigned long *slash)
{
    unsigned long n = 0, s = 0;
    for (; p[n]; n++) {
        if (n >= 1000)
            return 0;
        if (p[n] != '/')
            continue;
        char c = p[n + 1];
        if (c == 0) {
            if (!trailing || n == 0)
                return 0; /* a trailing "/" (or the root) */
            continue;
        }
        if (c == '/' || (c == '.' && (p[n + 2] == 0 || p[n + 2] == '/' ||
                                      (p[n + 2] == '.' && (p[n + 3] == 0 || p[n + 3] == '/')))))
            return 0; /* "//", ".", ".." */
        s = n;
    }
    *len = n;
    *slash = s;
    return 1;
}

/*
 * ENOENT or ENOTDIR from the kernel for an absolute host path: is that the tracer's answer
 * too?  It is unless a host symlink may lead into the mount, which the kernel cannot follow
 * (worker/trace/trap/paths.c, via_host_symlink, whose rule this is): ENOTDIR always stands;
 * ENOENT stands when the last component is no (dangling) link and its parent exists on the
 * host, or when a name above it is missing below real directories only.  Only for paths in
 * normal form (a ".." may lead into the mount); else the tracer's.
 */
static int host_missing(const char *base, long nr, const long *a, const char *p, long r)
{
    unsigned long n, slash;
    if (!plainly_spelled(p, 0, &n, &slash))
        return 0;
    if (r == -20 /* ENOTDIR */)
        return 1;
    long cookie = cookie_of(base);
    /* One walk that follows no symlink (openat2, RESOLVE_NO_SYMLINKS): ENOENT there means a
     * name is missing below real directories only, and no link can lead anywhere.  A link
     * on the way (ELOOP: merged /usr's /lib, a trailing link) or no openat2 (Linux < 5.6):
     * the checks below, a syscall a name (6 for each of glibc's probes of its locales). */
    uint64_t how[3] = {010000000 | 02000000 /* O_PATH|O_CLOEXEC */, 0, 0x04 /* NO_SYMLINKS */};
    long fd = fo_syscall6(437, AT_FDCWD_, (long)p, (long)how, sizeof how, 0, cookie);
    if (fd == -ENOENT_)
        return 1;
    if (fd >= 0) {
        fo_syscall6(3, fd, 0, 0, 0, 0, cookie);
        return 0; /* there now: the tracer's to answer */
    }
    uint64_t st[18]; /* struct stat */
    if (follows_last(nr, a) && fo_syscall6(6, (long)p, (long)st, 0, 0, 0, cookie) == 0)
        return 0; /* a dangling link: where it leads is the tracer's to find */
    if (slash == 0)
        return 1; /* "/name": its parent is the root */
    char parent[1024];
    for (unsigned long i = 0; i < slash; i++)
        parent[i] = p[i];
    parent[slash] = 0;
    if (fo_syscall6(4, (long)parent, (long)st, 0, 0, 0, cookie) == 0)
        return 1;
    /* The parent is missing too (glibc's probes of locales it does not have): ENOENT still
     * stands where, from the top, each name is a real directory up to one that is missing
     * and no (dangling) link itself; a symlink on the way may lead into the mount. */
    for (unsigned long k = 1; k <= slash; k++) {
        if (k < slash && parent[k] != '/')
            continue;
        parent[k] = 0;
        long e = fo_syscall6(6, (long)parent, (long)st, 0, 0, 0, cookie);
        if (e == -ENOENT_)
            return 1;
        unsigned mode = (unsigned)st[3] & 0170000; /* st_mode */
        if (e != 0 || mode != 0040000)
            return 0;
        parent[k] = '/';
    }
    return 0;
}
