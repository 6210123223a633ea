/*
 * Directory maps of the node's listings, mirrors, opens looked for and opens deferred
 * (dirmap_find, dirmap_clear, dirs_clear, put_opens_of, put_deferred_opens) and the thread
 * putting deferred opens ahead (opens_start, opens_join).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and answers.c, config.c, object_inodes.c, put.c, pack.c, staged.c define.
 */

/*
 * Directory opens answered from the node's listings (worker/trace/node_answers.py, LISTING): a
 * job's first open of a directory that an earlier job of the node listed is answered here,
 * its mirror in the shadow tree (and its ancestors') made from those listings, with no
 * upcall.  A listing is kept only for a directory named by itself (no symlink on the way,
 * nothing that depends on the process), so the path is the directory's own; its lstat answer
 * (put from the node's answers of its parent) is what fstat of the fd says, as Python's
 * answer would.  The mount itself is Python's (its listing is the repositories').
 */
typedef struct {
    uint64_t h; /* 0: free */
    char *dir;
    size_t dn;
    const char *data; /* a listing, in a table we hold (the other sets: NULL) */
    size_t len;
    size_t ahead; /* its place in ahead_mirrors + 1 (0: not made ahead) */
} dirmap_slot_t;
typedef struct {
    dirmap_slot_t *t;
    size_t cap, used;
} dirmap_t;
static dirmap_t node_listings, mirrored, opens_looked; /* (opens looked: see put_table) */
/* the open answers of directories put at once, each put when the job first opens a file
 * there (put_deferred_opens): data is ours */
static dirmap_t opens_deferred;
/* ...in the order the node's jobs came to them: a job that opens files in one most likely
 * opens files in the next few too (a Python import: each package's __pycache__), which are
 * put with it, as staged directories are (put_staged_ancestors) */
static struct {
    const char *dir; /* the slot's own copy: stays until dirs_clear */
    size_t dn;
} *od_order;
static size_t od_n, od_cap;
#define OPENS_AHEAD_DIRS 4
/* Has the program opened a file in a directory whose opens were deferred?  Until it has, the
 * thread that puts answers ahead (opens_main) puts the staged directories first: a program
 * that only looks (stat, access, listings) needs no opens, and a staged directory costs a
 * fifteenth of its opens (a walk stat-ing 8,000 files of a Python stack: 4.0 -> 3.2 µs a
 * path, 2.15 natively); once it opens them, their opens first, as before.  Under `big`. */
static int opens_asked;
static buf_t mirror_notes; /* "dir\0" of each directory mirrored here, until Python takes them */

/* The slot of directory `d` (with `create`: a new one, its path copied; NULL if out of
 * memory), or NULL. */
static dirmap_slot_t *dirmap_find(dirmap_t *m, const char *d, size_t n, int create)
{
    if (create && (m->used + 1) * 2 > m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 256;
        dirmap_slot_t *t = table_calloc(cap, sizeof *t);
        if (!t)
            return NULL;
        OA_MOVE(t, cap, m->t, m->cap, h)
        free(m->t);
        m->t = t;
        m->cap = cap;
    }
    if (!m->cap)
        return NULL;
    uint64_t h = dir_hash(d, n);
    for (size_t i = h & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        dirmap_slot_t *s = &m->t[i];
        if (!s->h) {
            if (!create || !(s->dir = malloc(n ? n : 1)))
                return NULL;
            memcpy(s->dir, d, n);
            s->dn = n;
            s->h = h;
            m->used++;
            return s;
        }
        if (s->h == h && s->dn == n && memcmp(s->dir, d, n) == 0)
            return s;
    }
}

static void dirmap_clear(dirmap_t *m)
{
    for (size_t i = 0; i < m->cap; i++)
        free(m->t[i].dir);
    free(m->t);
    memset(m, 0, sizeof *m);
}

static void release_tables(void);
static int stage_dir(const char *d, size_t dn, const char *within, size_t wn, const char *data,
                     size_t len, int owned);
static int stage_more(const char *d, size_t dn, const char *data, size_t len);

