/*
 * The in-process handler: open, stat, lstat and fstat answered inside tracees (see
 * _fastopen.h).
 *
 * Not linked into anything: setup.py compiles it freestanding and position-independent and
 * embeds the bytes of its .text in worker.trace._trap, which copies them into the shared memfd
 * that every tracee maps.  So: no libc, no data outside .text, no relocations (setup.py
 * refuses to build if there are any), general registers only.
 *
 * A patched call site jumps to its trampoline, which steps over the red zone and calls
 * fo_entry with the syscall number in rax and the arguments in the syscall registers;
 * fo_entry returns the syscall's result in rax and preserves every other register a
 * syscall preserves, flags included.  What it cannot answer from the table (first calls, writes, relative
 * paths, other flags) is made as it was, and traps to the tracer as before.
 */
#include "_fastopen.h"

static long fo_main(const char *base, long nr, const long *a)
    __attribute__((used, noinline, noclone));

__asm__(".text\n"
        ".type fo_entry, @function\n"
        "fo_entry:\n"
        "    push %rbp\n"
        "    mov %rsp, %rbp\n"
        "    pushfq\n"                  /* a syscall leaves the flags as they were */
        "    push %r9\n"
        "    push %r8\n"
        "    push %r10\n"
        "    push %rdx\n"
        "    push %rsi\n"
        "    push %rdi\n"
        "    mov %rsp, %rdx\n"        /* a: rdi rsi rdx r10 r8 r9 */
        "    mov %rax, %rsi\n"        /* nr */
        "    lea fo_entry(%rip), %rdi\n" /* base: the blob starts here */
        "    and $-16, %rsp\n"
        "    cld\n"                     /* the C ABI's direction */
        "    call fo_main\n"
        "    lea -56(%rbp), %rsp\n"
        "    pop %rdi\n"
        "    pop %rsi\n"
        "    pop %rdx\n"
        "    pop %r10\n"
        "    pop %r8\n"
        "    pop %r9\n"
        "    popfq\n"
        "    pop %rbp\n"
        "    ret\n");

static inline __attribute__((always_inline)) long fo_syscall6(long nr, long a, long b, long c, long d, long e, long f)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

/* The path, if it is "<mount>/..." already in normal form (no "//", ".", "..", trailing
 * "/"): the tracer publishes keys in that form.  Returns its length (and its hash so far),
 * or 0. */
static unsigned long normal_mount_path(const fo_hdr_t *h, const char *p, uint64_t *hash)
{
    uint64_t x = FO_HASH_INIT;
    unsigned long i = 0, m = h->mount_len;
    for (; i < m; i++) {
        if (p[i] != h->mount[i])
            return 0;
        x = fo_hash_step(x, (unsigned char)p[i]);
    }
    for (;; i++) {
        char c = p[i];
        if (c == 0)
            break;
        if (i >= 4000)
            return 0;
        if (c == '/') {
            char n = p[i + 1];
            if (n == 0 || n == '/')
                return 0;
            if (n == '.' && (p[i + 2] == 0 || p[i + 2] == '/' ||
                             (p[i + 2] == '.' && (p[i + 3] == 0 || p[i + 3] == '/'))))
                return 0;
        } else if (i == m) {
            return 0; /* "/cvmfsx" */
        }
        x = fo_hash_step(x, (unsigned char)c);
    }
    if (i <= m + 1)
        return 0; /* "/cvmfs" itself: the tracer's */
    *hash = x;
    return i;
}

/* The live slot answering (kind, key), or NULL. */
static const fo_slot_t *lookup(const char *base, unsigned kind, const char *key,
                               unsigned long len, uint64_t partial)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    unsigned bits = __atomic_load_n(&h->slot_bits, __ATOMIC_ACQUIRE);
    if (bits < FO_MIN_BITS || bits > FO_MAX_BITS)
        return 0;
    const fo_slot_t *slots = (const fo_slot_t *)(base + FO_TABLE_OFF(bits));
    const unsigned long mask = (1ul << bits) - 1;
    const char *arena = base + FO_ARENA_OFF;
    uint64_t hash = fo_hash_finish(partial, kind);
    uint32_t epoch = __atomic_load_n(&h->epoch, __ATOMIC_ACQUIRE);
    for (unsigned long i = hash & mask, k = 0; k <= mask; i = (i + 1) & mask, k++) {
        const fo_slot_t *s = &slots[i];
        uint64_t sh = __atomic_load_n(&s->hash, __ATOMIC_ACQUIRE);
        if (sh == 0)
            return 0;
        if (sh != hash || s->key_len != len || s->kind != kind ||
            __atomic_load_n(&s->epoch, __ATOMIC_ACQUIRE) != epoch)
            continue;
        const char *k2 = arena + s->key_off;
        unsigned long j = 0;
        while (j < len && k2[j] == key[j])
            j++;
        if (j == len)
            return s;
    }
    return 0;
}

