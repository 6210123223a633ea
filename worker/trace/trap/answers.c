/*
 * The answer cache: action_t (an answer) and entry_t, their pool for answers put ahead, the
 * hash table keyed by fnv(cls, flags, key) with its in-process publishing (cache_put/get/del,
 * withdraw_all); also the counters and forward declarations the node's answers need early.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses only
 * what _trap.c's header defines.
 */

/* ---------- answer cache ---------- */

/* An entry's xattrs could not be published in-process: no directory says "no xattrs" there
 * any more (FO_NOXATTR), or the handler would deny that entry's. */
static int xattrs_unpublished;
/* A name of a listed directory could not be published (the table is full): no directory is
 * published as listed any more (FO_LISTED), or the handler would deny that name. */
static int names_unpublished;

static unsigned long long n_node_puts; /* answers put from the node's */

/* answers from the node, staged per directory (defined with stage_dir) */
static int put_staged_ancestors(const char *key, size_t kn);
static unsigned long long n_node_dirs; /* directory opens answered from the node's listings */
static unsigned long long n_opens_put; /* open answers put ahead (objects the node holds) */
/* the shadow tree's read-write view: the mount's mirror (NULL: none; set by run) */
static char *mirror_w;
static size_t mirror_wn;
static void stage_clear(void);
static void dirs_clear(void);


typedef struct {
    int kind;
    int64_t ival;
    char *bval; /* redirect target (NUL-terminated) or readlink bytes */
    size_t blen;
    int64_t st[15]; /* see tracer.py STAT_FIELDS */
    uint64_t ram_dev, ram_ino; /* open served from a RAM file: its device and inode, or 0 */
} action_t;

typedef struct {
    uint64_t hash;
    int cls;
    int flags;
    char *key;
    size_t klen;
    action_t act;
    int pooled; /* it and its key are in the pool (answers put ahead): not freed one by one */
} entry_t;

/*
 * The answer cache's entries for answers put ahead: a job on a warm node puts 20,000 of them
 * while its program waits for the mount.  They come from one mapping, entry and key side by
 * side, with no malloc bookkeeping, and go all at once with the run's answers.  (Not huge
 * pages: on a VM whose host takes back free memory, a fresh 2 MiB page costs 512 host faults,
 * 30 ms for a job's entries, where recycled small pages cost little.)
 */
#define POOL_MAX (1ul << 32) /* address space only: what is used gets memory */
static char *pool;
static size_t pool_used;

static void *pool_alloc(size_t n)
{
    if (!pool) {
        void *m = mmap(NULL, POOL_MAX, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED)
            return NULL;
        pool = m;
        pool_used = 0;
    }
    n = (n + 15) & ~(size_t)15;
    if (n > POOL_MAX - pool_used)
        return NULL;
    void *p = pool + pool_used;
    pool_used += n;
    return p;
}

static void pool_clear(void)
{
    if (pool)
        munmap(pool, POOL_MAX);
    pool = NULL;
    pool_used = 0;
}

static void entry_free(entry_t *e)
{
    free(e->act.bval);
    if (!e->pooled) {
        free(e->key);
        free(e);
    }
}
static int dir_open_from_node(const char *key, size_t kn, action_t *out);
static int put_deferred_opens(const char *key, size_t kn);
static void opens_start(void);
static void ahead_join(void);
static void opens_join(void);
static void ahead_clear(void);

/* The hash beside each pointer: probing a run of slots reads no entry but the one that
 * matches (tens of thousands of answers are put at a job's start, each probed first). */
typedef struct {
    uint64_t hash; /* the entry's; 0 with e NULL */
    entry_t *e;
} cslot_t;
static cslot_t *table;

/* Move the live slots of an open-addressing table (`old`, `ocap` slots) into an empty one
 * (`nt`, `ncap` slots, a power of two), each at its hash (field HF; 0: an empty slot). */
#define OA_MOVE(nt, ncap, old, ocap, HF)                                                    \
    for (size_t oa_i = 0; oa_i < (ocap); oa_i++) {                                          \
        if (!(old)[oa_i].HF)                                                                \
            continue;                                                                       \
        size_t oa_j = (old)[oa_i].HF & ((ncap) - 1);                                        \
        while ((nt)[oa_j].HF)                                                               \
            oa_j = (oa_j + 1) & ((ncap) - 1);                                               \
        (nt)[oa_j] = (old)[oa_i];                                                           \
    }
