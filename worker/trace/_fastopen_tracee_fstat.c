/*
 * The in-process handler's stats of open fds (worker/trace/_fastopen_tracee.c, which
 * #includes this in its one translation unit): fstat, and statx with AT_EMPTY_PATH, of the
 * RAM files and shadow directories it and the tracer open, answered as the tracer would (the
 * catalog's stat of the /cvmfs path); a host fd's is the kernel's own.
 */

#define FSTAT_HOST 1 /* the kernel's answer (*r): not one of ours, or an error */
#define FSTAT_OURS 2 /* a published answer, in st */
/* fstat of fd as the tracer answers it, into st; 0: the tracer's to answer. */
static int fstat_of(const char *base, long fd, uint64_t *st, long *r)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    *r = fo_syscall6(5, fd, (long)st, 0, 0, 0, cookie_of(base));
    uint64_t dev = st[0], ino = st[1];
    uint32_t mode = ((const uint32_t *)st)[6];
    int ours = 0;
    for (int i = 0; i < 4 && h->ram_devs[i]; i++)
        ours |= h->ram_devs[i] == dev;
    int dir = (mode & 0170000) == 0040000; /* a /cvmfs directory's mirror */
    if (*r < 0 || !ours || ((mode & 0170000) != 0100000 && !dir))
        return FSTAT_HOST; /* the tracer would pass it through */
    uint64_t key[2] = {dev, ino}, x = FO_HASH_INIT;
    const unsigned char *kb = (const unsigned char *)key;
    for (int i = 0; i < 16; i++)
        x = fo_hash_step(x, kb[i]);
    const fo_slot_t *s = lookup(base, FO_IDENT, (const char *)key, 16, x);
    if (s && s->data_len) {
        const uint64_t *want = (const uint64_t *)data_of(base, s);
        /* st_size: the same object; a directory: the catalog's stat of its /cvmfs path */
        if (dir ? (((const uint32_t *)want)[6] & 0170000) == 0040000 : want[6] == st[6]) {
            copy_stat(st, want);
            return FSTAT_OURS;
        }
    } else if (!dir) { /* a shared file: the stat of the path opened last */
        const fo_shared_t *e = shared_find(base, dev, ino);
        uint64_t last = e ? __atomic_load_n(&e->last, __ATOMIC_ACQUIRE) : 0;
        uint32_t off = (uint32_t)last;
        if (last && (uint32_t)(last >> 32) == __atomic_load_n(&h->epoch, __ATOMIC_ACQUIRE) &&
            off + 144ul <= FO_ARENA_SIZE && !(off & 7)) {
            const uint64_t *want = (const uint64_t *)(base + FO_ARENA_OFF + off);
            if (want[6] == st[6]) {
                copy_stat(st, want);
                return FSTAT_OURS;
            }
        }
    }
    return 0;
}

/* fstat (newfstatat(fd, "", buf, AT_EMPTY_PATH), glibc's way): the kernel's answer, unless
 * the fd is on a RAM file, whose answer is its path's (published, or the tracer's).  Before
 * the tracer has handed out any RAM file (no device noted: a job's shell before its first
 * /cvmfs call), no fd can be one: the tracer passes every fstat through then (fd_stat). */
static long do_fstat(const char *base, long fd, void *buf, int *done)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    fo_counters_t *cnt = (fo_counters_t *)(base + FO_CNT_OFF);
    if (__atomic_load_n(&h->ram_devs_full, __ATOMIC_ACQUIRE) || !buf)
        return 0;
    long r;
    int how = fstat_of(base, fd, buf, &r);
    if (how == FSTAT_HOST) {
        *done = 1;
        return r;
    }
    if (how == FSTAT_OURS)
        return answered(&cnt->stat_hits, done, 0);
    __atomic_fetch_add(&cnt->stat_misses, 1, __ATOMIC_RELAXED);
    return 0;
}

/* statx(fd, "", AT_EMPTY_PATH) (`empty`: the program's ""): ls -R asks it (STATX_INO) of each
 * directory it lists.  A host fd's is the kernel's own statx (more than fstat says: birth
 * time, attributes). */
static long do_fstatx(const char *base, long fd, const char *empty, long flags, long mask, void *buf,
                      int *done)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    fo_counters_t *cnt = (fo_counters_t *)(base + FO_CNT_OFF);
    if (__atomic_load_n(&h->ram_devs_full, __ATOMIC_ACQUIRE) || !buf ||
        (flags & ~(long)(AT_EMPTY_PATH_ | AT_SYMLINK_NOFOLLOW_ | AT_NO_AUTOMOUNT_ | 0x6000)))
        return 0;
    uint64_t st[18]; /* struct stat */
    long r;
    int how = fstat_of(base, fd, st, &r);
    if (how == FSTAT_HOST) {
        *done = 1;
        return r < 0 ? r : fo_syscall6(332, fd, (long)empty, flags, mask, (long)buf, cookie_of(base));
    }
    if (how == FSTAT_OURS) {
        statx_of(buf, (const char *)st);
        return answered(&cnt->stat_hits, done, 0);
    }
    __atomic_fetch_add(&cnt->stat_misses, 1, __ATOMIC_RELAXED);
    return 0;
}
