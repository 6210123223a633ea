/*
 * The upcall: Python's action tuple parsed (parse_action), answers derived in C from answers
 * at hand (absent_from_listing, known_stat, derived), and lookup: cache, node, then Python
 * (answer_stat: a path's stat answer through it).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and answers.c, config.c define.
 */

/* ---------- upcall ---------- */

static int parse_action(PyObject *res, action_t *a, int *cacheable, PyObject **argv_prefix)
{
    /* (cacheable, kind, ival, bval, st_tuple|None, argv_prefix|None) */
    PyObject *bval, *st, *argv;
    int c, kind;
    long long ival;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTuple(res, "piLOOO", &c, &kind, &ival, &bval, &st, &argv))
        return -1;
    a->kind = kind;
    a->ival = ival;
    *cacheable = c;
    if (bval != Py_None) {
        char *b;
        Py_ssize_t bl;
        if (PyBytes_AsStringAndSize(bval, &b, &bl) < 0)
            return -1;
        a->bval = malloc((size_t)bl + 1);
        if (!a->bval) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(a->bval, b, (size_t)bl);
        a->bval[bl] = 0;
        a->blen = (size_t)bl;
    }
    if (st != Py_None) {
        if (!PyTuple_Check(st) || PyTuple_GET_SIZE(st) != 15) {
            PyErr_SetString(PyExc_TypeError, "stat tuple must have 15 ints");
            return -1;
        }
        for (int i = 0; i < 15; i++) {
            a->st[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(st, i));
            if (a->st[i] == -1 && PyErr_Occurred())
                return -1;
        }
    }
    if (argv != Py_None) {
        Py_INCREF(argv);
        *argv_prefix = argv;
    }
    return 0;
}

/* Is `key` a name its listed parent directory does not have (see C_LISTED)? */
static int absent_from_listing(const char *key, size_t kn)
{
    const char *slash = memrchr(key, '/', kn);
    if (!slash || slash == key)
        return 0;
    size_t pn = (size_t)(slash - key), nn = kn - pn - 1;
    const char *name = slash + 1;
    if (nn == 0 || (name[0] == '.' && (nn == 1 || (nn == 2 && name[1] == '.'))))
        return 0;
    return !fo_lost && cache_get(C_LISTED, 0, key, pn, fnv(C_LISTED, 0, key, pn)) &&
           !cache_find(C_NAMED, 0, key, kn, fnv(C_NAMED, 0, key, kn));
}

/* The stat answer at hand for a path (C_STAT, `flags` 0 or F_NOFOLLOW), or NULL. */
static const action_t *known_stat(const char *key, size_t kn, int flags)
{
    entry_t *s = cache_find(C_STAT, flags, key, kn, fnv(C_STAT, flags, key, kn));
    return s && s->act.kind == A_STAT && s->act.st[0] ? &s->act : NULL;
}

/* Answers that follow from answers at hand, as Python would give them (worker/trace/tracer.py):
 * access and readlink of a path whose stat is known, ENOTDIR below a known non-directory.
 * So a path answered ahead (a directory's entries, the node's answers) needs Python for
 * none of these.  1 if *out is set. */
static int derived(int cls, int flags, const char *key, size_t kn, action_t *out)
{
    memset(out, 0, sizeof *out);
    out->kind = A_RETURN;
    const char *slash = memrchr(key, '/', kn);
    if (slash && slash != key && cls != C_EXEC && cls < C_WRITE && !(flags & F_PROCEXE)) {
        const action_t *up = known_stat(key, (size_t)(slash - key), 0);
        if (up && !S_ISDIR((mode_t)up->st[0])) {
            out->ival = -ENOTDIR;
            return 1;
        }
    }
    if (cls == C_ACCESS && !(flags & ~(7 | F_NOFOLLOW))) {
        const action_t *st = known_stat(key, kn, flags & F_NOFOLLOW);
        if (!st)
            return 0;
        int want = flags & 7;
        mode_t mode = (mode_t)st->st[0];
        int ok;
        if (want & W_OK) {
            out->ival = -EROFS;
            return 1;
        }
        if ((want & X_OK) && !(mode & 0111) && !S_ISDIR(mode))
            ok = 0;
        else if (getuid() == 0)
            ok = !((want & X_OK) && !(mode & 0111));
        else {
            unsigned bits = (want & R_OK ? 4u : 0u) | (want & X_OK ? 1u : 0u);
            ok = ((mode >> 6) & bits) == bits;
        }
        out->ival = ok ? 0 : -EACCES;
        return 1;
    }
    if ((cls == C_XATTR_GET || cls == C_XATTR_LIST) && !(flags & ~F_NOFOLLOW) && slash &&
        slash != key) {
        const action_t *st = known_stat(key, kn, F_NOFOLLOW);
        size_t pn = (size_t)(slash - key);
        if (!st || (!(flags & F_NOFOLLOW) && S_ISLNK((mode_t)st->st[0])) ||
            !cache_get(C_NOXATTR, 0, key, pn, fnv(C_NOXATTR, 0, key, pn)))
            return 0;
        out->ival = cls == C_XATTR_GET ? -ENODATA : 0;
        return 1;
    }
    if (cls == C_READLINK && !flags) {
        const action_t *st = known_stat(key, kn, F_NOFOLLOW);
        if (!st || S_ISLNK((mode_t)st->st[0]))
            return 0;
        out->ival = -EINVAL;
        return 1;
    }
    return 0;
}