static void copy_words(void *dst, const void *src, unsigned long n)
{
    uint64_t *d = dst;
    const uint64_t *q = src;
    for (unsigned long i = 0; i < n / 8; i++)
        d[i] = q[i];
}
#define copy_stat(d, s) copy_words(d, s, 144) /* sizeof(struct stat) on x86_64 */

#define AT_FDCWD_ -100
#define AT_SYMLINK_NOFOLLOW_ 0x100
#define AT_NO_AUTOMOUNT_ 0x800
#define AT_EMPTY_PATH_ 0x1000
#define ENOENT_ 2
#define O_NOFOLLOW_ 0400000
#define S_IFMT_ 0170000
#define S_IFDIR_ 0040000
#define S_IFLNK_ 0120000

/* The live answer of this kind for a path under the mount in normal form, or NULL; a path
 * the tracer publishes no answers for (*published = 0) is not a miss. */
static const fo_slot_t *find(const char *base, unsigned kind, const char *path, int *published)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    uint64_t x;
    unsigned long len = path ? normal_mount_path(h, path, &x) : 0;
    *published = len != 0;
    return len ? lookup(base, kind, path, len, x) : 0;
}

static const char *data_of(const char *base, const fo_slot_t *s)
{
    return base + FO_ARENA_OFF + s->data_off;
}

static long cookie_of(const char *base)
{
    return (long)((const fo_hdr_t *)(base + FO_HDR_OFF))->cookie;
}

/* Count an answer given here (or a miss), and return it. */
static long answered(uint64_t *counter, int *done, long r)
{
    __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
    *done = 1;
    return r;
}

static void missed(uint64_t *counter, int published)
{
    if (published)
        __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
}

/* Does `path` (under the mount, in normal form) not exist: is one of its names, from the
 * top, one that its directory does not have?  Only for a directory published as listed, which
 * the tracer does after each of its names (worker/trace/trap/put.c, put_one): then ENOENT, as
 * the tracer would derive it, with no stop.  Any level counts, not only the last: ld.so looks
 * for libraries in directories that do not exist ("<lib dir>/glibc-hwcaps/x86-64-v4/..."). */
static int absent(const char *base, const char *path)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    uint64_t x;
    unsigned long len = normal_mount_path(h, path, &x), i = 0;
    if (!len)
        return 0;
    uint64_t d = FO_HASH_INIT; /* of path[0, i) */
    for (; i <= h->mount_len; i++)
        d = fo_hash_step(d, (unsigned char)path[i]);
    while (i < len && path[i] != '/') /* /cvmfs/<name>: the repositories, never listed */
        d = fo_hash_step(d, (unsigned char)path[i++]);
    while (i < len) { /* path[i] == '/': path[0, i) a directory that may be listed */
        unsigned long j = i + 1;
        uint64_t e = fo_hash_step(d, '/');
        while (j < len && path[j] != '/')
            e = fo_hash_step(e, (unsigned char)path[j++]);
        if (lookup(base, FO_LISTED, path, i, d) && !lookup(base, FO_NAMED, path, j, e))
            return 1;
        d = e;
        i = j;
    }
    return 0;
}

#define NOT_TRIED (-4096L)

/* A target in one of the RAM file directories ("<dir>/<name>"), opened with openat on this
 * process's own fd of it (fo_priv_t) instead of through /proc; NOT_TRIED where that does
 * not apply.  The program may have closed that fd, or put something else at its number:
 * what opened is kept only if it is a regular file of one of our RAM file systems, whose
 * names are never reused for other bytes; anything else goes through /proc as before. */
static long open_in_dir(const char *base, const char *t, long fl, long mode, uint64_t *id)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    const fo_priv_t *pv = (const fo_priv_t *)(base + FO_SIZE);
    for (int i = 0; i < FO_DIRS; i++) {
        unsigned long n = __atomic_load_n(&h->dir_len[i], __ATOMIC_ACQUIRE), j = 0;
        if (!n || pv->dir_fd[i] < 0)
            continue;
        while (j < n && t[j] == h->dirs[i][j])
            j++;
        if (j < n || t[n] != '/')
            continue;
        long fd = fo_syscall6(257, pv->dir_fd[i], (long)(t + n + 1), fl, mode, 0, cookie_of(base));
        if (fd < 0)
            return fd == -ENOENT_ ? fd : NOT_TRIED;
        uint64_t st[18]; /* struct stat */
        int ours = 0;
        if (fo_syscall6(5, fd, (long)st, 0, 0, 0, cookie_of(base)) == 0 &&
            (((const uint32_t *)st)[6] & 0170000) == 0100000)
            for (int k = 0; k < 4 && h->ram_devs[k]; k++)
                ours |= h->ram_devs[k] == st[0];
        if (ours) {
            id[0] = st[0];
            id[1] = st[1];
            return fd;
        }
        fo_syscall6(3, fd, 0, 0, 0, 0, 0);
        return NOT_TRIED;
    }
    return NOT_TRIED;
}

