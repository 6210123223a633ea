/*
 * Paths: prefix tests, /proc links of a tracee, lexical normalisation, a call's path made
 * absolute (tracee_cwd, dirfd_path), the key under the mount (mount_key, resolve_into_mount),
 * host symlinks into the mount, xattr answers.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and answers.c, threads.c, config.c, memory.c define.
 */

/* ---------- paths ---------- */

static int has_prefix(const char *p, size_t n, const char *pre, size_t pn)
{
    return n >= pn && memcmp(p, pre, pn) == 0 && (n == pn || p[pn] == '/');
}

/* readlink of /proc/<tid>/<what>; returns length or -1 */
static ssize_t proc_link(pid_t tid, const char *what, char *out, size_t max)
{
    char lp[64];
    snprintf(lp, sizeof lp, "/proc/%d/%s", (int)tid, what);
    ssize_t n = readlink(lp, out, max - 1);
    if (n >= 0)
        out[n] = 0;
    return n;
}

/*
 * A path through one of the kernel's magic links to a directory -- /proc/self/cwd/x,
 * /proc/<pid>/fd/<n>/x, /dev/fd/<n>/x, /proc/thread-self/... -- that lands in the shadow tree:
 * the kernel would resolve the rest in the private mirror (empty placeholder files, writable
 * directories), so spell it out as the shadow path it stands for, which mount_key maps to the
 * mount.  Returns the length of the rewritten path in `out`, or 0 when `raw` is not such a
 * path (the kernel resolves it, as before).
 */
static long via_magic_link(pid_t tid, const char *raw, size_t n, char *out, size_t max,
                           int whole)
{
    char link[96], target[MAXPATH];
    const char *p;
    size_t ln;
    if (has_prefix(raw, n, "/dev/fd", 7) && raw[7] == '/') {
        p = raw + 8;
        ln = (size_t)snprintf(link, sizeof link, "/proc/%d/fd/", (int)tid);
    } else if (has_prefix(raw, n, "/proc", 5) && raw[5] == '/') {
        p = raw + 6;
        if (!strncmp(p, "self/", 5)) {
            p += 5;
            ln = (size_t)snprintf(link, sizeof link, "/proc/%d/", (int)tid);
        } else if (!strncmp(p, "thread-self/", 12)) {
            p += 12;
            ln = (size_t)snprintf(link, sizeof link, "/proc/%d/", (int)tid);
        } else {
            size_t d = strspn(p, "0123456789");
            if (!d || d > 10 || p[d] != '/')
                return 0;
            ln = (size_t)snprintf(link, sizeof link, "/proc/%.*s/", (int)d, p);
            p += d + 1;
            if (!strncmp(p, "task/", 5)) { /* /proc/<pid>/task/<tid>/... */
                size_t td = strspn(p + 5, "0123456789");
                if (!td || td > 10 || p[5 + td] != '/')
                    return 0;
                ln += (size_t)snprintf(link + ln, sizeof link - ln, "task/%.*s/", (int)td, p + 5);
                p += 5 + td + 1;
            }
        }
        if (!strncmp(p, "cwd", 3) && (p[3] == '/' || !p[3])) {
            memcpy(link + ln, "cwd", 4);
            p += 3;
        } else if (!strncmp(p, "root", 4) && (p[4] == '/' || !p[4])) {
            return 0; /* the root is never in the shadow tree */
        } else if (!strncmp(p, "fd/", 3)) {
            p += 3;
            ln += (size_t)snprintf(link + ln, sizeof link - ln, "fd/");
        } else {
            return 0;
        }
    } else {
        return 0;
    }
    if (link[strlen(link) - 1] == '/') { /* fd/<n> still to read */
        size_t d = strspn(p, "0123456789");
        if (!d || d > 10 || (p[d] != '/' && p[d]))
            return 0;
        snprintf(link + strlen(link), sizeof link - strlen(link), "%.*s", (int)d, p);
        p += d;
    }
    ssize_t tn = readlink(link, target, sizeof target - 1);
    if (tn <= 0 || !has_prefix(target, (size_t)tn, shadow_p, shadow_n))
        return 0;
    size_t rest = n - (size_t)(p - raw);
    if (!rest && !whole)
        return 0; /* the link itself (readlink, lstat): see magic_readlink */
    if ((size_t)tn + rest + 1 > max)
        return -ENAMETOOLONG;
    memcpy(out, target, (size_t)tn);
    memcpy(out + tn, p, rest + 1);
    return tn + (long)rest;
}

