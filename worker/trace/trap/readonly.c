/*
 * Writes to the mount: which errno the kernel gives each on a read-only file system
 * (ro_errno, pure), a call's kind (ro_call), and the states of its paths read from the
 * answers at hand (ro_mount_path, ro_host_path).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and paths.c, upcall.c, redirect.c define.
 */

/*
 * EROFS is the answer to a write only once the kernel has nothing else to say first: a path
 * that does not resolve is ENOENT or ENOTDIR, a name that exists is EEXIST to mkdir, a
 * directory is EISDIR to an open for writing, a rename across mounts is EXDEV, and an open
 * with O_CREAT of a regular file that exists is a plain open (fs/namei.c: filename_create,
 * do_renameat2, do_unlinkat, do_rmdir, open_last_lookups, do_open).  Programs act on the
 * difference: `except FileExistsError`, mkdir -p, mv falling back to a copy on EXDEV.
 * Names directly in the mount's own directory are autofs's there: EACCES to a caller that
 * is not root.
 */
enum { RO_MKDIR, RO_MKNOD, RO_SYMLINK, RO_LINK, RO_RENAME, RO_UNLINK, RO_RMDIR,
       RO_TRUNCATE, RO_ATTR, RO_OPEN };
enum { RO_NORM, RO_DOT, RO_DOTDOT };
#define RO_UNKNOWN 1 /* a state not at hand (a symlink out of the mount ...): plain EROFS */

typedef struct {
    int in_mount;        /* 0: a host path (only beside one in the mount: link, rename) */
    int last;            /* RO_NORM, RO_DOT, RO_DOTDOT: the last component */
    int slash;           /* a '/' after a last name that is not a dot */
    int top;             /* a name directly in the mount's own directory (autofs's) */
    const char *mnt;     /* the mount its parent is on (a repository's name; "" for the */
    size_t mnt_n;        /* mount's own directory, NULL for a host path) */
    long parent;         /* 0: resolves to a directory; else -errno, or RO_UNKNOWN */
    long node;           /* lstat: its mode (> 1), -errno (-ENOENT: not there), RO_UNKNOWN */
    long target;         /* stat (the last symlink followed): the same kinds */
} ro_path_t;

static int ro_same_mount(const ro_path_t *a, const ro_path_t *b)
{
    if (!a->in_mount || !b->in_mount)
        return 0;
    return a->mnt_n == b->mnt_n && (a->mnt_n == 0 || !memcmp(a->mnt, b->mnt, a->mnt_n));
}

/* What a create of p (mkdir, mknod, symlink, link's new name) says before it could write:
 * 0 when only the write itself is left. */
static long ro_create(int call, const ro_path_t *p)
{
    if (p->parent)
        return p->parent;
    if (p->last != RO_NORM)
        return -EEXIST;
    if (p->node == RO_UNKNOWN)
        return RO_UNKNOWN;
    if (p->node > 1)
        return -EEXIST;
    if (p->node != -ENOENT)
        return p->node;
    if (p->slash && call != RO_MKDIR)
        return -ENOENT;
    return 0;
}

/* The node a call on p acts on, following a last symlink or not: its mode, or -errno. */
static long ro_resolved(const ro_path_t *p, int follow)
{
    if (p->parent)
        return p->parent;
    if (p->last != RO_NORM)
        return S_IFDIR;
    long st = p->node;
    if (follow && st > 1 && S_ISLNK((mode_t)st))
        st = p->target;
    if (st > 1 && p->slash && !S_ISDIR((mode_t)st))
        return -ENOTDIR;
    return st;
}

/* Does this kernel refuse O_CREAT | O_DIRECTORY (6.4 and later), before looking? */
static int ro_creat_directory_einval(void)
{
    static int known = -1;
    if (known < 0) {
        struct utsname u;
        int major = 0, minor = 0;
        known = uname(&u) == 0 && sscanf(u.release, "%d.%d", &major, &minor) == 2 &&
                (major > 6 || (major == 6 && minor >= 4));
    }
    return known;
}

/*
 * The errno of a write (call) to a read-only mount; `a` (and `b`: link's and rename's second
 * path) as the caller resolved them.  `flags`: an open's flags, rename's RENAME_*, mknod's
 * file type; `follow`: the last symlink of `a` followed.  Returns -errno; 0: an open to make
 * as an open without O_CREAT and O_TRUNC (the file is there, and not written); RO_UNKNOWN:
 * not at hand.
 */
