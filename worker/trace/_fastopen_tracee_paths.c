/*
 * The in-process handler's paths (worker/trace/_fastopen_tracee.c, which #includes this in its
 * one translation unit): those with "//", "." or ".." under the mount, normalized where that
 * names what the kernel would resolve; the working directory and dirfds as /proc spells them,
 * and in the shadow tree as /cvmfs paths (getcwd, relative paths), there from the path its
 * open published (mirror_dir_path), with no readlink.
 */

/* Is the published lstat answer of the path out[0, n) a directory?  A directory's answer is
 * its mirror in the shadow tree (whose type the kernel says) or a struct stat. */
static int published_dir(const char *base, const char *out, unsigned long n)
{
    uint64_t x = FO_HASH_INIT;
    for (unsigned long i = 0; i < n; i++)
        x = fo_hash_step(x, (unsigned char)out[i]);
    const fo_slot_t *s = lookup(base, FO_LSTAT, out, n, x);
    if (!s || !s->data_len)
        return 0;
    if (!s->is_path)
        return s->data_len == 144 &&
               (((const uint32_t *)data_of(base, s))[6] & S_IFMT_) == S_IFDIR_;
    uint64_t st[18]; /* struct stat */
    return fo_syscall6(262, AT_FDCWD_, (long)data_of(base, s), (long)st, AT_SYMLINK_NOFOLLOW_,
                       0, cookie_of(base)) == 0 &&
           (((const uint32_t *)st)[6] & S_IFMT_) == S_IFDIR_;
}

/*
 * "<mount>/<repository>/..." with its "//", "." and ".." taken out, written to out: its
 * length, or 0 where that would not name what the kernel resolves, which is then the
 * tracer's.  A ".." goes with the name before it only where that name is a directory (its
 * published lstat answer says so: no symlink, whose ".." is its target's parent, and no file,
 * below which the kernel says ENOTDIR), and never takes out the repository; a trailing "/"
 * or "." goes only after a directory too (after a file the kernel says ENOTDIR, after a
 * symlink it follows it).  Dropping a "." inside is always right: an answer for the result
 * exists only where the names before it are directories.  Why: ld.so looks for libraries
 * along RPATHs such as "$ORIGIN/../lib" (HEP stacks, every manylinux wheel's
 * "$ORIGIN/../../<pkg>.libs"), each probe and open a trap and a Python upcall before; fts
 * (find, du, grep -r) opens and stats "<dir>/.." on its way back up, and "find ." opens
 * "<cwd>/.", a Python upcall each while a path that ends so was left to the tracer.
 */
static unsigned long normalized(const char *base, const char *p, char *out, unsigned long cap)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    unsigned long m = h->mount_len, o = 0, i = 0, repo = 0, changed = 0;
    for (; i < m; i++) {
        if (p[i] != h->mount[i])
            return 0;
        out[o++] = p[i];
    }
    if (p[i] != '/')
        return 0;
    while (p[i]) { /* p[i] == '/'; never read past 4000 bytes, as normal_mount_path */
        changed |= p[i + 1] == '/';
        while (p[i] == '/' && i < 4000)
            i++;
        unsigned long s = i;
        while (p[i] && p[i] != '/' && i < 4000)
            i++;
        if (i >= 4000)
            return 0;
        unsigned long n = i - s;
        int dot = n == 1 && p[s] == '.', dotdot = n == 2 && p[s] == '.' && p[s + 1] == '.';
        if (!n || (dot && !p[i])) { /* a trailing "/" or "." */
            if (!repo || !published_dir(base, out, o))
                return 0;
            changed = 1;
            break;
        }
        changed |= dot | dotdot;
        if (dot)
            continue;
        if (dotdot) {
            if (!repo || o <= repo || !published_dir(base, out, o))
                return 0;
            while (out[o - 1] != '/')
                o--;
            o--;
            continue;
        }
        if (o + 1 + n >= cap)
            return 0;
        out[o++] = '/';
        for (unsigned long k = s; k < i; k++)
            out[o++] = p[k];
        if (!repo)
            repo = o; /* "<mount>/<repository>": no ".." takes that out */
    }
    out[o] = 0;
    return repo && changed ? o : 0; /* (one in normal form already: the caller's was it) */
}