/* /proc/<tid>/status into buf (NUL-terminated); its length, or 0. */
static size_t proc_status(pid_t tid, char *buf, size_t max)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/status", (int)tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, max - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    return (size_t)n;
}

/* Collapse "//" and "/./" (keeps ".."); out must hold n+2. */
static size_t collapse(const char *in, size_t n, char *out)
{
    size_t o = 0, i = 0;
    int dir_after = 0; /* a '/' or "." after the last name: it must be a directory */
    while (i < n) {
        while (i < n && in[i] == '/')
            i++;
        size_t s = i;
        while (i < n && in[i] != '/')
            i++;
        size_t len = i - s;
        if (len == 1 && in[s] == '.')
            dir_after = 1;
        if (len == 0 || (len == 1 && in[s] == '.'))
            continue;
        out[o++] = '/';
        memcpy(out + o, in + s, len);
        o += len;
        dir_after = 0;
    }
    if (o == 0)
        out[o++] = '/';
    else if (dir_after || (n > 0 && in[n - 1] == '/'))
        out[o++] = '/'; /* "file/" and "file/." must still fail with ENOTDIR */
    out[o] = 0;
    return o;
}

/* Lexical ".." removal on a collapsed absolute path, in place. */
static size_t lexnorm(char *p, size_t n)
{
    size_t o = 0, i = 0;
    while (i < n) {
        i++; /* skip '/' */
        size_t s = i;
        while (i < n && p[i] != '/')
            i++;
        size_t len = i - s;
        if (len == 2 && p[s] == '.' && p[s + 1] == '.') {
            while (o > 0 && p[o - 1] != '/')
                o--;
            if (o > 0)
                o--;
            continue;
        }
        p[o++] = '/';
        memmove(p + o, p + s, len);
        o += len;
    }
    if (o == 0)
        p[o++] = '/';
    p[o] = 0;
    return o;
}

/*
 * Turn the path argument of a trapped call into the key under the mount, or decide that it
 * is not ours.  Returns key length (>0) with the key in `key`, 0 when the call is not ours,
 * or -errno.  `raw` receives the tracee's string.
 */
static ssize_t tracee_cwd(pid_t tid, tstate_t *t, char *out, size_t max)
{
    if (t && t->cwd && t->cwd_gen == cwd_gen && t->cwd_len < max) {
        memcpy(out, t->cwd, t->cwd_len + 1);
        return (ssize_t)t->cwd_len;
    }
    ssize_t n = proc_link(tid, "cwd", out, max);
    if (n >= 0 && t) {
        char *c = realloc(t->cwd, (size_t)n + 1);
        if (c) {
            memcpy(c, out, (size_t)n + 1);
            t->cwd = c;
            t->cwd_len = (size_t)n;
            t->cwd_gen = cwd_gen;
        }
    }
    return n;
}

/* The directory a relative path starts from: the tracee's cwd, or where its dirfd points. */
static ssize_t dirfd_path(pid_t tid, tstate_t *t, long dirfd, char *out, size_t max)
{
    if (dirfd == AT_FDCWD)
        return tracee_cwd(tid, t, out, max);
    char what[32];
    snprintf(what, sizeof what, "fd/%d", (int)dirfd);
    return proc_link(tid, what, out, max);
}

