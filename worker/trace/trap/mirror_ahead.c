/*
 * Mirrors of the node's listings made ahead by a thread of their own (ahead_start, ahead_join),
 * and directory opens answered from those listings (mirror_from_node, dir_open_from_node).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and answers.c, config.c, upcall.c, put.c, node_dirs.c define.
 */

/*
 * The mirrors of the node's listings made ahead, by a thread of their own, in the order the
 * node's jobs came to the directories, while the program starts: its first open of a
 * directory then finds the mirror made (a hundred files' worth of mknod each, ~120 us, was
 * the program's wait).  A mirror is made once, by whoever claims it first (this thread or the
 * one answering a call, which waits if the other is at it).  Stopped and joined before run
 * returns: nothing writes into the shadow tree after its fds are closed.
 */
enum { AM_TODO, AM_MAKING, AM_MADE, AM_FAILED };
typedef struct {
    const char *dir, *data; /* a listing's directory (its slot's own copy) and bytes */
    size_t dn, len;
    int state;
    int offered; /* its open published (or found so), under `big` (ahead_offer_held) */
} ahead_mirror_t;
static ahead_mirror_t *ahead_mirrors;
static size_t n_ahead_mirrors;
static pthread_t ahead_thread;
static int ahead_running, ahead_stop;

/* Make one (its parent made); 0 or an errno. */
static int make_mirror(const char *dir, size_t dn, const char *data, size_t len)
{
    char target[MAXPATH];
    if (dn <= mount_n || mirror_wn + (dn - mount_n) >= sizeof target)
        return ENAMETOOLONG;
    memcpy(target, mirror_w, mirror_wn);
    memcpy(target + mirror_wn, dir + mount_n, dn - mount_n);
    target[mirror_wn + dn - mount_n] = 0;
    return mirror_dir(target, (const unsigned char *)data, len);
}

