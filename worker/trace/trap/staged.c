/*
 * The node's answers staged per directory: put when a call first misses there or Python comes
 * to it (stg_find, stage_put, put_staged_ancestors, stage_clear).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and answers.c, object_inodes.c (dir_hash), put.c, pack.c define.
 */

/*
 * Answers from the node staged per directory: put when a call first misses in the directory
 * or below it (lookup), or when Python comes to the directory (put_staged), so a job's start
 * never costs the whole table and its first touch of a directory the node knows needs no
 * Python.  Keyed by the directory's path (FNV-1a).
 */
#define STG_PIECES 8 /* a directory's answers: in as many pieces as a table gives them */
typedef struct {
    uint64_t h; /* 0: free */
    char *dir, *within;
    size_t dn, wn;
    const char *data; /* its first piece; NULL once put */
    size_t len;       /* all its pieces' bytes */
    const char *piece[STG_PIECES]; /* the others, put after it, in order */
    size_t piece_len[STG_PIECES];
    unsigned npieces;
    size_t order; /* its place in stg_order */
    int owned;    /* data is ours to free (else it is in a table we hold: see put_table) */
} staged_t;
static staged_t *stg;
static size_t stg_cap, stg_used, stg_pending;
/* The staged directories in the order the node's jobs came to them: a job that misses in one
 * will most likely come to the next ones too, so those are put with it (stage_ahead). */
typedef struct {
    const char *dir; /* the staged_t's own copy: stays until stage_clear */
    size_t dn;
    uint64_t h;
} stg_ref_t;
static stg_ref_t *stg_order;
static size_t stg_norder, stg_order_cap;
#define STAGE_AHEAD_DIRS 8
#define STAGE_AHEAD_BYTES (64u << 10)

static staged_t *stg_find(const char *d, size_t n, uint64_t h, int create)
{
    if (!stg_cap) {
        if (!create)
            return NULL;
        stg = calloc(1024, sizeof *stg);
        if (!stg)
            return NULL;
        stg_cap = 1024;
    }
    if (create && (stg_used + 1) * 2 > stg_cap) {
        size_t ncap = stg_cap * 2;
        staged_t *nt = table_calloc(ncap, sizeof *nt);
        if (!nt)
            return NULL;
        OA_MOVE(nt, ncap, stg, stg_cap, h)
        free(stg);
        stg = nt;
        stg_cap = ncap;
    }
    for (size_t i = h & (stg_cap - 1);; i = (i + 1) & (stg_cap - 1)) {
        staged_t *s = &stg[i];
        if (!s->h) {
            if (!create)
                return NULL;
            s->h = h;
            stg_used++;
            return s;
        }
        if (s->h == h && s->dn == n && memcmp(s->dir, d, n) == 0)
            return s;
    }
}

/* Put a staged directory's answers (once); -1: out of memory. */
static long stage_put(staged_t *s)
{
    if (!s->data)
        return 0;
    size_t first = s->len;
    for (unsigned i = 0; i < s->npieces; i++)
        first -= s->piece_len[i];
    long n = put_packed_bytes(s->data, first, s->within, s->wn);
    for (unsigned i = 0; i < s->npieces && n >= 0; i++) {
        long k = put_packed_bytes(s->piece[i], s->piece_len[i], s->within, s->wn);
        n = k < 0 ? k : n + k;
    }
    if (s->owned)
        free((char *)s->data);
    s->data = NULL;
    s->npieces = 0;
    stg_pending--;
    return n;
}

/* Put what the node knows of the directories above `key` (from the top, so a directory's
 * own stat comes before its entries'); the deepest one put, or NULL. */
static staged_t *put_staged_prefixes(const char *key, size_t kn)
{
    staged_t *deepest = NULL;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < kn && stg_pending; i++) {
        if (key[i] == '/' && i > 0) {
            staged_t *s = stg_find(key, i, h ? h : 1, 0);
            if (s && s->data && stage_put(s) > 0)
                deepest = s;
        }
        h = (h ^ (unsigned char)key[i]) * 1099511628211ull;
    }
    return deepest;
}

/* A call missed the cache: put what the node knows of the directories on its path, and of
 * the few that came next for the node's earlier jobs (at most STAGE_AHEAD_DIRS of them, up
 * to STAGE_AHEAD_BYTES), each after its own ancestors.  1 if anything was put. */
static int put_staged_ancestors(const char *key, size_t kn)
{
    if (!stg_pending)
        return 0;
    staged_t *missed = put_staged_prefixes(key, kn);
    if (!missed)
        return 0;
    size_t bytes = 0, dirs = 0;
    for (size_t i = missed->order + 1; i < stg_norder && stg_pending &&
                                       dirs < STAGE_AHEAD_DIRS && bytes < STAGE_AHEAD_BYTES;
         i++) {
        staged_t *s = stg_find(stg_order[i].dir, stg_order[i].dn, stg_order[i].h, 0);
        if (!s || !s->data)
            continue;
        bytes += s->len;
        dirs++;
        char path[MAXPATH];
        if (s->dn + 1 < sizeof path) { /* its ancestors first, then itself */
            memcpy(path, s->dir, s->dn);
            path[s->dn] = '/';
            put_staged_prefixes(path, s->dn + 1);
        }
    }
    return 1;
}

static void stage_clear(void)
{
    for (size_t i = 0; i < stg_cap; i++) {
        free(stg[i].dir);
        free(stg[i].within);
        if (stg[i].owned)
            free((char *)stg[i].data);
    }
    free(stg);
    stg = NULL;
    stg_cap = stg_used = stg_pending = 0;
    free(stg_order);
    stg_order = NULL;
    stg_norder = stg_order_cap = 0;
    dirs_clear();
    buf_free(&put_notes);
    buf_free(&put_listed);
    free(job.prefix);
    job.prefix = NULL;
    job.pn = 0;
    job.dirfd = -1;
    inodes_clear();
}