/* readlink of the calling thread's cwd (dirfd AT_FDCWD) or of its fd `dirfd`, into out. */
static long read_dir_link(const char *base, long dirfd, char *out, unsigned long cap)
{
    volatile uint64_t link[5]; /* "/proc/thread-self/cwd" or ".../fd/<n>": no .rodata here */
    link[0] = 0x68742f636f72702full; /* "/proc/th" */
    link[1] = 0x6c65732d64616572ull; /* "read-sel" */
    link[2] = dirfd == AT_FDCWD_ ? 0x6477632f66ull : 0x2f64662f66ull; /* "f/cwd", "f/fd/" */
    link[3] = link[4] = 0;
    char *l = (char *)link;
    if (dirfd != AT_FDCWD_) {
        char digits[12];
        int nd = 0;
        for (long v = dirfd; nd == 0 || v; v /= 10)
            digits[nd++] = (char)('0' + v % 10);
        for (int k = 0; k < nd; k++)
            l[21 + k] = digits[nd - 1 - k];
    }
    return fo_syscall6(89, (long)l, (long)out, (long)cap, 0, 0, cookie_of(base));
}

/* Is the path out[0, n) (as /proc spells it) in the shadow tree? */
static int in_shadow(const fo_hdr_t *h, const char *out, unsigned long n)
{
    unsigned long m = h->shadow_len, i = 0;
    while (i < m && i < n && out[i] == h->shadow[i])
        i++;
    return i == m && (n == m || out[m] == '/');
}

/* "<shadow>/x" (as /proc spells a path in the shadow tree, n bytes) -> "<mount>/x" in place,
 * in p[0, cap): its length, or 0 where it does not fit. */
static unsigned long shadow_to_mount(const fo_hdr_t *h, char *p, unsigned long n,
                                     unsigned long cap)
{
    unsigned long m = h->shadow_len, mn = h->mount_len, rest = n - m;
    if (mn + rest >= cap)
        return 0;
    if (mn > m)
        for (unsigned long k = rest; k-- > 0;)
            p[mn + k] = p[m + k];
    else
        for (unsigned long k = 0; k < rest; k++)
            p[mn + k] = p[m + k];
    for (unsigned long k = 0; k < mn; k++)
        p[k] = h->mount[k];
    return mn + rest;
}

/* The /cvmfs path of the mirror directory whose fstat is st, into out: its length; 0 if it
 * is no mirror's or none was published.  Whoever opened the mirror published its path with
 * its fstat answer (FO_IDENT: worker/trace/trap/apply.c publish_ident), the directory's own,
 * with no symlink on the way.  Why: /proc's readlink of an fd took ~5 us a call (its path
 * walk through /proc/thread-self), most of a tree walk's time in-process (du, find and tar
 * call fstatat and openat by name in each directory they open). */
static unsigned long mirror_dir_path(const char *base, const uint64_t *st, char *out,
                                     unsigned long cap)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    if (!h->shadow_dev || st[0] != h->shadow_dev ||
        (((const uint32_t *)st)[6] & 0170000) != 0040000)
        return 0;
    const char *id = (const char *)st; /* (st_dev, st_ino): FO_IDENT's key */
    uint64_t x = FO_HASH_INIT;
    for (int i = 0; i < 16; i++)
        x = fo_hash_step(x, (unsigned char)id[i]);
    const fo_slot_t *s = lookup(base, FO_IDENT, id, 16, x);
    if (!s || s->data_len <= 144 + 1)
        return 0;
    const char *p = data_of(base, s) + 144;
    unsigned long n = 0, most = s->data_len - 144;
    while (n < most && n < cap && p[n]) {
        out[n] = p[n];
        n++;
    }
    return n < most && n < cap && n >= h->mount_len ? n : 0;
}

/* mirror_dir_path of the directory dirfd is open on (AT_FDCWD: the cwd). */
static unsigned long mirror_dir_path_of(const char *base, long dirfd, char *out, unsigned long cap)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    uint64_t st[18];
    char none = 0;
    if (!h->shadow_dev ||
        fo_syscall6(262, dirfd, (long)&none, (long)st, AT_EMPTY_PATH_, 0, cookie_of(base)) != 0)
        return 0;
    return mirror_dir_path(base, st, out, cap);
}

static long do_getcwd(const char *base, char *buf, long size, int *done)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    if (!h->shadow_len || !buf || size <= 0)
        return 0;
    char cwd[1100], none = 0;
    uint64_t st[18]; /* the cwd's fstat: a host one's getcwd is the kernel's, with no readlink */
    int known = h->shadow_dev && fo_syscall6(262, AT_FDCWD_, (long)&none, (long)st,
                                             AT_EMPTY_PATH_, 0, cookie_of(base)) == 0;
    if (known && st[0] != h->shadow_dev) {
        *done = 1;
        return fo_syscall6(79, (long)buf, size, 0, 0, 0, cookie_of(base));
    }
    unsigned long pn = known ? mirror_dir_path(base, st, cwd, sizeof cwd) : 0;
    if (!pn) {
        long n = read_dir_link(base, AT_FDCWD_, cwd, sizeof cwd);
        if (n <= 0 || n >= (long)sizeof cwd)
            return 0; /* the tracer's */
        if (!in_shadow(h, cwd, (unsigned long)n)) {
            *done = 1;
            return fo_syscall6(79, (long)buf, size, 0, 0, 0, cookie_of(base));
        }
        if (!(pn = shadow_to_mount(h, cwd, (unsigned long)n, sizeof cwd)))
            return 0;
    }
    *done = 1;
    if (pn + 1 > (unsigned long)size)
        return -34; /* ERANGE */
    for (unsigned long k = 0; k < pn; k++)
        buf[k] = cwd[k];
    buf[pn] = 0;
    return (long)pn + 1;
}