/* Claim and make ahead_mirrors[i]; its state after. */
static int ahead_make(ahead_mirror_t *m)
{
    int todo = AM_TODO;
    if (!__atomic_compare_exchange_n(&m->state, &todo, AM_MAKING, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
        return todo;
    int e = make_mirror(m->dir, m->dn, m->data, m->len);
    /* a parent not made yet (ENOENT): left for the call that needs it, which makes parents
     * first; anything else the listing's fault (Python rebuilds it from the catalog) */
    int st = !e ? AM_MADE : e == ENOENT ? AM_TODO : AM_FAILED;
    __atomic_store_n(&m->state, st, __ATOMIC_RELEASE);
    return st;
}

static int dir_open_from_node(const char *key, size_t kn, action_t *out);

/* A directory this thread has mirrored: its open answered inside the program from now on, as
 * the tracer would answer it (dir_open_from_node, note_open, offer_open), so that the
 * program's first open of it (Python lists every package directory once) does not stop.
 * With `big` held.  Not before Python has mirrored the mount itself (dir_open_from_node):
 * those made before are offered again when it has (ahead_reoffer). */
static void ahead_offer_held(ahead_mirror_t *m)
{
    action_t a;
    const char *d;
    size_t dl;
    int err, is_path;
    if (fo_lost)
        return;
    if (fo_find(FO_OPEN, m->dir, m->dn, &d, &dl, &err, &is_path)) {
        m->offered = 1;
        return;
    }
    if (!known_stat(m->dir, m->dn, F_NOFOLLOW))
        put_staged_prefixes(m->dir, m->dn); /* its stat, with its parent's staged answers */
    if (dir_open_from_node(m->dir, m->dn, &a)) {
        note_open(&a);
        if (a.ram_ino)
            publish_open(&a, m->dir, m->dn, a.ram_dev, a.ram_ino);
        free(a.bval);
        m->offered = 1;
    }
}

/* ... under `big`, giving way to the threads answering calls. */
static void ahead_offer(ahead_mirror_t *m)
{
    if (!big_lock_giving_way(&ahead_stop))
        return;
    ahead_offer_held(m);
    pthread_mutex_unlock(&big);
}

/* Python has mirrored the mount (`big` held): the mirrors made ahead before are offered now
 * (on a 2-CPU VM the thread often got there first: 5-80 of a warm import's first directory
 * opens stopped, each one the tracer's). */
static void ahead_reoffer(void)
{
    for (size_t i = 0; i < n_ahead_mirrors && fo_enabled(); i++)
        if (!ahead_mirrors[i].offered &&
            __atomic_load_n(&ahead_mirrors[i].state, __ATOMIC_ACQUIRE) == AM_MADE)
            ahead_offer_held(&ahead_mirrors[i]);
}

static void *ahead_main(void *arg)
{
    (void)arg;
    for (size_t i = 0; i < n_ahead_mirrors && !__atomic_load_n(&ahead_stop, __ATOMIC_ACQUIRE);
         i++)
        if (ahead_make(&ahead_mirrors[i]) == AM_MADE && fo_enabled())
            ahead_offer(&ahead_mirrors[i]); /* (once, whoever made it) */
    return NULL;
}

/* Start making the listings of node_listings ahead (once a run). */
static void ahead_start(void)
{
    if (ahead_running || ahead_mirrors || !mirror_w || !node_listings.used)
        return;
    ahead_mirrors = calloc(node_listings.used, sizeof *ahead_mirrors);
    if (!ahead_mirrors)
        return;
    /* parents before children: by path length (a parent's path is a prefix of its child's) */
    size_t n = 0;
    for (size_t i = 0; i < node_listings.cap; i++) {
        dirmap_slot_t *l = &node_listings.t[i];
        if (l->h && l->data)
            ahead_mirrors[n++] = (ahead_mirror_t){l->dir, l->data, l->dn, l->len, AM_TODO};
    }
    for (size_t i = 1; i < n; i++) { /* insertion sort by depth: a few hundred */
        ahead_mirror_t m = ahead_mirrors[i];
        size_t j = i;
        while (j > 0 && ahead_mirrors[j - 1].dn > m.dn)
            ahead_mirrors[j] = ahead_mirrors[j - 1], j--;
        ahead_mirrors[j] = m;
    }
    for (size_t i = 0; i < n; i++) {
        dirmap_slot_t *l = dirmap_find(&node_listings, ahead_mirrors[i].dir,
                                       ahead_mirrors[i].dn, 0);
        if (l)
            l->ahead = i + 1;
    }
    n_ahead_mirrors = n;
    ahead_thread_start(&ahead_thread, ahead_main, &ahead_running, &ahead_stop);
}

/* Before the shadow tree's fds may close (end of a run). */
static void ahead_join(void)
{
    ahead_thread_join(ahead_thread, &ahead_running, &ahead_stop);
}

static void ahead_clear(void)
{
    ahead_join();
    free(ahead_mirrors);
    ahead_mirrors = NULL;
    n_ahead_mirrors = 0;
}

/* Mirror `key`'s first `n` bytes (a directory below the mount) from the node's listing, once;
 * 0 if it cannot be (no listing: Python's). */
static int mirror_from_node(const char *key, size_t n)
{
    if (dirmap_find(&mirrored, key, n, 0))
        return 1;
    dirmap_slot_t *l = dirmap_find(&node_listings, key, n, 0);
    if (!l || !l->data)
        return 0;
    if (l->ahead && l->ahead <= n_ahead_mirrors) {
        ahead_mirror_t *m = &ahead_mirrors[l->ahead - 1];
        int st;
        while ((st = ahead_make(m)) == AM_MAKING) /* the other thread is at it: not for long */
            sched_yield();
        if (st != AM_MADE)
            return 0; /* (its parents are made: AM_TODO means a listing that does not work) */
    } else if (make_mirror(key, n, l->data, l->len) != 0) {
        return 0; /* a listing that does not parse: Python rebuilds it from the catalog */
    }
    if (!dirmap_find(&mirrored, key, n, 1) || buf_add(&mirror_notes, key, n) < 0 ||
        buf_add(&mirror_notes, "", 1) < 0)
        return 0;
    return 1;
}

static int dir_open_from_node(const char *key, size_t kn, action_t *out)
{
    if (!node_listings.used || !mirror_w || kn <= mount_n + 1 || key[mount_n] != '/' ||
        memcmp(key, mount_p, mount_n) != 0 || !dirmap_find(&node_listings, key, kn, 0) ||
        !dirmap_find(&mirrored, mount_p, mount_n, 0))
        return 0;
    const action_t *st = known_stat(key, kn, F_NOFOLLOW);
    if (!st || st->kind != A_STAT || !S_ISDIR((mode_t)st->st[0]))
        return 0;
    for (size_t i = mount_n + 1; i <= kn; i++) /* from the top: each directory's parent first */
        if ((i == kn || key[i] == '/') && !mirror_from_node(key, i))
            return 0;
    memset(out, 0, sizeof *out);
    out->blen = target_n + (kn - mount_n);
    if (!(out->bval = malloc(out->blen + 1)))
        return 0;
    memcpy(out->bval, target_p, target_n);
    memcpy(out->bval + target_n, key + mount_n, kn - mount_n);
    out->bval[out->blen] = 0;
    out->kind = A_REDIRECT;
    out->ival = 1; /* SAFE: opening a directory never blocks */
    memcpy(out->st, st->st, sizeof out->st);
    return 1;
}