/* open/openat of a published path: open its target here */
/* The entry of a shared file (fo_shared_t), or 0. */
static fo_shared_t *shared_find(const char *base, uint64_t dev, uint64_t ino)
{
    fo_shared_t *t = (fo_shared_t *)(base + FO_SHARED_OFF);
    for (unsigned long i = fo_file_hash(dev, ino) & (FO_NSHARED - 1), c = 0;
         c < FO_NSHARED / 2; i = (i + 1) & (FO_NSHARED - 1), c++) {
        uint64_t e = __atomic_load_n(&t[i].ino, __ATOMIC_ACQUIRE);
        if (!e)
            return 0;
        if (e == ino && t[i].dev == dev)
            return &t[i];
    }
    return 0;
}

/* An open of a shared file (stat_at) done here: the file's fstat says this path's stat now,
 * as after the tracer's open.  0 if that could not be recorded (the fd is then closed and the
 * open left to the tracer). */
static int opened_shared(const char *base, const fo_slot_t *s, long fd, uint64_t *id)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    if (!id[1]) { /* opened through /proc: which file? */
        uint64_t st[18];
        if (fo_syscall6(5, fd, (long)st, 0, 0, 0, cookie_of(base)) != 0)
            return 0;
        id[0] = st[0];
        id[1] = st[1];
    }
    fo_shared_t *e = shared_find(base, id[0], id[1]);
    uint32_t epoch = __atomic_load_n(&h->epoch, __ATOMIC_ACQUIRE);
    if (!e || s->epoch != epoch)
        return 0;
    __atomic_store_n(&e->last, (uint64_t)epoch << 32 | (s->data_off + s->stat_at),
                     __ATOMIC_RELEASE);
    return 1;
}

/* O_NOFOLLOW (tar, grep -r, cp -r, find -exec open so): where the path's published lstat
 * answer is no symlink, the open is the one without it; a symlink's is ELOOP, the tracer's. */
static long refused_flags(const char *base, const char *path, long fl)
{
    long refused = fl & FO_REFUSE & ~(long)O_NOFOLLOW_;
    if (refused || !(fl & O_NOFOLLOW_))
        return refused;
    int published = 0;
    const fo_slot_t *l = find(base, FO_LSTAT, path, &published);
    if (l && l->data_len &&
        (l->is_path || (*(const uint32_t *)(data_of(base, l) + 24) & S_IFMT_) != S_IFLNK_))
        return 0;
    return O_NOFOLLOW_;
}

static long do_open(const char *base, const char *path, long fl, long mode, int *done)
{
    fo_counters_t *cnt = (fo_counters_t *)(base + FO_CNT_OFF);
    int published = 0;
    long refused = refused_flags(base, path, fl);
    const fo_slot_t *s = refused ? 0 : find(base, FO_OPEN, path, &published);
    if (s && !s->data_len) /* a path that does not exist */
        return answered(&cnt->hits, done, -(long)s->err);
    if (s && s->is_path) {
        uint64_t id[2] = {0, 0};
        const char *t = data_of(base, s); /* a RAM file's /proc link is no symlink here */
        int proc = t[1] == 'p' && t[2] == 'r' && t[3] == 'o' && t[4] == 'c' && t[5] == '/';
        long tfl = proc ? fl & ~(long)O_NOFOLLOW_ : fl;
        long r = open_in_dir(base, t, tfl, mode, id);
        if (r == -ENOENT_ || r == NOT_TRIED)
            r = fo_syscall6(257, AT_FDCWD_, (long)t, tfl, mode, 0, cookie_of(base));
        if (r >= 0 && s->stat_at && !opened_shared(base, s, r, id)) {
            fo_syscall6(3, r, 0, 0, 0, 0, 0);
            r = -ENOENT_; /* (not answered: the tracer's) */
        }
        if (r != -ENOENT_) /* ENOENT: evicted meanwhile; the tracer fetches it again */
            return answered(&cnt->hits, done, r);
    }
    if (!s && published && !refused && absent(base, path))
        return answered(&cnt->hits, done, -ENOENT_);
    missed(&cnt->misses, published);
    return 0;
}