/*
 * A relative path p from the host directory out[0, o): "<dir>/<its names>", its "." and
 * empty components left out ("./x", "a//b": cat, xargs and tar spell paths so), written to
 * out; its length, or 0 for the tracer: a ".." (it may lead into the mount, which the kernel
 * cannot see), a trailing "/" or "." but p == "." (the directory itself: bash stats "." before
 * each search of PATH, find and ls start there), which make the kernel follow a last symlink.
 */
static unsigned long host_joined(const char *p, char *out, unsigned long o, unsigned long cap)
{
    unsigned long i = 0;
    while (p[i]) {
        unsigned long s = i;
        while (p[i] && p[i] != '/')
            i++;
        unsigned long n = i - s;
        int dot = n == 1 && p[s] == '.';
        if ((n == 2 && p[s] == '.' && p[s + 1] == '.') || (dot && !p[i] && s > 0) ||
            (!n && !p[i]))
            return 0;
        while (p[i] == '/')
            i++;
        if (!n || dot)
            continue;
        if (o + 1 + n >= cap || i >= 4000)
            return 0;
        if (o > 1)
            out[o++] = '/'; /* (the root: "/" and the name) */
        for (unsigned long k = s; k < s + n; k++)
            out[o++] = p[k];
    }
    if (i && p[i - 1] == '/')
        return 0; /* a trailing "/" */
    out[o] = 0;
    return o;
}

/*
 * A relative path's absolute form (the calling thread's cwd, or the directory `dirfd` is open
 * on, whose fstat is st if given, then "/" and the path), written to out: its length, or 0
 * where it is not known here
 * (then the call is the tracer's, as before).  A directory in the shadow tree stands for its
 * place under the mount ("<mount>/<repository>/..."; a path from there with "." or ".." is
 * normalized by the caller, or left to the tracer); a host directory as host_joined says.  Why: a program in a build directory (make, a compiler, find, tar) calls stat and
 * open with relative paths, each a trap before, ~5-50 µs against the kernel's ~1 µs.
 */
static unsigned long absolute_of(const char *base, long dirfd, const uint64_t *st, const char *p,
                                 char *out, unsigned long cap)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    if (!h->shadow_len || !p[0] || p[0] == '/' || (dirfd < 0 && dirfd != AT_FDCWD_))
        return 0;
    unsigned long o = st ? mirror_dir_path(base, st, out, cap)
                         : mirror_dir_path_of(base, dirfd, out, cap);
    if (!o) { /* a host directory, or a mirror whose path was not published: as /proc says */
        long n = read_dir_link(base, dirfd, out, cap);
        if (n <= 0 || (unsigned long)n >= cap || out[0] != '/')
            return 0; /* not a path (a pipe, "(unreachable)/..."), or too long */
        if (n >= 10 && out[n - 10] == ' ' && out[n - 9] == '(' && out[n - 1] == ')')
            return 0; /* "... (deleted)": a removed directory (or one named so): the tracer's */
        if (!in_shadow(h, out, (unsigned long)n))
            return host_joined(p, out, (unsigned long)n, cap);
        if (!(o = shadow_to_mount(h, out, (unsigned long)n, cap)))
            return 0;
    }
    if (p[0] == '.' && !p[1]) { /* the directory itself */
        out[o] = 0;
        return o;
    }
    if (o > 1)
        out[o++] = '/'; /* (the root: "/" and the name) */
    for (unsigned long k = 0; p[k]; k++) {
        if (o + 1 >= cap)
            return 0;
        out[o++] = p[k];
    }
    out[o] = 0;
    return o;
}

/* Is st (a directory's fstat) one from which a relative path is made as the program gave it:
 * on a plain host file system other than the shadow tree's, and not one of near_dirs
 * (worker/trace/_fastopen_host_dirs.c)? */
