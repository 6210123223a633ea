/*
 * The node's object directory read once: each object's name -> its inode (inodes_find,
 * inodes_clear), for the opens put from the node's answers.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses only
 * what _trap.c's header includes.
 */

/*
 * Every open answer put from the node's table (put_one) needs its object's (device, inode):
 * fstat of an fd on it is answered from them (fstat.c), and a file that serves paths with
 * different answers is told by them.  One fstatat a put open cost ~1.2 µs, most of the work of
 * putting a directory's opens (a warm node's 11,000 objects: ~13 ms, on the path of every call
 * that stopped to put its directory).  One getdents64 pass over the directory gives them all
 * in ~1 ms.  The service never reuses a name (worker/node), so a name found here has this
 * inode for as long as it exists; a name made since is not here (fstatat then), and one
 * removed since fails its open, which the tracer then answers again (stale_open).
 */
typedef struct {
    uint64_t h; /* 0: empty */
    uint64_t ino;
    uint32_t off, len; /* the name in `names` */
} ino_slot_t;

static struct {
    int dirfd;      /* the directory read (-1: none yet) */
    int tried;      /* read, or failed to: not again this run */
    uint64_t dev;   /* its device (every object's) */
    ino_slot_t *t;  /* open addressing, at most half full */
    size_t cap;
    char *names;
    size_t nlen;
} inodes = {-1, 0, 0, NULL, 0, NULL, 0};

/* FNV-1a of a directory path or a name (0 is kept for empty slots); staged.c's and
 * tables.c's too */
static uint64_t dir_hash(const char *d, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)d[i]) * 1099511628211ull;
    return h ? h : 1;
}

static void inodes_clear(void)
{
    free(inodes.t);
    free(inodes.names);
    inodes.t = NULL;
    inodes.names = NULL;
    inodes.cap = inodes.nlen = 0;
    inodes.dirfd = -1;
    inodes.tried = 0;
}

struct linux_dirent64_ {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* Read `dirfd`'s regular files (once a run); 0 if the map is there. */
static int inodes_read(int dirfd)
{
    if (inodes.tried)
        return inodes.t && inodes.dirfd == dirfd ? 0 : -1;
    inodes.tried = 1;
    struct stat ds;
    int fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    char *names = NULL;
    size_t n = 0, room = 0, nlen = 0, nroom = 0;
    uint64_t *inos = NULL;
    char *chunk = malloc(1 << 16);
    int ok = chunk && fstat(fd, &ds) == 0;
    while (ok) {
        long got = syscall(SYS_getdents64, fd, chunk, 1 << 16);
        if (got <= 0) {
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
    ino_slot_t *t = ok ? calloc(cap, sizeof *t) : NULL;
    if (!t) {
        free(inos);
        free(names);
        return -1;
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
    inodes.t = t;
    inodes.cap = cap;
    inodes.names = names;
    inodes.nlen = nlen;
    inodes.dev = (uint64_t)ds.st_dev;
    inodes.dirfd = dirfd;
    return 0;
}

/* The (device, inode) of the regular file `name` in `dirfd` as read at the run's first put
 * open; 0 if it was not there (or the directory could not be read). */
static int inodes_find(int dirfd, const char *name, uint64_t *dev, uint64_t *ino)
{
    if (dirfd < 0 || inodes_read(dirfd) != 0)
        return 0;
    size_t len = strlen(name);
    uint64_t h = dir_hash(name, len);
    for (size_t j = h & (inodes.cap - 1); inodes.t[j].h; j = (j + 1) & (inodes.cap - 1)) {
        const ino_slot_t *s = &inodes.t[j];
        if (s->h == h && s->len == len && memcmp(inodes.names + s->off, name, len) == 0) {
            *dev = inodes.dev;
            *ino = s->ino;
            return 1;
        }
    }
    return 0;
}
