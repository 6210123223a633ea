/*
 * A revision's table of answers from the node read in place (nt_read), put_table, read_table,
 * node_listing, opens_looked, mirrored, take_mirrored, stage_dir and put_staged.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and answers.c, config.c, object_inodes.c, put.c, pack.c, staged.c, node_dirs.c,
 * mirror_ahead.c define.
 */

/*
 * A revision's table of answers from the node (worker/trace/node_answers.py: frames of u32 part
 * length, u32 data length, part, data; a part is a directory, NUL, and which of its answers
 * the data holds), read where the service's memfd is mapped: nothing is copied.  Its first
 * directories in the order the node's jobs came to them (up to `eager` bytes) are put at
 * once and the others staged, each put when the job first comes to it; the listings are kept
 * for the mirrors (dir_open_from_node) and Python, and so are the directories whose opens an
 * earlier job looked for (Python does not look again).  Only frames of the repository
 * mounted at `within`: a table never answers for another.
 */
#define NT_MAX_PART (4096 + 16) /* as worker/trace/node_answers.py MAX_PART, MAX_FRAME_DATA */
#define NT_MAX_DATA (64u << 20)
#define NT_BODIES 8 /* a directory's answers: one per kind of first touch, and its opens */

typedef struct {
    const char *dir, *body[NT_BODIES];
    size_t dn, len[NT_BODIES], bytes;
    unsigned nb;
} nt_dir_t;

typedef struct {
    const char *dir, *body;
    size_t dn, len;
} nt_span_t;

typedef struct {
    nt_dir_t *dirs; /* in the order first met */
    size_t ndirs;
    nt_span_t *listings, *looked;
    size_t nlistings, nlooked;
    uint32_t *index; /* directory -> dirs index + 1 */
    size_t icap;
} nt_t;

static void nt_free(nt_t *t)
{
    free(t->dirs);
    free(t->listings);
    free(t->looked);
    free(t->index);
    memset(t, 0, sizeof *t);
}

/* 0: read into *t (nt_free it); -1: bytes that are not frames (nothing is to be taken);
 * -2: out of memory. */
static int nt_read(const char *data, size_t n, const char *within, size_t wn, nt_t *t)
{
    memset(t, 0, sizeof *t);
    size_t frames = 0;
    for (size_t off = 0; off < n; frames++) {
        uint32_t pn, dn;
        if (n - off < 8)
            return -1;
        memcpy(&pn, data + off, 4);
        memcpy(&dn, data + off + 4, 4);
        off += 8;
        if (pn == 0 || pn > NT_MAX_PART || dn > NT_MAX_DATA || n - off < (size_t)pn + dn)
            return -1;
        off += (size_t)pn + dn;
    }
    t->icap = 16;
    while (t->icap < frames * 2)
        t->icap *= 2;
    t->dirs = table_calloc(frames + 1, sizeof *t->dirs);
    t->listings = table_calloc(frames + 1, sizeof *t->listings);
    t->looked = table_calloc(frames + 1, sizeof *t->looked);
    t->index = table_calloc(t->icap, sizeof *t->index);
    if (!t->dirs || !t->listings || !t->looked || !t->index) {
        nt_free(t);
        return -2;
    }
    for (size_t off = 0; off < n;) {
        uint32_t pn, dn;
        memcpy(&pn, data + off, 4);
        memcpy(&dn, data + off + 4, 4);
        const char *part = data + off + 8, *body = part + pn;
        off += 8 + (size_t)pn + dn;
        const char *nul = memchr(part, 0, pn);
        size_t dl = nul ? (size_t)(nul - part) : pn, wl = nul ? pn - dl - 1 : 0;
        if (dl < wn || memcmp(part, within, wn) != 0 || (dl > wn && part[wn] != '/'))
            continue; /* another repository's */
        if (wl == 7 && memcmp(nul + 1, "listing", 7) == 0) {
            t->listings[t->nlistings++] = (nt_span_t){part, body, dl, dn};
            continue;
        }
        if (wl == 12 && memcmp(nul + 1, "opens-looked", 12) == 0) {
            t->looked[t->nlooked++] = (nt_span_t){part, body, dl, dn};
            continue;
        }
        nt_dir_t *d = NULL;
        for (size_t i = dir_hash(part, dl) & (t->icap - 1);; i = (i + 1) & (t->icap - 1)) {
            uint32_t v = t->index[i];
            if (!v) {
                t->index[i] = (uint32_t)++t->ndirs;
                d = &t->dirs[t->ndirs - 1];
                d->dir = part;
                d->dn = dl;
                break;
            }
            if (t->dirs[v - 1].dn == dl && memcmp(t->dirs[v - 1].dir, part, dl) == 0) {
                d = &t->dirs[v - 1];
                break;
            }
        }
        if (dn && d->nb < NT_BODIES) {
            d->body[d->nb] = body;
            d->len[d->nb++] = dn;
            d->bytes += dn;
        }
    }
    return 0;
}

