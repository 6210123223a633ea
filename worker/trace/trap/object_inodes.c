/*
 * The node's object directory read once, off the path of any call: each object's name -> its
 * inode (inodes_load, inodes_find, inodes_clear), for the opens put from the node's answers.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses only
 * what _trap.c's header includes.
 */

/*
 * Every open answer put from the node's table (put_one) needs its object's (device, inode):
 * fstat of an fd on it is answered from them (fstat.c), and a file that serves paths with
 * different answers is told by them.  One fstatat a put open cost ~1.2 µs, most of the work of
 * putting a directory's opens (a warm node's 11,000 objects: ~13 ms, on the path of every call
 * that stopped to put its directory).  One getdents64 pass over the directory gives them all,
 * but that pass takes 1-4 ms (8,000 objects), and it was made by the program's first open,
 * which waited for it (3.9 ms, the slowest open of a walk over 8,000 files).  So the thread
 * putting opens ahead (node_dirs.c, opens_main) makes it first; until it is there, inodes_find
 * says "not known" and put_one asks fstatat, as for a name made since.  The
 * service never reuses a name (worker/node), so a name found here has this inode for as long
 * as it exists; one removed since fails its open, which the tracer then answers again
 * (stale_open).
 */
typedef struct {
    uint64_t h; /* 0: empty */
    uint64_t ino;
    uint32_t off, len; /* the name in `names` */
} ino_slot_t;

typedef struct {
    int dirfd;     /* the directory read */
    uint64_t dev;  /* its device (every object's) */
    ino_slot_t *t; /* open addressing, at most half full */
    size_t cap;
    char *names;
} ino_map_t;

static ino_map_t *inodes; /* published whole by inodes_load (release; acquire) */
static int inodes_tried;   /* read, or being read, or failed to: not again this run */
static int inodes_stop;    /* the run ends: stop reading */

/* FNV-1a of a directory path or a name (0 is kept for empty slots); staged.c's and
 * tables.c's too */
static uint64_t dir_hash(const char *d, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)d[i]) * 1099511628211ull;
    return h ? h : 1;
}

/* The end of a run (the thread reading it joined before): the map freed. */
static void inodes_clear(void)
{
    ino_map_t *m = inodes;
    if (m) {
        free(m->t);
        free(m->names);
        free(m);
    }
    inodes = NULL;
    inodes_tried = 0;
    inodes_stop = 0;
}

struct linux_dirent64_ {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* The map of `dirfd`'s regular files, or NULL (told to stop, or out of memory). */
static ino_map_t *inodes_read(int dirfd)
{
    struct stat ds;
    int fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    char *names = NULL;
    size_t n = 0, room = 0, nlen = 0, nroom = 0;
    uint64_t *inos = NULL;
    char *chunk = malloc(1 << 16);
    int ok = chunk && fstat(fd, &ds) == 0;
    while (ok) {
        long got = syscall(SYS_getdents64, fd, chunk, 1 << 16);
        if (got <= 0 || __atomic_load_n(&inodes_stop, __ATOMIC_ACQUIRE)) {
            ok = got == 0;
            break;
        }
        for (long at = 0; at < got;) {
            const struct linux_dirent64_ *d = (const struct linux_dirent64_ *)(chunk + at);
            at += d->d_reclen;
            if (d->d_type != 8 /* DT_REG */ || !d->d_ino)
                continue; /* "." and "..", anything else: fstatat decides */
            if (n == room) {
                room = room ? room * 2 : 4096;
                uint64_t *more = realloc(inos, room * sizeof *inos);
                if (!more) {
                    ok = 0;
                    break;
                }
                inos = more;
            }
            size_t len = strlen(d->d_name) + 1;
            if (nlen + len > nroom) {
                nroom = nroom ? nroom * 2 : 1 << 16;
                char *more = realloc(names, nroom);
                if (!more) {
                    ok = 0;
                    break;
                }
                names = more;
            }
            memcpy(names + nlen, d->d_name, len);
            nlen += len;
            inos[n++] = d->d_ino;
        }
    }
    close(fd);
    free(chunk);
    size_t cap = 1024;
    while (ok && cap < n * 2)
        cap *= 2;
    ino_slot_t *t = ok ? table_calloc(cap, sizeof *t) : NULL;
    ino_map_t *m = t ? malloc(sizeof *m) : NULL;
    if (!m) {
        free(t);
        free(inos);
        free(names);
        return NULL;
    }
    for (size_t i = 0, off = 0; i < n; i++) {
        size_t len = strlen(names + off);
        uint64_t h = dir_hash(names + off, len);
        size_t j = h & (cap - 1);
        while (t[j].h)
            j = (j + 1) & (cap - 1);
        t[j] = (ino_slot_t){h, inos[i], (uint32_t)off, (uint32_t)len};
        off += len + 1;
    }
    free(inos);
    *m = (ino_map_t){dirfd, (uint64_t)ds.st_dev, t, cap, names};
    return m;
}

/* Read `dirfd` (once a run; from the thread putting opens ahead, which needs it most) and
 * publish the map for every put that follows. */
static void inodes_load(int dirfd)
{
    if (__atomic_exchange_n(&inodes_tried, 1, __ATOMIC_ACQ_REL) || dirfd < 0)
        return;
    ino_map_t *m = inodes_read(dirfd);
    if (m)
        __atomic_store_n(&inodes, m, __ATOMIC_RELEASE);
}

/* The (device, inode) of the regular file `name` in `dirfd` as inodes_load read it; 0 if it
 * is not read yet, was not there, or the directory could not be read (put_one: fstatat). */
static int inodes_find(int dirfd, const char *name, uint64_t *dev, uint64_t *ino)
{
    const ino_map_t *m = __atomic_load_n(&inodes, __ATOMIC_ACQUIRE);
    if (!m || dirfd < 0 || m->dirfd != dirfd)
        return 0;
    size_t len = strlen(name);
    uint64_t h = dir_hash(name, len);
    for (size_t j = h & (m->cap - 1); m->t[j].h; j = (j + 1) & (m->cap - 1)) {
        const ino_slot_t *s = &m->t[j];
        if (s->h == h && s->len == len && memcmp(m->names + s->off, name, len) == 0) {
            *dev = m->dev;
            *ino = s->ino;
            return 1;
        }
    }
    return 0;
}