static long ro_errno(int call, long flags, int follow, int root, const ro_path_t *a,
                     const ro_path_t *b)
{
    long e, st;
    switch (call) {
    case RO_MKNOD: /* the file type (flags) is checked first */
        if ((flags & S_IFMT) == S_IFDIR)
            return -EPERM;
        if ((flags & S_IFMT) && !S_ISREG(flags) && !S_ISCHR(flags) && !S_ISBLK(flags) &&
            !S_ISFIFO(flags) && !S_ISSOCK(flags))
            return -EINVAL;
        /* fall through */
    case RO_MKDIR:
    case RO_SYMLINK:
        if ((e = ro_create(call, a)))
            return e;
        return a->top && !root ? -EACCES : -EROFS;
    case RO_LINK:
        if ((st = ro_resolved(a, follow)) <= 1)
            return st == 0 ? RO_UNKNOWN : st;
        if ((e = ro_create(call, b)))
            return e;
        if (!b->in_mount)
            return -EXDEV;
        return b->top && !root ? -EACCES : -EROFS;
    case RO_RENAME:
        if (a->parent)
            return a->parent;
        if (b->parent)
            return b->parent;
        if (!ro_same_mount(a, b))
            return -EXDEV;
        if (a->last != RO_NORM)
            return -EBUSY;
        if (b->last != RO_NORM)
            return (flags & 1 /* RENAME_NOREPLACE */) ? -EEXIST : -EBUSY;
        return a->top && !root ? -EACCES : -EROFS;
    case RO_UNLINK:
        if (a->parent)
            return a->parent;
        if (a->last != RO_NORM)
            return -EISDIR;
        return a->top && !root ? -EACCES : -EROFS;
    case RO_RMDIR:
        if (a->parent)
            return a->parent;
        if (a->last == RO_DOT)
            return -EINVAL;
        if (a->last == RO_DOTDOT)
            return -ENOTEMPTY;
        return a->top && !root ? -EACCES : -EROFS;
    case RO_TRUNCATE:
    case RO_ATTR:
        if ((st = ro_resolved(a, follow)) <= 1)
            return st == 0 ? RO_UNKNOWN : st;
        if (call == RO_TRUNCATE && S_ISDIR((mode_t)st))
            return -EISDIR;
        if (call == RO_TRUNCATE && !S_ISREG((mode_t)st))
            return -EINVAL;
        return -EROFS;
    case RO_OPEN:
        break;
    default:
        return -EROFS;
    }
    int acc = (int)(flags & O_ACCMODE), writes = acc == O_WRONLY || acc == O_RDWR;
    if (flags & O_PATH)
        return 0; /* O_PATH drops O_CREAT and O_TRUNC */
    if ((flags & O_CREAT) && (flags & O_DIRECTORY) && (flags & O_TMPFILE) != O_TMPFILE &&
        ro_creat_directory_einval())
        return -EINVAL;
    if ((flags & O_TMPFILE) == O_TMPFILE) {
        if (!writes)
            return -EINVAL;
        if ((st = ro_resolved(a, 1)) <= 1)
            return st == 0 ? RO_UNKNOWN : st;
        return S_ISDIR((mode_t)st) ? -EROFS : -ENOTDIR;
    }
    if (a->parent)
        return a->parent;
    if (flags & O_CREAT) {
        if (a->last != RO_NORM)
            return (flags & O_EXCL) ? -EEXIST : -EISDIR;
        if (a->slash)
            return -EISDIR;
        if (a->node == RO_UNKNOWN)
            return RO_UNKNOWN;
        if (a->node == -ENOENT)
            return a->top && !root ? -EACCES : -EROFS;
        if (a->node < 0)
            return a->node;
        if (flags & O_EXCL)
            return -EEXIST;
        st = a->node;
        if (S_ISLNK((mode_t)st) && !(flags & O_NOFOLLOW)) {
            st = a->target;
            if (st == -ENOENT)
                return -EROFS; /* it would create the link's target */
            if (st <= 1)
                return st == 0 ? RO_UNKNOWN : st;
        }
        if (S_ISDIR((mode_t)st))
            return -EISDIR;
    } else if ((st = ro_resolved(a, !(flags & O_NOFOLLOW))) <= 1) {
        return st == 0 ? RO_UNKNOWN : st;
    }
    if ((flags & O_DIRECTORY) && !S_ISDIR((mode_t)st))
        return -ENOTDIR;
    if (S_ISREG((mode_t)st) && ((flags & O_TRUNC) || writes))
        return -EROFS;
    if (S_ISDIR((mode_t)st) && ((flags & O_TRUNC) || writes))
        return -EISDIR;
    if (S_ISLNK((mode_t)st))
        return -ELOOP;
    return 0; /* read-only, or a FIFO or device (O_TRUNC means nothing to those) */
}