static void dirs_clear(void)
{
    opens_join();
    release_tables();
    dirmap_clear(&node_listings);
    dirmap_clear(&mirrored);
    dirmap_clear(&opens_looked);
    for (size_t i = 0; i < opens_deferred.cap; i++)
        free((char *)opens_deferred.t[i].data);
    dirmap_clear(&opens_deferred);
    ahead_clear();
    free(od_order);
    od_order = NULL;
    od_n = od_cap = 0;
    opens_asked = 0;
    buf_free(&mirror_notes);
    free(mirror_w);
    mirror_w = NULL;
    mirror_wn = 0;
}

/* The first open of a file in a directory whose answers were put at once: its opens now (see
 * put_table).  1 if any were put. */
static long put_opens_of(dirmap_slot_t *o)
{
    char *data = (char *)o->data;
    o->data = NULL;
    long n = put_packed_bytes(data, o->len, mount_p, mount_n); /* (all below the mount) */
    free(data);
    return n;
}

/*
 * The node's answers not put yet, put ahead by a thread of their own while the program runs
 * (on a 2-vCPU node the other CPU is mostly idle then), a directory at a time in the order
 * the node's jobs came to them: first the deferred opens, then the staged directories (the
 * staged ones first until the program opens a file: see opens_asked).  The program's first
 * call in a directory then finds its answers there, in its own process, where it used to
 * stop while they were put: 584 stops of 10-50 µs for deferred opens in a
 * walk over 8,000 files, then ~60 of 100-500 µs for staged directories.  Under `big`, which
 * this thread only tries to take, so that a thread holding it can stop and join this one; a
 * call in a directory not reached yet still puts it itself.
 */
static pthread_t opens_thread;
static int opens_running, opens_stop;

static void *opens_main(void *arg)
{
    (void)arg;
    inodes_load(job.dirfd); /* what the opens put need (fstatat meanwhile) */
    for (size_t i = 0, j = 0;;) {
        if (!big_lock_giving_way(&opens_stop))
            return NULL;
        int done = __atomic_load_n(&opens_stop, __ATOMIC_ACQUIRE);
        int staged_first = !opens_asked && j < stg_norder && stg_pending;
        if (!done && i < od_n && !staged_first) {
            dirmap_slot_t *o = dirmap_find(&opens_deferred, od_order[i].dir, od_order[i].dn, 0);
            if (o && o->data)
                put_opens_of(o);
            i++;
        } else if (!done && j < stg_norder && stg_pending) {
            char path[MAXPATH]; /* its ancestors first, then itself */
            if (stg_order[j].dn + 1 < sizeof path) {
                memcpy(path, stg_order[j].dir, stg_order[j].dn);
                path[stg_order[j].dn] = '/';
                put_staged_prefixes(path, stg_order[j].dn + 1);
            }
            j++;
        } else
            done = 1;
        pthread_mutex_unlock(&big);
        if (done)
            return NULL;
    }
}

/* Called with `big` held, at the program's first call that finds answers of the node not
 * put (staged, or an open deferred): a program that never touches the tree (`true`) never
 * pays for them. */
static void opens_start(void)
{
    if (!opens_running && (od_n || stg_pending) && fo_enabled())
        ahead_thread_start(&opens_thread, opens_main, &opens_running, &opens_stop);
}

/* Before the deferred opens go (end of a run); with `big` held or not. */
static void opens_join(void)
{
    __atomic_store_n(&inodes_stop, 1, __ATOMIC_RELEASE); /* (it may be reading them) */
    ahead_thread_join(opens_thread, &opens_running, &opens_stop);
}

static int put_deferred_opens(const char *key, size_t kn)
{
    const char *slash = opens_deferred.used ? memrchr(key, '/', kn) : NULL;
    dirmap_slot_t *o = slash ? dirmap_find(&opens_deferred, key, (size_t)(slash - key), 0) : NULL;
    if (!o || !o->data)
        return 0;
    size_t at = 0; /* where it is in od_order (its slot does not say: a linear search, rare) */
    while (at < od_n && od_order[at].dir != o->dir)
        at++;
    long n = put_opens_of(o);
    opens_asked = 1;
    for (size_t i = at + 1, ahead = 0; i < od_n && ahead < OPENS_AHEAD_DIRS; i++) {
        dirmap_slot_t *next = dirmap_find(&opens_deferred, od_order[i].dir, od_order[i].dn, 0);
        if (next && next->data) {
            put_opens_of(next);
            ahead++;
        }
    }
    opens_start(); /* the program opens files: the others' opens now, ahead of it */
    return n > 0;
}