/* Returns a pointer to a cached or temporary action (tmp); *argv_prefix set for A_EXEC. */
static action_t *lookup(pid_t tid, int cls, int flags, const char *key, size_t kn, action_t *tmp,
                        PyObject **argv_prefix)
{
    uint64_t h = fnv(cls, flags, key, kn);
    entry_t *e = cache_find(cls, flags, key, kn, h);
    if (e) {
        n_hits++;
        return &e->act;
    }
    if (put_staged_ancestors(key, kn) || /* what the node knows of this part of the tree */
        (cls == C_OPEN && put_deferred_opens(key, kn))) {
        opens_start(); /* and the rest of it by a thread, ahead of the program */
        e = cache_find(cls, flags, key, kn, h);
        if (e) {
            n_hits++;
            return &e->act;
        }
    }
    if (cls == C_OPEN && flags == F_NOFOLLOW) { /* tar, grep -r, du: O_NOFOLLOW where the */
        const action_t *st = known_stat(key, kn, F_NOFOLLOW); /* lstat answer is no symlink */
        if (st && st->kind == A_STAT && !S_ISLNK((mode_t)st->st[0])) { /* is the plain open */
            flags = 0;
            h = fnv(cls, flags, key, kn);
            if ((e = cache_find(cls, flags, key, kn, h))) {
                n_hits++;
                return &e->act;
            }
        }
    }
    int cacheable = 0;
    if (cls != C_EXEC && cls < C_WRITE && !(flags & F_PROCEXE) && absent_from_listing(key, kn)) {
        n_absent++;
        memset(tmp, 0, sizeof *tmp);
        tmp->kind = A_RETURN;
        tmp->ival = -ENOENT;
        cacheable = 1;
        goto answered;
    }
    if (derived(cls, flags, key, kn, tmp)) {
        n_absent++;
        cacheable = 1;
        goto answered;
    }
    if (cls == C_OPEN && !flags && dir_open_from_node(key, kn, tmp)) {
        n_node_dirs++;
        cacheable = 1;
        goto answered;
    }
    n_upcalls++;
    PyGILState_STATE gil = PyGILState_Ensure(); /* the notification thread has no GIL */
    PyObject *res = PyObject_CallFunction(handler, "iiiy#", (int)tid, cls, flags, key,
                                          (Py_ssize_t)kn);
    if (!res || parse_action(res, tmp, &cacheable, argv_prefix) < 0) {
        PyErr_WriteUnraisable(handler);
        Py_XDECREF(res);
        PyGILState_Release(gil);
        free(tmp->bval);
        memset(tmp, 0, sizeof *tmp);
        tmp->kind = A_RETURN;
        tmp->ival = -EIO;
        return tmp;
    }
    Py_DECREF(res);
    PyGILState_Release(gil);
answered:
    if (!cacheable || *argv_prefix || (flags & F_PROCEXE))
        return tmp;
    e = calloc(1, sizeof *e);
    char *k = malloc(kn + 1);
    if (!e || !k) {
        free(e);
        free(k);
        return tmp;
    }
    memcpy(k, key, kn + 1);
    e->hash = h;
    e->cls = cls;
    e->flags = flags;
    e->key = k;
    e->klen = kn;
    e->act = *tmp;
    tmp->bval = NULL;
    cache_del(cls, flags, key, kn); /* one the handler put meanwhile (trap_put): ours wins */
    cache_put(e);
    return &e->act;
}

/* The stat answer a call on key[0, kn) (NUL after it) gets (flags 0, or F_NOFOLLOW: lstat),
 * from the answers at hand or Python: 1 with its fields in st; else 0 with *err its -errno,
 * or 0 for an answer that is no stat (a path leaving the mount). */
static int answer_stat(pid_t tid, int flags, const char *key, size_t kn, int64_t st[15],
                       long *err)
{
    action_t tmp;
    PyObject *prefix = NULL;
    memset(&tmp, 0, sizeof tmp);
    const action_t *a = lookup(tid, C_STAT, flags, key, kn, &tmp, &prefix);
    int ok = a->kind == A_STAT;
    if (ok)
        memcpy(st, a->st, 15 * sizeof *st);
    *err = a->kind == A_RETURN && a->ival < 0 ? (long)a->ival : 0;
    if (a == &tmp)
        free(tmp.bval);
    if (prefix) {
        PyGILState_STATE gil = PyGILState_Ensure();
        Py_DECREF(prefix);
        PyGILState_Release(gil);
    }
    return ok;
}
