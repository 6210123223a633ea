/*
 * getdents64 in-process (part of _fastopen_tracee.c's blob: it uses read_dir_link, in_shadow,
 * lookup, copy_words and data_of from there).
 *
 * A /cvmfs directory is read through its mirror in the shadow tree, whose entries have the
 * mirror's inode numbers; each is given the one stat says of its path (its published lstat
 * answer), as the tracer does (worker/trace/trap/dents.c).  Any other directory is the
 * kernel's.  An entry with no answer here is asked of the tracer by an lstat of its path
 * (which traps, and publishes the answer for the next time; an fstatat of the name in the
 * directory where its path is not known here).
 */

/* The published lstat of key[0, kn) (its hash so far: x): its st_ino, or 0. */
static uint64_t published_ino(const char *base, const char *key, unsigned long kn, uint64_t x)
{
    const fo_slot_t *s = lookup(base, FO_LSTAT, key, kn, x);
    if (!s || s->is_path || s->data_len != 144)
        return 0;
    uint64_t ino;
    copy_words(&ino, data_of(base, s) + 8, 8); /* st_ino */
    return ino;
}

/* The hash so far of p[0, n) (as normal_mount_path makes it). */
static uint64_t hash_of(const char *p, unsigned long n, uint64_t x)
{
    for (unsigned long i = 0; i < n; i++)
        x = fo_hash_step(x, (unsigned char)p[i]);
    return x;
}

/* The /cvmfs path of the directory fd (its fstat: st) is the mirror of, in dir: its length;
 * 1: a host directory; 0: not known here.  An open of it published its path with its fstat
 * answer (mirror_dir_path); else /proc names the mirror. */
static unsigned long mirror_path(const char *base, long fd, const uint64_t *st, char *dir,
                                 unsigned long cap)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    unsigned long n = mirror_dir_path(base, st, dir, cap);
    if (n)
        return n;
    long got = read_dir_link(base, fd, dir, cap);
    if (got <= 0 || (unsigned long)got >= cap)
        return 0; /* (perhaps cut short) */
    if (!in_shadow(h, dir, (unsigned long)got))
        return 1;
    return shadow_to_mount(h, dir, (unsigned long)got, cap);
}

/* getdents64(fd, buf, count), made here: the kernel's entries; in a mirror, each named by
 * the inode stat says of its /cvmfs path: its published lstat answer, else the tracer's
 * (an lstat that traps, as the program's own would). */
static long do_getdents(const char *base, const long *a, int *done)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    long cookie = cookie_of(base);
    uint64_t st[18];
    char none = 0, dir[1100];
    *done = 1;
    long r = fo_syscall6(217, a[0], a[1], a[2], 0, 0, cookie);
    if (r <= 0 || !h->shadow_dev ||
        fo_syscall6(262, a[0], (long)&none, (long)st, AT_EMPTY_PATH_, 0, cookie) != 0 ||
        st[0] != h->shadow_dev)
        return r; /* the end, or not the shadow tree's: the kernel's entries */
    unsigned long dn = mirror_path(base, a[0], st, dir, sizeof dir - 256), mn = h->mount_len;
    if (dn == 1)
        return r; /* a host directory on the same file system */
    uint64_t hd = hash_of(dir, dn, FO_HASH_INIT); /* the directory's key, hashed once */
    char *buf = (char *)a[1];
    for (long off = 0; off + 19 < r;) {
        unsigned short reclen = (unsigned short)(buf[off + 16] & 0xff) |
                                (unsigned short)((buf[off + 17] & 0xff) << 8);
        const char *name = buf + off + 19;
        unsigned long kn = dn;
        uint64_t x = hd, ino = 0;
        if (reclen < 20 || off + reclen > r)
            break;
        if (name[0] == '.' && name[1] == '.' && !name[2]) { /* the parent */
            while (kn > 1 && dir[kn - 1] != '/')
                kn--;
            kn -= kn > 1;
            x = hash_of(dir, kn, FO_HASH_INIT);
        } else if (!(name[0] == '.' && !name[1])) {
            dir[kn++] = '/';
            for (unsigned long i = 0; name[i] && kn + 1 < sizeof dir; i++)
                dir[kn++] = name[i];
            x = hash_of(dir + dn, kn - dn, hd);
        }
        if (dn > mn && kn > mn) /* (dn 0: no path known here) */
            ino = published_ino(base, dir, kn, x);
        if (!ino) { /* the tracer's: asked by the path it publishes the answer under */
            char keep = dir[kn];
            dir[kn] = 0;
            long at = dn ? AT_FDCWD_ : a[0], path = dn ? (long)dir : (long)name;
            long c = dn && kn < mn ? cookie : 0; /* (the mount's parent: a host directory) */
            if (fo_syscall6(262, at, path, (long)st, AT_SYMLINK_NOFOLLOW_, 0, c) == 0)
                ino = st[1];
            dir[kn] = keep;
        }
        for (int b = 0; ino && b < 8; b++)
            buf[off + b] = (char)(ino >> (8 * b));
        off += reclen;
    }
    return r;
}