/* A write call as trap/readonly.c knows it: its kind, the flags it looks at (an open's,
 * rename's) and whether the last symlink of its (first) path is followed. */
static int ro_call(long nr, const struct user_regs_struct *r, long open_fl, long *fl,
                   int *follow)
{
    *fl = 0;
    *follow = 0;
    switch (nr) {
    case SYS_open: case SYS_openat: case 437: case SYS_creat:
        *fl = open_fl;
        /* O_CREAT | O_EXCL never follows: a symlink there is EEXIST */
        *follow = !(open_fl & O_NOFOLLOW) && (open_fl & (O_CREAT | O_EXCL)) != (O_CREAT | O_EXCL);
        return RO_OPEN;
    case SYS_mkdir: case SYS_mkdirat: return RO_MKDIR;
    case SYS_mknod: *fl = (long)(r->rsi & S_IFMT); return RO_MKNOD; /* its file type */
    case SYS_mknodat: *fl = (long)(r->rdx & S_IFMT); return RO_MKNOD;
    case SYS_symlink: case SYS_symlinkat: return RO_SYMLINK;
    case SYS_link: return RO_LINK;
    case SYS_linkat: *follow = (r->r8 & AT_SYMLINK_FOLLOW) != 0; return RO_LINK;
    case SYS_rename: case SYS_renameat: return RO_RENAME;
    case 316: *fl = (long)r->r8; return RO_RENAME;
    case SYS_unlink: return RO_UNLINK;
    case SYS_unlinkat: return (r->rdx & AT_REMOVEDIR) ? RO_RMDIR : RO_UNLINK;
    case SYS_rmdir: return RO_RMDIR;
    case SYS_truncate: *follow = 1; return RO_TRUNCATE;
    case SYS_chmod: case SYS_chown: case SYS_utime: case SYS_utimes: case SYS_setxattr:
    case SYS_removexattr: case SYS_fchmodat: case SYS_futimesat:
        *follow = 1;
        return RO_ATTR;
    case 452: *follow = !(r->r10 & AT_SYMLINK_NOFOLLOW); return RO_ATTR; /* fchmodat2 */
    case SYS_fchownat: *follow = !(r->r8 & AT_SYMLINK_NOFOLLOW); return RO_ATTR;
    case SYS_utimensat: *follow = !(r->r10 & AT_SYMLINK_NOFOLLOW); return RO_ATTR;
    case 463: case 466: *follow = !(r->rdx & AT_SYMLINK_NOFOLLOW); return RO_ATTR;
    default: return RO_ATTR; /* lchown, lsetxattr, lremovexattr */
    }
}

/* ---------- the states, from the answers at hand ---------- */

/* lstat (follow 0) or stat of a key under the mount as the program sees it: the mode, -errno,
 * or RO_UNKNOWN (an answer that is not a stat: a path that leaves the mount). */
static long ro_stat(pid_t tid, int follow, const char *key, size_t kn)
{
    char k[MAXPATH];
    if (kn >= sizeof k)
        return -ENAMETOOLONG;
    memcpy(k, key, kn);
    k[kn] = 0;
    int64_t st[15];
    long err;
    if (answer_stat(tid, follow ? 0 : F_NOFOLLOW, k, kn, st, &err))
        return st[0] > 1 ? (long)(mode_t)st[0] : RO_UNKNOWN;
    return err < 0 ? err : RO_UNKNOWN;
}

/* The last component of a path as written: a dot, two, or a name (and a '/' after it). */
static void ro_last(const char *raw, size_t n, ro_path_t *p)
{
    size_t end = n;
    while (end > 1 && raw[end - 1] == '/')
        end--;
    size_t s = end;
    while (s > 0 && raw[s - 1] != '/')
        s--;
    size_t len = end - s;
    p->last = len == 1 && raw[s] == '.' ? RO_DOT
              : len == 2 && raw[s] == '.' && raw[s + 1] == '.' ? RO_DOTDOT
                                                               : RO_NORM;
    p->slash = p->last == RO_NORM && end < n;
}

