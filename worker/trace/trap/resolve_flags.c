/*
 * openat2's RESOLVE_* flags on /cvmfs paths (resolve_key): the key they lead to, or their
 * errno, decided here; the redirected call then goes without them (allow_magic_link).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and paths.c, upcall.c, readonly.c define.
 */

#ifndef RESOLVE_NO_XDEV
#define RESOLVE_NO_XDEV 0x01
#define RESOLVE_NO_MAGICLINKS 0x02
#define RESOLVE_NO_SYMLINKS 0x04
#define RESOLVE_BENEATH 0x08
#define RESOLVE_IN_ROOT 0x10
#define RESOLVE_CACHED 0x20
#endif

/* The length of "/<repository>" at the start of p (n bytes after the mount's own path). */
static size_t repository_len(const char *p, size_t n)
{
    if (n == 0)
        return 0;
    const char *slash = memchr(p + 1, '/', n - 1);
    return slash ? (size_t)(slash - p) : n;
}

/*
 * The kernel applies the flags to the path it is given, and the call it is given names a RAM
 * file by a /proc magic link (refused by all of them but RESOLVE_CACHED, which says EAGAIN)
 * or, for RESOLVE_IN_ROOT's absolute paths, is resolved in the job's mirror of the directory,
 * whose files are empty: the program read nothing where the file has bytes (Go's os.Root,
 * cap-std, libpathrs use these).  So the path is walked here as the kernel walks it, from a
 * directory fd of the mount (or the host's root, for an absolute path without
 * RESOLVE_IN_ROOT), with the answers at hand (lstat, readlink): RESOLVE_IN_ROOT keeps ".." and
 * absolute symlinks in the dirfd, RESOLVE_BENEATH refuses what leaves it (EXDEV),
 * RESOLVE_NO_XDEV what leaves its repository (EXDEV), RESOLVE_NO_SYMLINKS any symlink on the
 * way (ELOOP; the last one too unless not followed).  RESOLVE_NO_MAGICLINKS and
 * RESOLVE_CACHED mean nothing for the answers at hand.
 *
 * Returns the key's length (in `key`), 0 when the path is the kernel's (a host path below a
 * host directory), or -errno.
 */
static long resolve_key(pid_t tid, tstate_t *t, long dirfd, const char *raw, long n,
                        unsigned long long resolve, int follow_last, char *key)
{
    char base[MAXPATH], cur[MAXPATH], todo[2 * MAXPATH + 2], next[2 * MAXPATH + 2];
    if (n <= 0 ||
        !(resolve & (RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | RESOLVE_IN_ROOT)))
        return 0; /* (the others: dropped from the redirected call, as all are) */
    ssize_t bn = dirfd_path(tid, t, dirfd, base, sizeof base);
    int ours = bn > 0 && has_prefix(base, (size_t)bn, shadow_p, shadow_n);
    size_t floor, cn; /* where ".." stops (IN_ROOT) or must not go (BENEATH); the walk so far */
    if (raw[0] == '/' && !(resolve & RESOLVE_IN_ROOT)) {
        if (!has_prefix(raw, (size_t)n, mount_p, mount_n))
            return ours && (resolve & RESOLVE_BENEATH) ? -EXDEV : 0;
        if (resolve & (RESOLVE_BENEATH | RESOLVE_NO_XDEV))
            return -EXDEV; /* from the host's root into the mount, or not beneath the dirfd */
        memcpy(cur, mount_p, mount_n);
        floor = cn = mount_n;
        raw += mount_n;
    } else {
        if (!ours)
            return 0; /* below a host directory: the kernel's */
        size_t rest = (size_t)bn - shadow_n;
        memcpy(cur, mount_p, mount_n);
        memcpy(cur + mount_n, base + shadow_n, rest);
        floor = cn = mount_n + rest;
    }
    cur[cn] = 0;
    char start[MAXPATH];
    memcpy(start, cur, cn + 1);
    int slash = raw[0] && raw[strlen(raw) - 1] == '/', links = 0;
    snprintf(todo, sizeof todo, "%s", raw);
    const char *c = todo;
    for (;;) {
        while (*c == '/')
            c++;
        if (!*c)
            break;
        size_t len = strcspn(c, "/");
        const char *after = c + len;
        int last = !after[strspn(after, "/")];
        if (len == 1 && c[0] == '.') {
            c = after;
            continue;
        }
        if (len == 2 && c[0] == '.' && c[1] == '.') {
            if (cn <= floor && (resolve & RESOLVE_BENEATH))
                return -EXDEV;
            if (cn > floor || !(resolve & RESOLVE_IN_ROOT)) {
                while (cn > 0 && cur[cn - 1] != '/')
                    cn--;
                if (cn > 0)
                    cn--;
                cur[cn] = 0;
                if (cn < mount_n || (cn == mount_n && (resolve & RESOLVE_NO_XDEV)))
                    return -EXDEV; /* out of the repository's mount, or of the mount */
            }
            c = after;
            continue;
        }
        if (cn + 1 + len >= MAXPATH)
            return -ENAMETOOLONG;
        cur[cn] = '/';
        memcpy(cur + cn + 1, c, len);
        cur[cn + 1 + len] = 0;
        long st = ro_stat(tid, 0, cur, cn + 1 + len);
        if (st <= 1) { /* not there (the open says so where it is the last), or not at hand */
            if (!last && st < 0)
                return st;
            cn += 1 + len;
            c = after;
            continue;
        }
        if (!S_ISLNK((mode_t)st) || (last && !follow_last)) {
            if (!last && !S_ISDIR((mode_t)st))
                return -ENOTDIR;
            cn += 1 + len;
            c = after;
            continue;
        }
        if ((resolve & RESOLVE_NO_SYMLINKS) || ++links > 40)
            return -ELOOP;
        action_t tmp;
        PyObject *prefix = NULL;
        memset(&tmp, 0, sizeof tmp);
        action_t *a = lookup(tid, C_READLINK, 0, cur, cn + 1 + len, &tmp, &prefix);
        int ok = a->kind == A_READLINK && a->bval && a->blen > 0;
        if (ok)
            snprintf(next, sizeof next, "%s%s", a->bval, after);
        if (a == &tmp)
            free(tmp.bval);
        if (!ok)
            return -EIO;
        if (next[0] == '/') { /* an absolute target: from the dirfd (IN_ROOT) or from "/" */
            if (resolve & RESOLVE_BENEATH)
                return -EXDEV;
            if (resolve & RESOLVE_IN_ROOT) {
                cn = floor;
            } else if (has_prefix(next, strlen(next), mount_p, mount_n)) {
                cn = mount_n;
                memmove(next, next + mount_n, strlen(next + mount_n) + 1);
            } else {
                return -EXDEV; /* out of the mount */
            }
            cur[cn] = 0;
        }
        memcpy(todo, next, strlen(next) + 1);
        c = todo;
    }
    if ((resolve & RESOLVE_NO_XDEV) && floor > mount_n &&
        (repository_len(start + mount_n, floor - mount_n) !=
             repository_len(cur + mount_n, cn - mount_n) ||
         memcmp(start + mount_n, cur + mount_n, repository_len(cur + mount_n, cn - mount_n))))
        return -EXDEV; /* out of the dirfd's repository: another mount */
    if ((resolve & RESOLVE_NO_XDEV) && floor == mount_n && cn > mount_n)
        return -EXDEV; /* from the mount's own directory into a repository */
    if (cn + slash >= MAXPATH)
        return -ENAMETOOLONG;
    memcpy(key, cur, cn);
    if (slash)
        key[cn++] = '/';
    key[cn] = 0;
    return (long)cn;
}
