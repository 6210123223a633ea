/*
 * put(): answers Python gives ahead into the answer cache and the in-process table (put_one,
 * publish), the growable buffer buf_t, trap_put.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and answers.c, fstat.c, config.c, upcall.c, apply.c, seccomp_stop.c define.
 */

/*
 * put([(cls, flags, key, answer), ...]) -> n: answers Python knows before anyone asks (every
 * entry of a directory it has just listed: ls -l and find stat and getxattr each of them).
 * Into the answer cache, so those calls never reach Python; lstat and statx answers also into
 * the in-process table, so patched call sites answer them with no trap at all (the table
 * holds 64k answers: a huge directory's later entries take the tracer's way).  Only during a
 * run, from the thread answering a call (it holds `big` and the GIL).
 */

/* One answer given ahead; takes a->bval.  1 if it was taken.  `dirfd`, `pre`: an open's
 * target is `pre` bytes of directory path, then a name in the directory open as dirfd (-1:
 * none), which is cheaper to stat than the path through /proc. */
typedef struct {
    uint64_t cache, fo; /* fnv(cls, flags, key); the in-process kind's key hash (0: none) */
} put_hashes_t;

static unsigned packed_fo_kind(int cls, int flags);

/* fo_publish, with the hash prefetch_packed worked out when it is for this kind */
static int publish(const put_hashes_t *ph, int cls, int flags, unsigned kind, const char *key,
                   size_t kn, const void *data, size_t dlen, int is_path, int err, uint64_t dev,
                   uint64_t ino)
{
    if (ph && ph->fo && kind == packed_fo_kind(cls, flags))
        return fo_publish_hashed(kind, key, kn, ph->fo, data, dlen, is_path, err, dev, ino);
    return fo_publish(kind, key, kn, data, dlen, is_path, err, dev, ino);
}

static int put_one(int cls, int flags, const char *key, size_t kn, action_t *a, int dirfd,
                   size_t pre, const put_hashes_t *ph)
{
    uint64_t h = ph ? ph->cache : fnv(cls, flags, key, kn);
    entry_t *e = NULL;
    char *k = NULL;
    if (cache_get(cls, flags, key, kn, h))
        goto skip;
    if (fo_enabled() && cls == C_STAT && a->kind == A_STAT && (flags == 0 || flags == F_NOFOLLOW)) {
        struct stat st;
        fill_stat(a->st, &st);
        if (publish(ph, cls, flags, flags ? FO_LSTAT : FO_STAT, key, kn, &st, sizeof st, 0, 0, 0,
                    0)) {
            fo_only++;
            free(a->bval);
            return 1;
        }
    } else if (fo_enabled() && cls == C_NAMED && !flags &&
               publish(ph, cls, flags, FO_NAMED, key, kn, NULL, 0, 0, 0, 0, 0)) {
        fo_only++;
        free(a->bval);
        return 1;
    }
    int pooled = 0;
    entry_t *pe = pool_alloc(sizeof *e + kn + 1); /* zeroed: never used before */
    if (pe) {
        e = pe;
        k = (char *)(pe + 1);
        pooled = 1;
    } else if (!(e = calloc(1, sizeof *e)) || !(k = malloc(kn + 1))) {
        if (cls == C_NAMED) /* a name not known here: no listing may deny it in-process */
            names_unpublished = 1;
        goto skip;
    }
    struct stat rs;
    if (cls == C_OPEN) {
        /* only a node cache service's objects by name, with the fstat answer: put
         * ahead of any open, so never pinned (see stale_open) */
        int got = -1;
        uint64_t dev, ino;
        if (!flags && a->kind == A_REDIRECT && a->st[0] && a->bval && named_ram_file(a->bval)) {
            int named = dirfd >= 0 && pre && a->blen > pre;
            if (named && inodes_find(dirfd, a->bval + pre, &dev, &ino)) {
                rs.st_dev = (dev_t)dev; /* as the directory read at the first put said */
                rs.st_ino = (ino_t)ino;
                rs.st_mode = S_IFREG;
                got = 0;
            } else
                got = named ? fstatat(dirfd, a->bval + pre, &rs, 0) : stat(a->bval, &rs);
        }
        if (got != 0 || !S_ISREG(rs.st_mode)) {
            if (!pooled) { /* (a pooled one is left unused) */
                free(e);
                free(k);
            }
            free(a->bval);
            return 0;
        }
        a->ram_dev = (uint64_t)rs.st_dev;
        a->ram_ino = (uint64_t)rs.st_ino;
    }
    memcpy(k, key, kn);
    k[kn] = 0;
    e->hash = h;
    e->cls = cls;
    e->flags = flags;
    e->key = k;
    e->klen = kn;
    e->act = *a;
    e->pooled = pooled;
    cache_put(e);
    a = &e->act;
    n_opens_put += cls == C_OPEN;
    if (!fo_enabled())
        return 1;
    if (cls == C_STAT && a->kind == A_STAT) {
        struct stat st;
        fill_stat(a->st, &st);
        int nofollow = flags & F_NOFOLLOW;
        publish(ph, cls, flags, nofollow ? FO_LSTAT : FO_STAT, key, kn, &st, sizeof st, 0, 0, 0, 0);
    } else if (cls == C_NAMED) {
        if (!publish(ph, cls, flags, FO_NAMED, key, kn, NULL, 0, 0, 0, 0, 0))
            names_unpublished = 1;
    } else if (cls == C_NOXATTR) {
        /* after its entries' answers: an entry with xattrs must be seen as such in-process
         * (below) before its directory says the others have none */
        if (!xattrs_unpublished)
            publish(ph, cls, flags, FO_NOXATTR, key, kn, NULL, 0, 0, 0, 0, 0);
        /* and after all its names: only then may a name missing there mean ENOENT */
        if (!names_unpublished && cache_get(C_LISTED, 0, key, kn, fnv(C_LISTED, 0, key, kn)))
            fo_publish(FO_LISTED, key, kn, NULL, 0, 0, 0, 0, 0);
    } else if ((cls == C_XATTR_GET || cls == C_XATTR_LIST) && a->kind == A_XATTRS) {
        /* present, with data: the handler hands these calls to us (and derives nothing) */
        unsigned kind = (cls == C_XATTR_GET ? FO_XATTR : FO_XATTR_LIST) +
                        (flags & F_NOFOLLOW ? 1 : 0);
        if (!a->blen || !fo_publish(kind, key, kn, a->bval, a->blen, 0, 0, 0, 0))
            xattrs_unpublished = 1;
    } else if ((cls == C_XATTR_GET && a->kind == A_RETURN && a->ival < 0) ||
               (cls == C_XATTR_LIST && a->kind == A_RETURN && a->ival == 0)) {
        unsigned kind = (cls == C_XATTR_GET ? FO_XATTR : FO_XATTR_LIST) +
                        (flags & F_NOFOLLOW ? 1 : 0);
        fo_publish(kind, key, kn, NULL, 0, 0, (int)-a->ival, 0, 0);
    } else if (cls == C_OPEN) {
        struct stat st;
        fill_stat(a->st, &st);
        if (ids_claim(a->ram_dev, a->ram_ino, a->st) != 0)
            fo_publish_shared_open(key, kn, a->bval, a->blen, &st, a->ram_dev, a->ram_ino);
        else if (publish(ph, cls, flags, FO_OPEN, key, kn, a->bval, a->blen + 1, 1, 0,
                         a->ram_dev, a->ram_ino))
            publish_ident(a->ram_dev, a->ram_ino, a->st, a->bval, a->blen);
    }
    return 1;
skip:
    free(e);
    free(a->bval);
    return 0;
}