/* stat/lstat/newfstatat of a published path: its answer, written here */
static long do_stat(const char *base, const char *path, void *buf, long flags, int *done)
{
    fo_counters_t *cnt = (fo_counters_t *)(base + FO_CNT_OFF);
    int published = 0;
    unsigned kind = flags & AT_SYMLINK_NOFOLLOW_ ? FO_LSTAT : FO_STAT;
    const fo_slot_t *s = (flags & ~(long)(AT_SYMLINK_NOFOLLOW_ | AT_NO_AUTOMOUNT_)) || !buf
                             ? 0
                             : find(base, kind, path, &published);
    if (!s && published && absent(base, path))
        return answered(&cnt->stat_hits, done, -ENOENT_);
    if (!s) {
        missed(&cnt->stat_misses, published);
        return 0;
    }
    long r = 0;
    if (!s->data_len)
        r = -(long)s->err;
    else if (s->is_path) /* a directory: its mirror in the shadow tree */
        r = fo_syscall6(262, AT_FDCWD_, (long)data_of(base, s), (long)buf, flags, 0,
                        cookie_of(base));
    else
        copy_stat(buf, data_of(base, s));
    return answered(&cnt->stat_hits, done, r);
}

/* The statx answer of a published struct stat, as the tracer's fill_statx makes it (one
 * published answer serves stat and statx alike).  x86-64 layouts; _fastopen.c asserts them. */
static void statx_of(char *x, const char *st)
{
    uint64_t *w = (uint64_t *)x;
    for (int i = 0; i < 32; i++) /* 256 bytes */
        w[i] = 0;
    uint64_t dev = *(const uint64_t *)st, rdev = *(const uint64_t *)(st + 40);
    *(uint32_t *)x = 0x7ff;           /* stx_mask: STATX_BASIC_STATS */
    /* stx_attributes_mask as FUSE says it (AUTOMOUNT, MOUNT_ROOT, DAX), and MOUNT_ROOT on a
     * repository's root (inode 256, as the tracer's fill_statx) */
    *(uint64_t *)(x + 56) = 0x203000;
    if (*(const uint64_t *)(st + 8) == 256 && (*(const uint32_t *)(st + 24) & 0170000) == 0040000)
        *(uint64_t *)(x + 8) = 0x2000;
    *(uint32_t *)(x + 4) = 4096;      /* stx_blksize */
    *(uint32_t *)(x + 16) = (uint32_t)*(const uint64_t *)(st + 16); /* stx_nlink */
    *(uint32_t *)(x + 20) = *(const uint32_t *)(st + 28); /* stx_uid */
    *(uint32_t *)(x + 24) = *(const uint32_t *)(st + 32); /* stx_gid */
    *(uint16_t *)(x + 28) = (uint16_t)*(const uint32_t *)(st + 24); /* stx_mode */
    *(uint64_t *)(x + 32) = *(const uint64_t *)(st + 8);  /* stx_ino */
    *(uint64_t *)(x + 40) = *(const uint64_t *)(st + 48); /* stx_size */
    *(uint64_t *)(x + 48) = *(const uint64_t *)(st + 64); /* stx_blocks */
    *(int64_t *)(x + 64) = *(const int64_t *)(st + 72); /* atime (no tables: no .rodata) */
    *(uint32_t *)(x + 72) = (uint32_t)*(const int64_t *)(st + 80);
    *(int64_t *)(x + 96) = *(const int64_t *)(st + 104); /* ctime */
    *(uint32_t *)(x + 104) = (uint32_t)*(const int64_t *)(st + 112);
    *(int64_t *)(x + 112) = *(const int64_t *)(st + 88); /* mtime */
    *(uint32_t *)(x + 120) = (uint32_t)*(const int64_t *)(st + 96);
    /* glibc's major() and minor() */
    *(uint32_t *)(x + 128) = (uint32_t)(((rdev >> 8) & 0xfff) | ((rdev >> 32) & ~0xfffull));
    *(uint32_t *)(x + 132) = (uint32_t)((rdev & 0xff) | ((rdev >> 12) & ~0xffull));
    *(uint32_t *)(x + 136) = (uint32_t)(((dev >> 8) & 0xfff) | ((dev >> 32) & ~0xfffull));
    *(uint32_t *)(x + 140) = (uint32_t)((dev & 0xff) | ((dev >> 12) & ~0xffull));
}

/* statx of a published path: from its struct stat (the mask asked for does not matter: the
 * tracer always answers STATX_BASIC_STATS) */