static size_t table_cap, table_len;

static uint64_t fnv(int cls, int flags, const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ULL ^ (uint64_t)(cls * 131 + flags);
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    return h ? h : 1;
}

/* The slot holding (cls, flags, key), or the empty one ending its run. */
static cslot_t *cache_slot(int cls, int flags, const char *k, size_t n, uint64_t h)
{
    for (size_t i = h & (table_cap - 1);; i = (i + 1) & (table_cap - 1)) {
        cslot_t *c = &table[i];
        if (!c->e)
            return c;
        entry_t *e = c->e;
        if (c->hash == h && e->cls == cls && e->flags == flags && e->klen == n &&
            memcmp(e->key, k, n) == 0)
            return c;
    }
}

static entry_t *cache_get(int cls, int flags, const char *k, size_t n, uint64_t h)
{
    return table_cap ? cache_slot(cls, flags, k, n, h)->e : NULL;
}

/* Answers the C side put into the in-process table only (stat and lstat answers, the names of
 * listed directories: most of a node's answers), made entries of the answer cache when a
 * trapped call or a derivation needs one.  Putting 20,000 answers at a job's start then
 * writes each once. */
static unsigned long long fo_only; /* answers put that way this run (0: nothing to look for) */
static int fo_lost; /* the in-process table was withdrawn since: those answers are gone */
static entry_t *fo_backed(int cls, int flags, const char *key, size_t kn, uint64_t h);

static entry_t *cache_find(int cls, int flags, const char *k, size_t n, uint64_t h)
{
    entry_t *e = cache_get(cls, flags, k, n, h);
    return e || !fo_only || fo_lost ? e : fo_backed(cls, flags, k, n, h);
}

/* Withdraw every in-process answer; the names of listed directories among them, so no
 * listing may deny a name in C any more (absent_from_listing). */
static void withdraw_all(void)
{
    fo_withdraw_all();
    fo_lost = fo_only != 0;
}

/* Room for `more` entries at half load (one rehash instead of several as a table grows);
 * -1: out of memory. */
static int cache_reserve(size_t more)
{
    if ((table_len + more) * 2 <= table_cap)
        return 0;
    size_t ncap = table_cap ? table_cap : 4096;
    while ((table_len + more) * 2 > ncap)
        ncap *= 2;
    cslot_t *nt = table_calloc(ncap, sizeof(*nt));
    if (!nt)
        return -1;
    OA_MOVE(nt, ncap, table, table_cap, hash) /* (a live slot's hash is never 0) */
    free(table);
    table = nt;
    table_cap = ncap;
    return 0;
}

static void cache_put(entry_t *e)
{
    if (cache_reserve(1) < 0)
        return;
    size_t j = e->hash & (table_cap - 1);
    while (table[j].e)
        j = (j + 1) & (table_cap - 1);
    table[j].hash = e->hash;
    table[j].e = e;
    table_len++;
}

/* Remove one entry (linear probing: shift later entries of the run back). */
static int cache_del(int cls, int flags, const char *k, size_t n)
{
    uint64_t h = fnv(cls, flags, k, n);
    entry_t *e = cache_get(cls, flags, k, n, h);
    if (!e)
        return 0;
    size_t mask = table_cap - 1, i = h & mask;
    while (table[i].e != e)
        i = (i + 1) & mask;
    entry_free(e);
    table[i].e = NULL;
    table[i].hash = 0;
    table_len--;
    for (size_t j = (i + 1) & mask; table[j].e; j = (j + 1) & mask) {
        cslot_t m = table[j];
        table[j].e = NULL;
        table[j].hash = 0;
        size_t k2 = m.hash & mask;
        while (table[k2].e)
            k2 = (k2 + 1) & mask;
        table[k2] = m;
    }
    return 1;
}

static void cache_clear(void)
{
    withdraw_all();
    for (size_t i = 0; i < table_cap; i++) {
        if (table[i].e)
            entry_free(table[i].e);
    }
    free(table);
    table = NULL;
    table_cap = table_len = 0;
    pool_clear();
}