/* A growable byte buffer. */
typedef struct {
    char *b;
    size_t len, cap;
} buf_t;

static int buf_add(buf_t *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (b->len + n > cap)
            cap *= 2;
        char *g = realloc(b->b, cap);
        if (!g)
            return -1;
        b->b = g;
        b->cap = cap;
    }
    memcpy(b->b + b->len, p, n);
    b->len += n;
    return 0;
}

static void buf_free(buf_t *b)
{
    free(b->b);
    memset(b, 0, sizeof *b);
}

/* The next (cls, flags, key, answer) of put()'s items: 1 one to use, 0 one to skip (not
 * cacheable, or an exec's argv), -1 an error (set), 2 none left.  *item holds the key's bytes
 * until the caller drops it; a->bval is the caller's. */
static int next_answer(PyObject *it, PyObject **item, int *cls, int *flags, const char **key,
                       Py_ssize_t *kn, action_t *a)
{
    memset(a, 0, sizeof *a);
    *item = PyIter_Next(it);
    if (!*item)
        return PyErr_Occurred() ? -1 : 2;
    PyObject *res, *argv = NULL;
    int cacheable = 0;
    if (!PyArg_ParseTuple(*item, "iiy#O", cls, flags, key, kn, &res) ||
        parse_action(res, a, &cacheable, &argv) < 0) {
        free(a->bval);
        a->bval = NULL;
        Py_XDECREF(argv);
        Py_CLEAR(*item);
        return -1;
    }
    int use = cacheable && !argv;
    Py_XDECREF(argv);
    if (!use) {
        free(a->bval);
        a->bval = NULL;
    }
    return use;
}

static PyObject *trap_put(PyObject *self, PyObject *args)
{
    PyObject *items, *item;
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &items))
        return NULL;
    if (!handler) {
        PyErr_SetString(PyExc_RuntimeError, "worker.trace._trap.put outside a run");
        return NULL;
    }
    PyObject *it = PyObject_GetIter(items);
    if (!it)
        return NULL;
    long n = 0;
    for (;;) {
        int cls, flags;
        const char *key;
        Py_ssize_t kn;
        action_t a;
        int got = next_answer(it, &item, &cls, &flags, &key, &kn, &a);
        if (got == 2 || got < 0)
            break;
        if (got == 1)
            n += put_one(cls, flags, key, (size_t)kn, &a, -1, 0, NULL);
        Py_DECREF(item);
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(n);
}