static long do_statx(const char *base, const char *path, long flags, long mask, void *buf,
                     int *done)
{
    fo_counters_t *cnt = (fo_counters_t *)(base + FO_CNT_OFF);
    int published = 0;
    unsigned kind = flags & AT_SYMLINK_NOFOLLOW_ ? FO_LSTAT : FO_STAT;
    const fo_slot_t *s = (flags & ~(long)(AT_SYMLINK_NOFOLLOW_ | AT_NO_AUTOMOUNT_ | 0x6000)) ||
                                 !buf
                             ? 0
                             : find(base, kind, path, &published);
    if (s && s->data_len && !s->is_path && s->data_len != 144)
        s = 0; /* not a struct stat: the tracer's */
    else if (!s && published && absent(base, path))
        return answered(&cnt->stat_hits, done, -ENOENT_);
    if (!s) {
        missed(&cnt->stat_misses, published);
        return 0;
    }
    long r = 0;
    if (!s->data_len)
        r = -(long)s->err;
    else if (s->is_path)
        r = fo_syscall6(332, AT_FDCWD_, (long)data_of(base, s), flags, mask, (long)buf,
                        cookie_of(base));
    else
        statx_of(buf, data_of(base, s));
    return answered(&cnt->stat_hits, done, r);
}

/* The st_mode of a published stat answer of this kind (FO_STAT, FO_LSTAT) for a path, or 0. */
static unsigned stat_mode(const char *base, unsigned kind, const char *path)
{
    int published = 0;
    const fo_slot_t *s = find(base, kind, path, &published);
    if (!s || s->is_path || s->data_len != 144)
        return 0;
    return ((const uint32_t *)data_of(base, s))[6];
}


/* access(2) from a published stat, as the tracer answers it (worker/trace/trap/upcall.c,
 * derived): the caller is shown as the owner of every entry; writes are EROFS. */
static long access_of(const char *base, unsigned mode, long want)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    if (want & 2)
        return -30; /* EROFS */
    int ok;
    if ((want & 1) && !(mode & 0111) && (mode & S_IFMT_) != S_IFDIR_)
        ok = 0;
    else if (h->uid == 0)
        ok = !((want & 1) && !(mode & 0111));
    else {
        unsigned bits = (want & 4 ? 4u : 0u) | (want & 1 ? 1u : 0u);
        ok = ((mode >> 6) & bits) == bits;
    }
    return ok ? 0 : -13; /* EACCES */
}

/* access/faccessat/faccessat2 of a published path: its answer (0 or an errno) */
static long do_access(const char *base, const char *path, long mode, long nofollow, int *done)
{
    fo_counters_t *cnt = (fo_counters_t *)(base + FO_CNT_OFF);
    int published = 0;
    unsigned kind = FO_ACCESS + (unsigned)(mode & 7) + (nofollow ? 8 : 0);
    const fo_slot_t *s = mode & ~7L ? 0 : find(base, kind, path, &published);
    if (!s && !(mode & ~7L)) {
        unsigned m = stat_mode(base, nofollow ? FO_LSTAT : FO_STAT, path);
        if (m)
            return answered(&cnt->stat_hits, done, access_of(base, m, mode));
        if (published && absent(base, path))
            return answered(&cnt->stat_hits, done, -ENOENT_);
    }
    if (!s) {
        missed(&cnt->stat_misses, published);
        return 0;
    }
    long r = s->is_path ? fo_syscall6(269, AT_FDCWD_, (long)data_of(base, s), mode, 0, 0,
                                      cookie_of(base))
                        : -(long)s->err;
    return answered(&cnt->stat_hits, done, r);
}

/* Is it a user.* attribute's name (no string constants in the handler: no .rodata) */
static int user_name(const char *n)
{
    return n && n[0] == 'u' && n[1] == 's' && n[2] == 'e' && n[3] == 'r' && n[4] == '.';
}

/* getxattr/lgetxattr (any name) and listxattr/llistxattr of a published path that has no
 * extended attributes: its errno (ENODATA), or an empty list */
static long do_xattr(const char *base, unsigned kind, const char *path, int *done)
{
    fo_counters_t *cnt = (fo_counters_t *)(base + FO_CNT_OFF);
    int published = 0;
    const fo_slot_t *s = find(base, kind, path, &published);
    if (!s && published) { /* an entry of a directory published as having no xattrs */
        unsigned m = stat_mode(base, FO_LSTAT, path);
        unsigned long slash = 0;
        uint64_t x = FO_HASH_INIT;
        for (unsigned long i = 0; path[i]; i++)
            if (path[i] == '/')
                slash = i;
        for (unsigned long i = 0; i < slash; i++)
            x = fo_hash_step(x, (unsigned char)path[i]);
        if (m && ((kind & 1) || (m & S_IFMT_) != S_IFLNK_) &&
            lookup(base, FO_NOXATTR, path, slash, x))
            return answered(&cnt->stat_hits, done, kind < FO_XATTR_LIST ? -61 /* ENODATA */ : 0);
        if (!m && absent(base, path))
            return answered(&cnt->stat_hits, done, -ENOENT_);
    }
    if (!s || s->is_path || s->data_len) {
        missed(&cnt->stat_misses, published);
        return 0;
    }
    return answered(&cnt->stat_hits, done, -(long)s->err);
}