/* raw/n: the path argument as read_string returned it (n < 0: its error). */
static long mount_key(pid_t tid, tstate_t *t, long dirfd, const char *raw, long n, char *key,
                      int allow_empty)
{
    char base[MAXPATH], joined[2 * MAXPATH + 2];
    if (n < 0)
        return n;
    if (n == 0)
        return allow_empty ? 0 : -ENOENT;
    size_t jn;
    char magic[MAXPATH];
    if (raw[0] == '/' && (raw[1] == 'p' || raw[1] == 'd')) {
        long mn = via_magic_link(tid, raw, (size_t)n, magic, sizeof magic, 0);
        if (mn < 0)
            return mn;
        if (mn > 0) {
            raw = magic;
            n = mn;
        }
    }
    if (raw[0] == '/') {
        /* fast path: absolute and not under /cvmfs (or the shadow tree) */
        if (raw[1] != '/' && raw[1] != '.' && !has_prefix(raw, (size_t)n, mount_p, mount_n) &&
            !has_prefix(raw, (size_t)n, shadow_p, shadow_n) && !strstr(raw, "/.") &&
            !strstr(raw, "//"))
            return 0;
        memcpy(joined, raw, (size_t)n + 1);
        jn = (size_t)n;
    } else {
        ssize_t bn = dirfd_path(tid, t, dirfd, base, sizeof base);
        if (bn < 0 || base[0] != '/')
            return 0; /* let the kernel report EBADF / ENOTDIR */
        if (!has_prefix(base, (size_t)bn, shadow_p, shadow_n) && base[1] != 0 &&
            !strstr(raw, ".."))
            return 0; /* relative to a host directory other than "/" */
        memcpy(joined, base, (size_t)bn);
        joined[bn] = '/';
        memcpy(joined + bn + 1, raw, (size_t)n + 1);
        jn = (size_t)bn + 1 + (size_t)n;
    }
    char col[2 * MAXPATH + 4];
    size_t cn = collapse(joined, jn, col);
    if (has_prefix(col, cn, shadow_p, shadow_n)) {
        /* the shadow tree stands for the mount */
        size_t rest = cn - shadow_n;
        if (mount_n + rest >= MAXPATH)
            return -ENAMETOOLONG;
        memcpy(key, mount_p, mount_n);
        memcpy(key + mount_n, col + shadow_n, rest + 1);
        return (long)(mount_n + rest);
    }
    if (!has_prefix(col, cn, mount_p, mount_n)) {
        if (!strstr(col, "/.."))
            return 0;
        cn = lexnorm(col, cn);
        if (!has_prefix(col, cn, mount_p, mount_n) && !has_prefix(col, cn, shadow_p, shadow_n))
            return 0;
        if (has_prefix(col, cn, shadow_p, shadow_n)) {
            size_t rest = cn - shadow_n;
            memmove(col + mount_n, col + shadow_n, rest + 1);
            memcpy(col, mount_p, mount_n);
            cn = mount_n + rest;
        }
    }
    if (cn >= MAXPATH)
        return -ENAMETOOLONG;
    memcpy(key, col, cn + 1);
    return (long)cn;
}

/*
 * A host path that reaches the mount through a symlink: a CMSSW work area (full of links
 * into the release), ln -s /cvmfs/..., a site's /opt/exp_soft -> /cvmfs/....  The kernel
 * cannot follow it (there is no /cvmfs here), so when it would fail, resolve the path the way
 * the kernel does, component by component, and if it enters the mount hand back the /cvmfs
 * key.  Costs one stat for every host path (the kernel finds it: done), three for a path
 * missing from an existing host directory, a walk only when a symlink is involved.
 */
static long resolve_into_mount(const char *path, int follow, char *key)
{
    char done[MAXPATH], todo[2 * MAXPATH + 2], link[MAXPATH], next[2 * MAXPATH + 2];
    size_t dn = 0, tn = strlen(path);
    int links = 0;
    if (tn >= sizeof todo)
        return 0;
    memcpy(todo, path, tn + 1);
    done[0] = 0;
    char *c = todo;
    for (;;) {
        while (*c == '/')
            c++;
        if (!*c)
            return 0; /* resolved entirely on the host */
        char *end = strchr(c, '/');
        size_t cn = end ? (size_t)(end - c) : strlen(c);
        const char *rest = end ? end : "";
        int last = !end || !end[strspn(end, "/")];
        if (cn == 1 && c[0] == '.') {
            c += cn;
            continue;
        }
        if (cn == 2 && c[0] == '.' && c[1] == '.') {
            while (dn > 0 && done[dn - 1] != '/')
                dn--;
            if (dn > 0)
                dn--;
            done[dn] = 0;
            c += cn;
            continue;
        }
        if (dn + 1 + cn >= sizeof done)
            return 0;
        done[dn] = '/';
        memcpy(done + dn + 1, c, cn);
        size_t cand = dn + 1 + cn;
        done[cand] = 0;
        if (has_prefix(done, cand, mount_p, mount_n)) {
            int kn = snprintf(next, sizeof next, "%s%s", done, rest);
            if (kn <= 0 || (size_t)kn + 2 > MAXPATH)
                return 0;
            return (long)collapse(next, (size_t)kn, key); /* a trailing '/' stays: a dir */
        }
        struct stat st;
        if (lstat(done, &st) != 0)
            return 0; /* really missing */
        if (!S_ISLNK(st.st_mode) || (last && !follow)) {
            dn = cand;
            c += cn;
            continue;
        }
        if (++links > 40)
            return 0; /* ELOOP: the kernel says so */
        ssize_t ln = readlink(done, link, sizeof link - 1);
        if (ln <= 0)
            return 0;
        link[ln] = 0;
        done[dn] = 0; /* a relative target starts from the link's directory */
        if (link[0] == '/')
            dn = 0, done[0] = 0;
        int nn = snprintf(next, sizeof next, "%s%s", link, rest);
        if (nn <= 0 || (size_t)nn >= sizeof todo)
            return 0;
        memcpy(todo, next, (size_t)nn + 1);
        c = todo;
    }
}