/* Which of a table's directories put_table puts at once (the first, up to `eager` bytes). */
static int nt_eager(const nt_dir_t *d, size_t eager, size_t *size)
{
    if (*size + d->bytes > eager)
        return 0;
    *size += d->bytes;
    return 1;
}

/* The tables put_table took answers from: their memory stays until the run's answers go. */
static Py_buffer *held_tables;
static size_t nheld_tables;

static void release_tables(void)
{
    for (size_t i = 0; i < nheld_tables; i++)
        PyBuffer_Release(&held_tables[i]);
    free(held_tables);
    held_tables = NULL;
    nheld_tables = 0;
}

static PyObject *trap_put_table(PyObject *self, PyObject *args)
{
    Py_buffer view;
    const char *within, *prefix;
    Py_ssize_t wn, pn, eager;
    long long uid, gid, dev;
    int dirfd;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y#ny#LLLi", &view, &within, &wn, &eager, &prefix, &pn, &uid,
                          &gid, &dev, &dirfd))
        return NULL;
    if (!handler) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_RuntimeError, "worker.trace._trap.put_table outside a run");
        return NULL;
    }
    nt_t t;
    int r = nt_read(view.buf, (size_t)view.len, within, (size_t)wn, &t);
    Py_buffer *more = r ? NULL : realloc(held_tables, (nheld_tables + 1) * sizeof *more);
    if (!more || set_job(prefix, (size_t)pn, uid, gid, dev, dirfd) < 0) {
        if (more)
            held_tables = more;
        nt_free(&t);
        PyBuffer_Release(&view);
        if (r == -1)
            Py_RETURN_NONE; /* not frames: Python says so */
        return PyErr_NoMemory();
    }
    held_tables = more;
    held_tables[nheld_tables++] = view; /* released with the run's answers */
    long n = 0;
    int oom = 0;
    for (size_t i = 0; i < t.nlistings && !oom; i++) { /* (a later one replaces) */
        dirmap_slot_t *l = dirmap_find(&node_listings, t.listings[i].dir, t.listings[i].dn, 1);
        oom = !l;
        if (l) {
            l->data = t.listings[i].body;
            l->len = t.listings[i].len;
        }
    }
    for (size_t i = 0; i < t.nlooked && !oom; i++)
        oom = !dirmap_find(&opens_looked, t.looked[i].dir, t.looked[i].dn, 1);
    if (!oom)
        ahead_start(); /* (the first revision mounted: the others' as their calls come) */
    size_t size = 0;
    for (size_t i = 0; i < t.ndirs && !oom && give_way_held(); i++) {
        const nt_dir_t *d = &t.dirs[i];
        if (nt_eager(d, (size_t)eager, &size)) {
            /* its opens when the job first opens a file there (one trap, and the put of a
             * few hundred opens, which a stat of a file there does not need): an open answer
             * costs ~15 times a stat's to put (the object's inode, its fstat answer), and a
             * node's answers hold the opens of every job */
            buf_t opens = {NULL, 0, 0};
            for (unsigned b = 0; b < d->nb && !oom; b++) {
                long k = put_packed_records(d->body[b], d->len[b], within, (size_t)wn, &opens);
                oom = k < 0;
                n += k > 0 ? k : 0;
            }
            dirmap_slot_t *o = opens.len ? dirmap_find(&opens_deferred, d->dir, d->dn, 1) : NULL;
            if (o && !o->data && od_n == od_cap) {
                size_t cap = od_cap ? od_cap * 2 : 256;
                void *g = realloc(od_order, cap * sizeof *od_order);
                if (g) {
                    od_order = g;
                    od_cap = cap;
                }
            }
            if (o && !o->data && od_n < od_cap) {
                o->data = opens.b;
                o->len = opens.len;
                od_order[od_n].dir = o->dir;
                od_order[od_n++].dn = o->dn;
            } else {
                oom = oom || (opens.len && !o);
                free(opens.b);
            }
        } else if (d->nb >= 1) { /* its answers (and its opens), where they lie: not copied */
            oom = stage_dir(d->dir, d->dn, within, (size_t)wn, d->body[0], d->len[0], 0) < 0;
            for (unsigned b = 1; b < d->nb && !oom; b++)
                oom = stage_more(d->dir, d->dn, d->body[b], d->len[b]) < 0;
        }
    }
    nt_free(&t);
    if (oom)
        return PyErr_NoMemory();
    return put_result(n);
}