/* readlink/readlinkat of a published path: the link's bytes, or its errno */
static long do_readlink(const char *base, const char *path, char *buf, long size, int *done)
{
    fo_counters_t *cnt = (fo_counters_t *)(base + FO_CNT_OFF);
    int published = 0;
    const fo_slot_t *s = size <= 0 || !buf ? 0 : find(base, FO_READLINK, path, &published);
    if (!s && published && absent(base, path))
        return answered(&cnt->stat_hits, done, -ENOENT_);
    if (!s || s->is_path) {
        missed(&cnt->stat_misses, published);
        return 0;
    }
    long n = s->data_len < (unsigned long)size ? (long)s->data_len : size;
    const char *q = data_of(base, s);
    for (long i = 0; i < n; i++)
        buf[i] = q[i];
    return answered(&cnt->stat_hits, done, s->data_len ? n : -(long)s->err);
}

#include "_fastopen_tracee_fstat.c"

/* fo_priv_t's fds: one O_PATH fd per RAM file directory, high in the fd table (from 3/4 of
 * the soft RLIMIT_NOFILE, at most 768), where a program's own opens seldom reach; close-on-
 * exec, as the next image gets its own. */
static inline __attribute__((always_inline)) void open_dirs(const char *base, fo_priv_t *pv,
                                                            fo_setup_t *a)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    unsigned long lim[2] = {0, 0};
    long from = 0;
    if (fo_syscall6(97 /* getrlimit */, 7 /* RLIMIT_NOFILE */, (long)lim, 0, 0, 0, 0) == 0)
        from = lim[0] >= 1024 ? 768 : (long)(lim[0] / 4 * 3);
    for (int i = 0; i < FO_DIRS; i++) {
        pv->dir_fd[i] = -1;
        a->dir_fd[i] = -1;
        if (!h->dir_len[i] || from < 16)
            continue;
        long d = fo_syscall6(257, AT_FDCWD_, (long)h->dirs[i],
                             010000000 | 0200000 | 02000000 /* O_PATH|O_DIRECTORY|O_CLOEXEC */,
                             0, 0, (long)a->cookie);
        long n = d < 0 ? d : fo_syscall6(72 /* fcntl */, d, 1030 /* F_DUPFD_CLOEXEC */, from,
                                         0, 0, 0);
        if (d >= 0)
            fo_syscall6(3, d, 0, 0, 0, 0, 0);
        a->dir_fd[i] = n;
        if (n >= 0)
            pv->dir_fd[i] = (int32_t)n;
    }
}

/*
 * Run once per exec'd image, before its first instruction: the tracer copies these bytes over
 * the image's entry point, points rdi at a fo_setup_t and resumes it; this maps the memfd and
 * the trampoline area and stops at the int3, where the tracer reads the results and puts the
 * entry point back.  One round trip instead of one per call.  Only its own bytes are copied:
 * everything it calls must be inlined (always_inline), never a call into the rest of the blob.
 */
__attribute__((used, noinline, noclone)) static void fo_setup(fo_setup_t *a)
{
    long fd = fo_syscall6(257, AT_FDCWD_, (long)a->path, 02 | 02000000 /* O_RDWR|O_CLOEXEC */,
                          0, 0, (long)a->cookie);
    a->fd = fd;
    if (fd >= 0) {
        long base = fo_syscall6(9, 0, (long)(FO_SIZE + FO_TRAMP_SIZE), 5 /* PROT_READ|EXEC */,
                                1 /* MAP_SHARED */, fd, 0);
        a->base = base;
        if ((unsigned long)base < -4096UL) {
            a->tramp = fo_syscall6(9, base + (long)FO_SIZE, (long)FO_TRAMP_SIZE,
                                   3 /* PROT_READ|WRITE, until fo_priv_t is written */,
                                   0x32 /* MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED */, -1, 0);
            a->prot = fo_syscall6(10, base + (long)FO_HDR_OFF, (long)(FO_SIZE - FO_HDR_OFF),
                                  1 /* PROT_READ */, 0, 0, 0);
            a->counters = fo_syscall6(9, base + (long)FO_CNT_OFF, (long)FO_RW_SIZE,
                                      3 /* PROT_READ|WRITE */, 0x11 /* MAP_SHARED|MAP_FIXED */,
                                      fd, (long)FO_CNT_OFF);
            if (a->tramp == base + (long)FO_SIZE) {
                open_dirs((const char *)base, (fo_priv_t *)(base + FO_SIZE), a);
                a->tprot = fo_syscall6(10, base + (long)FO_SIZE, (long)FO_TRAMP_SIZE,
                                       5 /* PROT_READ|EXEC */, 0, 0, 0);
            }
        }
        fo_syscall6(3, fd, 0, 0, 0, 0, 0);
    }
    __asm__ volatile("int3" ::: "memory");
    for (;;)
        __asm__ volatile("" ::: "memory"); /* never resumed past the int3 */
}