static int plain_host_dir(const fo_hdr_t *h, const uint64_t *st)
{
    int plain = 0;
    if ((((const uint32_t *)st)[6] & 0170000) != 0040000 || !h->shadow_dev ||
        st[0] == h->shadow_dev)
        return 0; /* (a shadow tree that is a plain directory shares its file system) */
    for (int i = 0; i < FO_PLAIN_DEVS && h->plain_devs[i]; i++)
        plain |= h->plain_devs[i] == st[0];
    for (int i = 0; plain && i < FO_NEAR_DIRS && (h->near_dirs[i][0] | h->near_dirs[i][1]); i++)
        plain = h->near_dirs[i][0] != st[0] || h->near_dirs[i][1] != st[1];
    return plain;
}

/* Is the name n[0, k) one a path climbing out of a host directory could reach the tracer's
 * files by: "proc", "dev", "etc" or a name of the mount's path? */
static int tracers_name(const fo_hdr_t *h, const char *n, unsigned long k)
{
    if ((k == 4 && n[0] == 'p' && n[1] == 'r' && n[2] == 'o' && n[3] == 'c') ||
        (k == 3 && ((n[0] == 'd' && n[1] == 'e' && n[2] == 'v') ||
                    (n[0] == 'e' && n[1] == 't' && n[2] == 'c'))))
        return 1;
    for (unsigned long i = 0; i < h->mount_len;) {
        while (i < h->mount_len && h->mount[i] == '/')
            i++;
        unsigned long s = i;
        while (i < h->mount_len && h->mount[i] != '/')
            i++;
        unsigned long m = 0;
        while (m < k && s + m < i && n[m] == h->mount[s + m])
            m++;
        if (m == k && s + m == i)
            return 1;
    }
    return 0;
}

/* A relative path made as given from a plain host directory: plain names (no "..", no
 * trailing "/" or "/."), after any leading ".." (the directory's real ancestors: then none
 * of the names is one tracers_name says), whose last name is not "mtab" (/etc/mtab is the
 * tracer's, however a path reaches it).  Why the leading "..": a build's "../include/x.h"
 * stopped the program every time (13.9 us a stat against 1.4). */
static int plain_relative(const fo_hdr_t *h, const char *p)
{
    unsigned long i = 0, last = 0;
    int up = 0;
    while (p[i] == '.' && p[i + 1] == '.' && (p[i + 2] == '/' || !p[i + 2])) {
        up = 1;
        for (i += 2; p[i] == '/';)
            i++;
    }
    unsigned long first = i;
    while (p[i]) {
        unsigned long s = i;
        while (p[i] && p[i] != '/')
            i++;
        unsigned long n = i - s;
        if ((n == 2 && p[s] == '.' && p[s + 1] == '.') ||
            (n == 1 && p[s] == '.' && !p[i] && s > first) || i >= 4000 ||
            (up && n && tracers_name(h, p + s, n)))
            return 0;
        if (n)
            last = s;
        if (p[i] == '/' && !p[++i])
            return 0; /* a trailing "/" */
    }
    return !(p[last] == 'm' && p[last + 1] == 't' && p[last + 2] == 'a' && p[last + 3] == 'b' &&
             !p[last + 4]);
}

/* A relative call from a plain host directory (plain_host_dir, plain_relative), made as the
 * program gave it, as host_call makes it: an ENOENT or ENOTDIR is asked again where a host
 * symlink may lead into the mount (host_missing, with the path /proc names then, its
 * leading ".." taken out). */
static long host_direct(const char *base, long nr, const long *a, long dirfd, const char *p,
                        int *done)
{
    long r = fo_syscall6(nr, a[0], a[1], a[2], a[3], a[4], cookie_of(base));
    if (r == -ENOENT_ || r == -20 /* ENOTDIR */) {
        char abs[1024];
        long n = read_dir_link(base, dirfd, abs, sizeof abs);
        if (n <= 0 || (unsigned long)n >= sizeof abs || abs[0] != '/' ||
            (n >= 10 && abs[n - 10] == ' ' && abs[n - 9] == '(' && abs[n - 1] == ')'))
            return r; /* the tracer's (*done stays 0): it asks again */
        while (p[0] == '.' && p[1] == '.' && (p[2] == '/' || !p[2])) {
            for (p += 2; *p == '/';) /* a leading "..": the real parent (/proc's path is real) */
                p++;
            while (n > 1 && abs[n - 1] != '/')
                n--;
            n -= n > 1;
        }
        abs[n] = 0;
        if (!host_joined(p, abs, (unsigned long)n, sizeof abs) ||
            !host_missing(base, nr, a, abs, r))
            return r;
    }
    __atomic_fetch_add(&((fo_counters_t *)(base + FO_CNT_OFF))->host, 1, __ATOMIC_RELAXED);
    *done = 1;
    return r;
}

/* Is this absolute path the mount or below it? */
static int in_mount(const char *base, const char *p)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    unsigned long i = 0;
    while (i < h->mount_len && p[i] == h->mount[i])
        i++;
    return i == h->mount_len && (p[i] == '/' || !p[i]);
}