/* holding(fn) -> fn() or None: call fn holding `big`, as a thread answering a call does, for a
 * thread of ours that is not one (the session's mount while the command starts): the node's
 * answers it brought are put before the program's first call on them, not by that call (~6 ms
 * of a warm import's first touch).  None, fn not called, outside a run: the run clears the
 * handler under `big` on its way out.  The caller holds no lock a thread answering a call may
 * wait for (lock order: big, then the GIL).  put_table gives way to those threads between
 * directories (give_way_held): the command's own start (its exec, the ptrace stops of its
 * loader) waited ~7 ms for a put that held `big` throughout. */
static PyObject *trap_holding(PyObject *self, PyObject *fn)
{
    (void)self;
    Py_BEGIN_ALLOW_THREADS
    big_lock();
    Py_END_ALLOW_THREADS
    holding_ahead = 1;
    PyObject *r = handler ? PyObject_CallNoArgs(fn) : Py_NewRef(Py_None);
    holding_ahead = 0;
    pthread_mutex_unlock(&big);
    return r;
}

/* running() -> bool: is a run on?  (Stable for a caller of holding(): the run clears its
 * handler under `big`, which put_table may have given way on.) */
static PyObject *trap_running(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyBool_FromLong(handler != NULL);
}

static PyObject *trap_read_table(PyObject *self, PyObject *args)
{
    Py_buffer view;
    const char *within;
    Py_ssize_t wn, eager;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y#n", &view, &within, &wn, &eager))
        return NULL;
    nt_t t;
    int r = nt_read(view.buf, (size_t)view.len, within, (size_t)wn, &t);
    PyObject *now = NULL, *later = NULL, *listings = NULL, *looked = NULL, *out = NULL;
    if (r == -2 || !(now = PyList_New(0)) || !(later = PyList_New(0)) ||
        !(listings = PyDict_New()) || !(looked = PyList_New(0)))
        goto done;
    if (r == -1) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    size_t size = 0;
    for (size_t i = 0; i < t.ndirs; i++) {
        PyObject *d = PyBytes_FromStringAndSize(t.dirs[i].dir, (Py_ssize_t)t.dirs[i].dn);
        int bad = !d || PyList_Append(nt_eager(&t.dirs[i], (size_t)eager, &size) ? now : later,
                                      d) < 0;
        Py_XDECREF(d);
        if (bad)
            goto done;
    }
    for (size_t i = 0; i < t.nlistings; i++) {
        PyObject *d = PyBytes_FromStringAndSize(t.listings[i].dir, (Py_ssize_t)t.listings[i].dn);
        PyObject *b = PyBytes_FromStringAndSize(t.listings[i].body, (Py_ssize_t)t.listings[i].len);
        int bad = !d || !b || PyDict_SetItem(listings, d, b) < 0;
        Py_XDECREF(d);
        Py_XDECREF(b);
        if (bad)
            goto done;
    }
    for (size_t i = 0; i < t.nlooked; i++) {
        PyObject *d = PyBytes_FromStringAndSize(t.looked[i].dir, (Py_ssize_t)t.looked[i].dn);
        int bad = !d || PyList_Append(looked, d) < 0;
        Py_XDECREF(d);
        if (bad)
            goto done;
    }
    out = Py_BuildValue("OOOO", now, later, listings, looked);
done:
    if (r == -2)
        PyErr_NoMemory();
    nt_free(&t);
    PyBuffer_Release(&view);
    Py_XDECREF(now);
    Py_XDECREF(later);
    Py_XDECREF(listings);
    Py_XDECREF(looked);
    return out;
}

/* node_listing(directory) -> its listing from the node's table, or None */
static PyObject *trap_node_listing(PyObject *self, PyObject *args)
{
    const char *d;
    Py_ssize_t dn;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#", &d, &dn))
        return NULL;
    dirmap_slot_t *l = dn > 0 ? dirmap_find(&node_listings, d, (size_t)dn, 0) : NULL;
    if (!l || !l->data)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(l->data, (Py_ssize_t)l->len);
}

/* opens_looked(directory) -> did an earlier job of the node look for its opens ahead? */
static PyObject *trap_opens_looked(PyObject *self, PyObject *args)
{
    const char *d;
    Py_ssize_t dn;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#", &d, &dn))
        return NULL;
    return PyBool_FromLong(dn > 0 && dirmap_find(&opens_looked, d, (size_t)dn, 0) != NULL);
}