/* getcwd(buf, size): the kernel's answer, unless the cwd is in the shadow tree, which stands
 * for the same place under the mount (as the tracer answers it:
 * worker/trace/trap/seccomp_stop.c, C_GETCWD). */
#include "_fastopen_tracee_host.c"

/* The path argument of the calls fo_main handles, or NULL. */
static int path_arg(long nr)
{
    switch (nr) {
    case 2: case 4: case 6: case 21: case 89: case 191: case 192: case 194: case 195:
        return 0;
    case 257: case 262: case 267: case 269: case 332: case 439:
        return 1;
    default:
        return -1;
    }
}

static const char *path_of(long nr, const long *a)
{
    int k = path_arg(nr);
    return k < 0 ? 0 : (const char *)a[k];
}

#include "_fastopen_tracee_paths.c"
#include "_fastopen_tracee_writes.c"
#include "_fastopen_tracee_dents.c"

static long dispatch(const char *base, long nr, const long *a, int *done);

/* A call whose path under the mount is not in normal form, answered with it normalized
 * (where it can be: *done); else the tracer's, with the path as the program gave it. */
static __attribute__((noinline)) long dispatch_normalized(const char *base, long nr,
                                                          const long *a, int *done)
{
    const char *p = path_of(nr, a);
    char out[1024];
    if (!p || (nr == 262 && (a[3] & AT_EMPTY_PATH_)) || !normalized(base, p, out, sizeof out))
        return 0;
    long b[6] = {a[0], a[1], a[2], a[3], a[4], a[5]};
    b[path_arg(nr)] = (long)out;
    return dispatch(base, nr, b, done);
}

/* A host path (`where`: absolute, the program's own `a` may say it relatively): made here,
 * with the cookie (none of these calls has a sixth argument), as the tracer would let it
 * through (*done).  ENOENT and ENOTDIR are asked again where a host symlink may lead into the
 * mount (host_missing): the tracer then follows it there (the kernel cannot), and a write
 * through one must fail with EROFS, not create anything. */
static long host_call(const char *base, long nr, const long *a, const char *where, int *done)
{
    long oflags = nr == 2 ? a[1] : nr == 257 ? a[2] : 0;
    if ((oflags & FO_REFUSE_HOST) || !host_path(base, where))
        return 0;
    if (oflags & FO_REFUSE)
        return host_open_written(base, nr, a, where, done);
    long r = fo_syscall6(nr, a[0], a[1], a[2], a[3], a[4], cookie_of(base));
    if ((r != -ENOENT_ && r != -20 /* ENOTDIR */) || host_missing(base, nr, a, where, r)) {
        __atomic_fetch_add(&((fo_counters_t *)(base + FO_CNT_OFF))->host, 1, __ATOMIC_RELAXED);
        *done = 1;
    }
    return r;
}

/* A relative path (to the cwd, or to the call's dirfd): answered as its absolute form
 * (absolute_of) would be, a host one made as the program gave it. */
static __attribute__((noinline)) long relative_call(const char *base, long nr, const long *a,
                                                     const char *p, int *done)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    char abs[1024], none = 0;
    long dirfd = path_arg(nr) == 1 ? (long)(int)a[0] : AT_FDCWD_;
    long oflags = nr == 2 ? a[1] : nr == 257 ? a[2] : 0;
    uint64_t st[18]; /* the directory's fstat */
    int known = h->shadow_len && (dirfd >= 0 || dirfd == AT_FDCWD_) &&
                fo_syscall6(262, dirfd, (long)&none, (long)st, AT_EMPTY_PATH_, 0,
                            cookie_of(base)) == 0;
    if (known && !(oflags & FO_REFUSE) && plain_host_dir(h, st) && plain_relative(h, p))
        return host_direct(base, nr, a, dirfd, p, done);
    if (!absolute_of(base, dirfd, known ? st : 0, p, abs, sizeof abs))
        return 0;
    if (!in_mount(base, abs))
        return host_call(base, nr, a, abs, done);
    long b[6] = {a[0], a[1], a[2], a[3], a[4], a[5]};
    b[path_arg(nr)] = (long)abs;
    long r = dispatch(base, nr, b, done);
    return *done ? r : dispatch_normalized(base, nr, b, done);
}