/* A path under the mount (key, as mount_key made it; raw: as the program wrote it). */
static void ro_mount_path(pid_t tid, const char *raw, size_t n, const char *key, size_t kn,
                          int need_node, int follow, ro_path_t *p)
{
    memset(p, 0, sizeof *p);
    p->in_mount = 1;
    ro_last(raw, n, p);
    while (kn > 1 && key[kn - 1] == '/')
        kn--;
    if (kn <= mount_n) { /* the mount's own directory: there, in the host's root */
        p->node = p->target = S_IFDIR;
        p->mnt = key;
        p->top = p->last == RO_NORM;
        return;
    }
    size_t pn = kn; /* the directory the last component is in */
    if (p->last == RO_NORM) {
        const char *slash = memrchr(key, '/', kn);
        pn = slash ? (size_t)(slash - key) : 0;
    } else if (p->last == RO_DOTDOT && kn >= 3 && !memcmp(key + kn - 3, "/..", 3)) {
        pn = kn - 3;
    }
    if (pn < mount_n || !has_prefix(key, pn, mount_p, mount_n)) {
        /* the mount's own directory, or above it: the caller's mount namespace */
        p->parent = RO_UNKNOWN;
        return;
    }
    p->top = p->last == RO_NORM && pn == mount_n;
    p->mnt = key + mount_n + (pn > mount_n);
    const char *rs = pn > mount_n ? memchr(p->mnt, '/', pn - mount_n - 1) : NULL;
    p->mnt_n = pn > mount_n ? (rs ? (size_t)(rs - p->mnt) : pn - mount_n - 1) : 0;
    if (pn > mount_n) {
        long st = ro_stat(tid, 1, key, pn);
        p->parent = st > 1 ? (S_ISDIR((mode_t)st) ? 0 : -ENOTDIR) : st;
    }
    if (p->parent || p->last != RO_NORM || !need_node)
        return;
    p->node = ro_stat(tid, 0, key, kn);
    p->target = p->node;
    if (follow && p->node > 1 && S_ISLNK((mode_t)p->node))
        p->target = ro_stat(tid, 1, key, kn);
}

/* A file of the mount named by its fd (linkat's AT_EMPTY_PATH, /proc/self/fd/N). */
static void ro_file_of_ours(ro_path_t *p)
{
    memset(p, 0, sizeof *p);
    p->in_mount = 1;
    p->node = p->target = S_IFREG;
}

/* A host path beside one in the mount (link, rename): the kernel's answers, asked here. */
static void ro_host_path(pid_t tid, tstate_t *t, long dirfd, const char *raw, size_t n,
                         ro_path_t *p)
{
    memset(p, 0, sizeof *p);
    ro_last(raw, n, p);
    char abs[MAXPATH], mapped[MAXPATH];
    size_t an = 0;
    if (raw[0] != '/') {
        ssize_t bn = dirfd_path(tid, t, dirfd, abs, sizeof abs);
        if (bn <= 0 || (size_t)bn + 1 + n >= sizeof abs) {
            p->parent = RO_UNKNOWN;
            return;
        }
        an = (size_t)bn;
        abs[an++] = '/';
    } else if (n >= sizeof abs) {
        p->parent = -ENAMETOOLONG;
        return;
    }
    memcpy(abs + an, raw, n + 1);
    const char *path = as_tracee(tid, abs, mapped, sizeof mapped);
    struct stat st;
    char dir[MAXPATH];
    size_t dn = strlen(path);
    while (dn > 1 && path[dn - 1] == '/')
        dn--;
    memcpy(dir, path, dn);
    dir[dn] = 0;
    if (p->last == RO_NORM) {
        char *slash = strrchr(dir, '/');
        if (slash)
            slash[slash == dir] = 0;
    }
    if (stat(dir, &st) != 0)
        p->parent = -errno;
    else if (!S_ISDIR(st.st_mode))
        p->parent = -ENOTDIR;
    if (p->parent || p->last != RO_NORM)
        return;
    p->node = lstat(path, &st) == 0 ? (long)st.st_mode : -errno;
    p->target = stat(path, &st) == 0 ? (long)st.st_mode : -errno;
}