static long via_host_symlink(pid_t tid, tstate_t *t, long dirfd, const char *raw, long n,
                             int follow, char *key)
{
    char base[MAXPATH], path[2 * MAXPATH + 2];
    if (n <= 0)
        return 0;
    if (raw[n - 1] == '/')
        follow = 1; /* "link/" names the directory the link points to, even for lstat */
    if (raw[0] == '/') {
        if (!strncmp(raw, "/proc/", 6) || !strncmp(raw, "/dev/", 5))
            return 0; /* names the caller's own process: not for us to resolve */
        memcpy(path, raw, (size_t)n + 1);
    } else {
        ssize_t bn = dirfd_path(tid, t, dirfd, base, sizeof base);
        if (bn <= 0 || base[0] != '/')
            return 0;
        memcpy(path, base, (size_t)bn);
        path[bn] = '/';
        memcpy(path + bn + 1, raw, (size_t)n + 1);
    }
    struct stat st;
    if ((follow ? stat(path, &st) : lstat(path, &st)) == 0 || errno != ENOENT)
        return 0; /* the kernel finds it (or fails for another reason) */
    if (!follow || lstat(path, &st) != 0) {
        /* missing: from an existing host directory (resolved on the host), it stays so */
        char *slash = strrchr(path, '/');
        if (!slash)
            return 0;
        while (slash > path && slash[-1] == '/')
            slash--;
        char keep = *slash;
        *slash = 0;
        int parent_ok = slash == path || stat(path, &st) == 0;
        *slash = keep;
        if (parent_ok)
            return 0;
    }
    return resolve_into_mount(path, follow, key);
}

/* getxattr/lgetxattr (value of the name asked for) or listxattr/llistxattr (the names) of
 * a /cvmfs entry with published extended attributes, from its CVMFS xattr blob (version 1,
 * count, then key length, value length, key, value): as the kernel answers, a size of 0
 * asks for the length, a smaller buffer is ERANGE, a name it does not have ENODATA. */
static long xattr_answer(pid_t tid, struct user_regs_struct *r, long nr, const action_t *a)
{
    const unsigned char *b = (const unsigned char *)a->bval;
    size_t n = a->blen;
    if (n < 2 || b[0] != 1)
        return -EIO;
    int list = nr == SYS_listxattr || nr == SYS_llistxattr;
    unsigned long buf = list ? r->rsi : r->rdx;
    unsigned long long size = list ? r->rdx : r->r10;
    char name[256], out[255 * 256];
    size_t outn = 0;
    if (!list) {
        long nn = read_string(tid, r->rsi, name, sizeof name);
        if (nn < 0)
            return nn == -ENAMETOOLONG ? -ERANGE : nn;
    }
    for (size_t i = 0, pos = 2; i < b[1]; i++) {
        if (pos + 2 > n || pos + 2 + b[pos] + b[pos + 1] > n)
            return -EIO;
        size_t kl = b[pos], vl = b[pos + 1];
        const unsigned char *k = b + pos + 2, *v = k + kl;
        pos += 2 + kl + vl;
        if (list) {
            memcpy(out + outn, k, kl);
            outn += kl;
            out[outn++] = 0;
        } else if (strlen(name) == kl && memcmp(name, k, kl) == 0) {
            memcpy(out, v, vl);
            outn = vl;
            goto found;
        }
    }
    if (!list)
        return -ENODATA;
found:
    if (size == 0)
        return (long)outn;
    if (size < outn)
        return -ERANGE;
    if (outn && write_mem(tid, buf, out, outn) < 0)
        return -EFAULT;
    return (long)outn;
}
