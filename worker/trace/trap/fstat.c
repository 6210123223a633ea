/*
 * What fstat of a /cvmfs fd says: (device, inode) of each RAM file an open was served from ->
 * the path's stat answer (ids_find, ids_put, ids_claim, ids_clear).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and answers.c define.
 */

/* ---------- what fstat of a /cvmfs file descriptor says ---------- */

/*
 * An open /cvmfs file is one of the cache's RAM files (a memfd, or a file on its private
 * tmpfs: worker/ram/ramfiles.py), whose own fstat shows another inode, device, mode and times
 * than stat of its path; cp and install compare the two and refuse ("replaced while being
 * copied"), cp -p would copy the RAM file's mode and times.  So every open served from a RAM
 * file (a regular file reached through our /proc/<pid>/fd) records its (device, inode) -> the
 * path's stat answer, and fstat of a tracee fd whose target is one of those files gets that
 * answer (several paths with the same content share one file: the one opened last wins).
 */
typedef struct {
    uint64_t dev, ino; /* ino 0 = free */
    int64_t st[15];
    int shared; /* opened under paths with different answers: never opened in-process */
} fdid_t;

static fdid_t *ids;

static void fill_stat(const int64_t *f, struct stat *s);

/* A file found to serve paths with different answers (fdid_t.shared): its in-process answers
 * go, and it becomes one of the table's shared files (fo_shared_t), whose opens are published
 * again each with its path's stat, and whose fstat follows the last open in-process too.
 * `last`: the stat of the path opened last. */
static void share(fdid_t *slot, uint64_t dev, uint64_t ino, const int64_t *last)
{
    struct stat st;
    fill_stat(last, &st);
    slot->shared = 1;
    const char *opens[64];
    size_t lens[64];
    size_t n = fo_withdraw_file(dev, ino, opens, lens, 64);
    if (!fo_shared_add(dev, ino, &st))
        return;
    /* the opens published as a file of its own: again as a shared file's, with the stat the
     * answer cache holds for each (not to stop once more each) */
    for (size_t i = 0; i < n; i++) {
        entry_t *e = cache_get(C_OPEN, 0, opens[i], lens[i], fnv(C_OPEN, 0, opens[i], lens[i]));
        if (!e || e->act.kind != A_REDIRECT || !e->act.bval || e->act.ram_dev != dev ||
            e->act.ram_ino != ino)
            continue;
        struct stat ps;
        fill_stat(e->act.st, &ps);
        fo_publish_shared_open(opens[i], lens[i], e->act.bval, e->act.blen, &ps, dev, ino);
    }
}

/* A shared file opened by the tracer under a path with this answer. */
static void shared_opened(uint64_t dev, uint64_t ino, const int64_t *now)
{
    struct stat st;
    fill_stat(now, &st);
    fo_shared_opened(dev, ino, &st);
}
static size_t ids_cap, ids_len;
#define IDS_MAX (1u << 18) /* forget them all beyond this (a job opening that many files) */

static fdid_t *ids_find(uint64_t dev, uint64_t ino)
{
    if (!ids_cap)
        return NULL;
    size_t mask = ids_cap - 1;
    for (size_t i = fo_file_hash(dev, ino) & mask;;
         i = (i + 1) & mask) {
        if ((ids[i].ino == ino && ids[i].dev == dev) || ids[i].ino == 0)
            return &ids[i];
    }
}

static void ids_put(uint64_t dev, uint64_t ino, const int64_t *st)
{
    if (!ino)
        return;
    fo_add_ram_dev(dev); /* fstat from a patched site of any file there comes to us */
    if ((ids_len + 1) * 2 > ids_cap) {
        size_t cap = ids_len >= IDS_MAX || !ids_cap ? 1024 : ids_cap * 2;
        fdid_t *old = ids;
        size_t old_cap = ids_cap;
        fdid_t *n = table_calloc(cap, sizeof *n);
        if (!n)
            return;
        ids = n;
        ids_cap = cap;
        ids_len = 0;
        if (cap <= old_cap)
            withdraw_all(); /* which files are shared is forgotten too */
        if (cap > old_cap) /* grow; past IDS_MAX start again empty */
            for (size_t i = 0; i < old_cap; i++)
                if (old[i].ino) {
                    *ids_find(old[i].dev, old[i].ino) = old[i];
                    ids_len++;
                }
        free(old);
    }
    fdid_t *slot = ids_find(dev, ino);
    if (slot->ino == 0)
        ids_len++;
    else if (!slot->shared && memcmp(slot->st, st, sizeof slot->st) != 0)
        share(slot, dev, ino, st);
    else if (slot->shared)
        shared_opened(dev, ino, st);
    slot->dev = dev;
    slot->ino = ino;
    memcpy(slot->st, st, sizeof slot->st);
}

/* A RAM file about to be offered for a path before anyone opened it (trap_put): record
 * its answer if the file is new to us; if it already serves a path with another answer it
 * becomes shared (share), but fstat keeps following the last real open.  0: the path's open
 * may be published as any other; -1: only as a shared file's (fo_publish_shared_open). */
static int ids_claim(uint64_t dev, uint64_t ino, const int64_t *st)
{
    fdid_t *slot = ids_len ? ids_find(dev, ino) : NULL;
    if (!slot || slot->ino == 0) {
        ids_put(dev, ino, st);
        slot = ids_find(dev, ino);
        return slot->ino == ino && !slot->shared ? 0 : -1;
    }
    if (slot->shared)
        return -1;
    if (memcmp(slot->st, st, sizeof slot->st) != 0) {
        share(slot, dev, ino, slot->st); /* fstat still says the last real open's */
        return -1;
    }
    return 0;
}

static void ids_clear(void)
{
    withdraw_all();
    free(ids);
    ids = NULL;
    ids_cap = ids_len = 0;
}
