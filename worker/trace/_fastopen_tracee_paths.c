/*
 * The in-process handler's paths with "//", "." or ".." under the mount, normalized where
 * that names what the kernel would resolve (worker/trace/_fastopen_tracee.c, which #includes
 * this in its one translation unit).
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
 * below which the kernel says ENOTDIR), and never takes out the repository; a path that ends
 * in "/", "." or ".." is left as it is.  Dropping "." is always right: an answer for the
 * result exists only where the names before it are directories.  Why: ld.so looks for
 * libraries along RPATHs such as "$ORIGIN/../lib" (HEP stacks, every manylinux wheel's
 * "$ORIGIN/../../<pkg>.libs"), each probe and open a trap and a Python upcall before.
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
        if (!n || ((dot || dotdot) && !p[i]))
            return 0; /* a trailing "/", "." or ".." */
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