/* mirrored(directory): Python made its mirror. */
static PyObject *trap_mirrored(PyObject *self, PyObject *args)
{
    const char *d;
    Py_ssize_t dn;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#", &d, &dn))
        return NULL;
    if (handler && dn > 0 && !dirmap_find(&mirrored, d, (size_t)dn, 1))
        return PyErr_NoMemory();
    if (handler && (size_t)dn == mount_n && memcmp(d, mount_p, mount_n) == 0)
        ahead_reoffer(); /* (called while answering a call: `big` is ours) */
    Py_RETURN_NONE;
}

/* take_mirrored() -> [directory, ...]: those mirrored here since Python last asked. */
static PyObject *trap_take_mirrored(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    PyObject *out = strings_of(&mirror_notes, 0);
    mirror_notes.len = 0;
    return out;
}

/* Stage a directory's answers (`data`: `owned`, or in a table we hold); -1: out of memory
 * (`data` freed if owned). */
/* Another piece of a directory's answers just staged (stage_dir), put after it; -1: no room
 * (NT_BODIES pieces at most: never). */
static int stage_more(const char *d, size_t dn, const char *data, size_t len)
{
    staged_t *s = dn && len ? stg_find(d, dn, dir_hash(d, dn), 0) : NULL;
    if (!len || !s || !s->data)
        return 0;
    if (s->npieces == STG_PIECES)
        return -1;
    s->piece[s->npieces] = data;
    s->piece_len[s->npieces++] = len;
    s->len += len;
    return 0;
}

static int stage_dir(const char *d, size_t dn, const char *within, size_t wn, const char *data,
                     size_t len, int owned)
{
    staged_t *s = dn && len ? stg_find(d, dn, dir_hash(d, dn), 1) : NULL;
    if (s && !s->dir) {
        s->dir = malloc(dn);
        s->within = malloc(wn ? wn : 1);
        if (!s->dir || !s->within) { /* left with dn 0: never found */
            free(s->dir);
            free(s->within);
            s->dir = s->within = NULL;
            s = NULL;
        } else {
            memcpy(s->dir, d, dn);
            memcpy(s->within, within, wn);
            s->dn = dn;
            s->wn = wn;
            if (stg_norder == stg_order_cap) {
                size_t cap = stg_order_cap ? stg_order_cap * 2 : 1024;
                stg_ref_t *o = realloc(stg_order, cap * sizeof *o);
                if (!o)
                    s = NULL;
                else {
                    stg_order = o;
                    stg_order_cap = cap;
                }
            }
            if (s) {
                s->order = stg_norder;
                stg_order[stg_norder++] = (stg_ref_t){s->dir, s->dn, s->h};
            }
        }
    }
    if (!s) {
        if (owned)
            free((char *)data);
        return dn && len ? -1 : 0;
    }
    if (!s->data)
        stg_pending++;
    else if (s->owned)
        free((char *)s->data);
    s->data = data;
    s->len = len;
    s->npieces = 0;
    s->owned = owned;
    return 0;
}

/* put_staged(directory) -> (n, listed directories, opens put), or None if the node had nothing
 * staged for it: its answers, and its opens if they were deferred (see put_table); a
 * directory put earlier gives (0, [directory], opens). */
static PyObject *trap_put_staged(PyObject *self, PyObject *args)
{
    const char *d;
    Py_ssize_t dn;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#", &d, &dn))
        return NULL;
    if (!handler) {
        PyErr_SetString(PyExc_RuntimeError, "worker.trace._trap.put_staged outside a run");
        return NULL;
    }
    staged_t *s = stg_find(d, (size_t)dn, dir_hash(d, (size_t)dn), 0);
    dirmap_slot_t *o = dn > 0 ? dirmap_find(&opens_deferred, d, (size_t)dn, 0) : NULL;
    long n = o && o->data ? put_opens_of(o) : 0; /* (Python is about to open a file there) */
    if (!s && !o)
        Py_RETURN_NONE;
    if (s && !s->data) { /* put by a call that missed: its listing marker is in the cache */
        int listed = cache_get(C_LISTED, 0, d, (size_t)dn, fnv(C_LISTED, 0, d, (size_t)dn)) != 0;
        if (listed && (buf_add(&put_listed, d, (size_t)dn) < 0 || buf_add(&put_listed, "", 1) < 0))
            return PyErr_NoMemory();
    } else if (s) {
        long k = stage_put(s);
        if (k < 0)
            return PyErr_NoMemory();
        n += k;
    }
    if (n < 0)
        return PyErr_NoMemory();
    return put_result(n);
}