static long fo_main(const char *base, long nr, const long *a)
{
    int done = 0;
    long r;
    if (nr == 59)
        return host_exec(base, a);
    if (nr == 217) { /* getdents64 */
        r = do_getdents(base, a, &done);
        return done ? r : fo_syscall6(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
    }
    if (path_arg(nr) < 0 && nr != 5 && nr != 79) { /* a write: fchmod, mkdir, rename ... */
        r = host_write(base, nr, a, &done);
        return done ? r : fo_syscall6(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
    }
    r = dispatch(base, nr, a, &done);
    if (!done)
        r = dispatch_normalized(base, nr, a, &done);
    if (done)
        return r;
    const char *p = path_of(nr, a);
    if (p && !(nr == 262 && (a[3] & AT_EMPTY_PATH_)) && !(nr == 332 && (a[2] & AT_EMPTY_PATH_))) {
        r = p[0] == '/' ? host_call(base, nr, a, p, &done) : relative_call(base, nr, a, p, &done);
        if (done)
            return r;
    }
    return fo_syscall6(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
}

/* The calls answered here from the table (*done), or nothing done. */
static long dispatch(const char *base, long nr, const long *a, int *done)
{
    long r = 0;
    switch (nr) {
    case 257: /* openat(dirfd, path, flags, mode): dirfd does not matter for mount paths */
        r = do_open(base, (const char *)a[1], a[2], a[3], done);
        break;
    case 79: /* getcwd(buf, size) */
        r = do_getcwd(base, (char *)a[0], a[1], done);
        break;
    case 2: /* open(path, flags, mode) */
        r = do_open(base, (const char *)a[0], a[1], a[2], done);
        break;
    case 262: /* newfstatat(dirfd, path, buf, flags) */
        if ((a[3] & AT_EMPTY_PATH_) && a[1] && !*(const char *)a[1])
            r = (a[3] & ~(long)(AT_EMPTY_PATH_ | AT_SYMLINK_NOFOLLOW_ | AT_NO_AUTOMOUNT_))
                    ? 0
                    : do_fstat(base, a[0], (void *)a[2], done);
        else
            r = do_stat(base, (const char *)a[1], (void *)a[2], a[3], done);
        break;
    case 4: /* stat(path, buf) */
        r = do_stat(base, (const char *)a[0], (void *)a[1], 0, done);
        break;
    case 6: /* lstat(path, buf) */
        r = do_stat(base, (const char *)a[0], (void *)a[1], AT_SYMLINK_NOFOLLOW_, done);
        break;
    case 5: /* fstat(fd, buf) */
        r = do_fstat(base, a[0], (void *)a[1], done);
        break;
    case 332: /* statx(dirfd, path, flags, mask, buf) */
        if ((a[2] & AT_EMPTY_PATH_) && a[1] && !*(const char *)a[1])
            r = do_fstatx(base, a[0], (const char *)a[1], a[2], a[3], (void *)a[4], done);
        else
            r = do_statx(base, (const char *)a[1], a[2], a[3], (void *)a[4], done);
        break;
    case 89: /* readlink(path, buf, size) */
        r = do_readlink(base, (const char *)a[0], (char *)a[1], a[2], done);
        break;
    case 267: /* readlinkat(dirfd, path, buf, size) */
        r = do_readlink(base, (const char *)a[1], (char *)a[2], a[3], done);
        break;
    case 21: /* access(path, mode) */
        r = do_access(base, (const char *)a[0], a[1], 0, done);
        break;
    case 269: /* faccessat(dirfd, path, mode) */
        r = do_access(base, (const char *)a[1], a[2], 0, done);
        break;
    case 439: /* faccessat2(dirfd, path, mode, flags): AT_EACCESS changes nothing here */
        if (!(a[3] & ~(long)(0x200 | AT_SYMLINK_NOFOLLOW_)))
            r = do_access(base, (const char *)a[1], a[2], a[3] & AT_SYMLINK_NOFOLLOW_, done);
        break;
    case 191: /* getxattr(path, name, value, size) */
    case 192: /* lgetxattr */
        if (!user_name((const char *)a[1])) /* user.*: CernVM-FS's magic ones, the tracer's */
            r = do_xattr(base, FO_XATTR + (unsigned)(nr == 192), (const char *)a[0], done);
        break;
    case 194: /* listxattr(path, list, size) */
    case 195: /* llistxattr */
        r = do_xattr(base, FO_XATTR_LIST + (unsigned)(nr == 195), (const char *)a[0], done);
        break;
    default:
        break;
    }
    return r;
}
