/*
 * pack() and the packed answers a node's jobs share: the record format, this job's values
 * (set_job), putting packed bytes (put_packed_bytes/records), strings_of, put_result.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and answers.c, put.c define.
 */

/*
 * Answers ahead that another job of this node can use (worker/trace/node_answers.py): pack()
 * turns the items put() takes into bytes, put_table() puts them.  What differs between jobs is
 * written as a reference to the job's own value: the uid, gid and st_dev in stat answers, and
 * the directory through which the node cache service's objects are opened (`prefix`).  A
 * record: u8 cls, u8 kind, u16 flags, u8 bits, 3 bytes 0, u32 key length, u32 bval length,
 * i64 ival, [15 x i64 stat], key, bval.
 */
enum { PK_ST = 1, PK_BVAL = 2, PK_PREFIX = 4, PK_UID = 8, PK_GID = 16, PK_DEV = 32 };
#define PK_HEAD 24
#define PK_MAX_FIELD (1u << 20)

/* What answers ahead are made of; anything else in packed bytes is not taken. */
static int packed_answer_ok(int cls, int kind)
{
    switch (cls) {
    case C_STAT:
        return kind == A_STAT || kind == A_RETURN;
    case C_XATTR_GET:
    case C_XATTR_LIST:
        return kind == A_RETURN || kind == A_XATTRS;
    case C_OPEN:
        return kind == A_REDIRECT; /* put_one takes node cache objects by name only */
    case C_READLINK:
        return kind == A_READLINK;
    case C_LISTED:
    case C_NAMED:
    case C_NOXATTR:
        return kind == A_RETURN;
    default:
        return 0;
    }
}

static PyObject *trap_pack(PyObject *self, PyObject *args)
{
    PyObject *items, *item;
    const char *prefix;
    Py_ssize_t pn;
    long long uid, gid, dev;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oy#LLL", &items, &prefix, &pn, &uid, &gid, &dev))
        return NULL;
    PyObject *it = PyObject_GetIter(items);
    if (!it)
        return NULL;
    buf_t out = {NULL, 0, 0};
    int failed = 0;
    for (;;) {
        int cls, flags;
        const char *key;
        Py_ssize_t kn;
        action_t a;
        int got = next_answer(it, &item, &cls, &flags, &key, &kn, &a);
        if (got == 2 || got < 0) {
            failed = got < 0;
            break;
        }
        if (got == 0 || (size_t)kn > PK_MAX_FIELD || a.blen > PK_MAX_FIELD || cls < 0 ||
            cls > 255 || flags < 0 || flags > 0xffff || a.kind < 0 || a.kind > 255) {
            free(a.bval);
            Py_DECREF(item);
            continue;
        }
        unsigned bits = 0;
        const char *b = a.bval;
        size_t bn = a.blen;
        if (a.st[0]) {
            bits |= PK_ST;
            if (a.st[3] == uid)
                bits |= PK_UID;
            if (a.st[4] == gid)
                bits |= PK_GID;
            if (a.st[8] == dev)
                bits |= PK_DEV;
        }
        if (b) {
            bits |= PK_BVAL;
            if (cls == C_OPEN && pn && bn > (size_t)pn && memcmp(b, prefix, (size_t)pn) == 0) {
                bits |= PK_PREFIX;
                b += pn;
                bn -= (size_t)pn;
            }
        }
        char head[PK_HEAD];
        uint32_t k32 = (uint32_t)kn, b32 = (uint32_t)bn;
        uint16_t f16 = (uint16_t)flags;
        memset(head, 0, PK_HEAD);
        head[0] = (char)cls;
        head[1] = (char)a.kind;
        memcpy(head + 2, &f16, 2);
        head[4] = (char)bits;
        memcpy(head + 8, &k32, 4);
        memcpy(head + 12, &b32, 4);
        memcpy(head + 16, &a.ival, 8);
        failed = buf_add(&out, head, PK_HEAD) < 0 ||
                 ((bits & PK_ST) && buf_add(&out, a.st, 15 * 8) < 0) ||
                 buf_add(&out, key, (size_t)kn) < 0 || (bn && buf_add(&out, b, bn) < 0);
        free(a.bval);
        Py_DECREF(item);
        if (failed) {
            PyErr_NoMemory();
            break;
        }
    }
    Py_DECREF(it);
    PyObject *r = failed ? NULL : PyBytes_FromStringAndSize(out.b ? out.b : "", (Py_ssize_t)out.len);
    buf_free(&out);
    return r;
}

/* This job's values in packed answers (see pack), set by put_table. */
static struct {
    char *prefix;
    size_t pn;
    long long uid, gid, dev;
    int dirfd;
} job = {NULL, 0, 0, 0, 0, -1};
static buf_t put_notes;  /* "target\0path\0" of each open put, until Python takes them */
static buf_t put_listed; /* "dir\0" of each directory listed by the put going on */

static int set_job(const char *prefix, size_t pn, long long uid, long long gid, long long dev,
                   int dirfd)
{
    char *p = malloc(pn + 1);
    if (!p)
        return -1;
    memcpy(p, prefix, pn);
    p[pn] = 0;
    free(job.prefix);
    job.prefix = p;
    job.pn = pn;
    job.uid = uid;
    job.gid = gid;
    job.dev = dev;
    job.dirfd = dirfd;
    return 0;
}

/* Put pack()ed answers whose keys lie under `within` (one repository's mount path: a table
 * for one repository never answers for another), with this job's values (`job`).  Bytes that
 * do not parse end the walk (what came before stays).  -1: out of memory. */
/* The in-process kind a packed answer is published under (put_one), or 0. */
static unsigned packed_fo_kind(int cls, int flags)
{
    switch (cls) {
    case C_STAT:
        return flags & F_NOFOLLOW ? FO_LSTAT : FO_STAT;
    case C_NAMED:
        return FO_NAMED;
    case C_NOXATTR:
        return FO_NOXATTR;
    case C_OPEN:
        return FO_OPEN;
    default:
        return 0;
    }
}

/* Prefetch what putting the packed answer at `off` will probe first (the answer cache's slot
 * and the in-process table's): the next record's offset, or `end`. */
#define PUT_AHEAD 6

/* A directory's answers come together and their keys share its path: the hash states after
 * that path are kept, so only each name is hashed (FNV-1a is a byte-serial chain, most of the
 * cost of putting an answer once its slots are prefetched).  fnv()'s state depends on its
 * seed (cls, flags); the in-process hash's does not (its kind comes last). */
#define HASH_MEMO_SEEDS 8
static struct {
    char dir[MAXPATH];
    size_t dn; /* 0: none */
    uint64_t fo;
    unsigned nseeds;
    uint64_t seed[HASH_MEMO_SEEDS], state[HASH_MEMO_SEEDS];
} hash_memo;

/* fnv(cls, flags, key) into *cache; returns the in-process hash's state after the key (for
 * fo_hash_finish with a kind). */
static uint64_t packed_key_hashes(int cls, int flags, const char *key, size_t kn,
                                  uint64_t *cache)
{
    uint64_t seed = 1469598103934665603ULL ^ (uint64_t)(cls * 131 + flags);
    size_t dn = kn;
    while (dn > 0 && key[dn - 1] != '/')
        dn--;
    if (dn != hash_memo.dn || memcmp(key, hash_memo.dir, dn) != 0) {
        hash_memo.dn = 0;
        if (dn == 0 || dn > sizeof hash_memo.dir) {
            *cache = fnv(cls, flags, key, kn);
            uint64_t x = FO_HASH_INIT;
            for (size_t i = 0; i < kn; i++)
                x = fo_hash_step(x, (unsigned char)key[i]);
            return x;
        }
        memcpy(hash_memo.dir, key, dn);
        hash_memo.dn = dn;
        hash_memo.nseeds = 0;
        uint64_t x = FO_HASH_INIT;
        for (size_t i = 0; i < dn; i++)
            x = fo_hash_step(x, (unsigned char)key[i]);
        hash_memo.fo = x;
    }
    uint64_t c = 0;
    unsigned j = 0;
    for (; j < hash_memo.nseeds; j++)
        if (hash_memo.seed[j] == seed)
            break;
    if (j < hash_memo.nseeds) {
        c = hash_memo.state[j];
    } else {
        c = seed;
        for (size_t i = 0; i < dn; i++)
            c = (c ^ (unsigned char)key[i]) * 1099511628211ULL;
        if (hash_memo.nseeds < HASH_MEMO_SEEDS) {
            hash_memo.seed[hash_memo.nseeds] = seed;
            hash_memo.state[hash_memo.nseeds++] = c;
        }
    }
    uint64_t x = hash_memo.fo;
    for (size_t i = dn; i < kn; i++) { /* two independent chains: they overlap */
        unsigned char b = (unsigned char)key[i];
        c = (c ^ b) * 1099511628211ULL;
        x = fo_hash_step(x, b);
    }
    *cache = c ? c : 1;
    return x;
}
static size_t prefetch_packed(const char *data, size_t off, size_t end, put_hashes_t *ph)
{
    ph->cache = ph->fo = 0;
    if (end - off < PK_HEAD)
        return end;
    const char *p = data + off;
    uint32_t kn, bn;
    uint16_t f16;
    memcpy(&f16, p + 2, 2);
    memcpy(&kn, p + 8, 4);
    memcpy(&bn, p + 12, 4);
    size_t st = (unsigned char)p[4] & PK_ST ? 15 * 8 : 0;
    size_t need = PK_HEAD + st + (size_t)kn + bn;
    if (kn > PK_MAX_FIELD || bn > PK_MAX_FIELD || need > end - off)
        return end;
    const char *key = p + PK_HEAD + st;
    int cls = (unsigned char)p[0];
    unsigned kind = packed_fo_kind(cls, f16);
    uint64_t fo_partial = packed_key_hashes(cls, f16, key, kn, &ph->cache);
    if (table_cap)
        __builtin_prefetch(&table[ph->cache & (table_cap - 1)], 0, 3);
    if (kind)
        ph->fo = fo_prefetch_hash(fo_hash_finish(fo_partial, kind));
    return off + need;
}

static long put_packed_records(const char *data, size_t dn, const char *within, size_t wn,
                               buf_t *opens);

static long put_packed_bytes(const char *data, size_t dn, const char *within, size_t wn)
{
    return put_packed_records(data, dn, within, wn, NULL);
}

/* put_packed_bytes, but with `opens`, the open answers are not put: their records are added
 * there (for the caller to stage). */
static long put_packed_records(const char *data, size_t dn, const char *within, size_t wn,
                               buf_t *opens)
{
    long n = 0;
    size_t off = 0, end = dn, ahead = 0;
    if (dn >= (1 << 20)) {
        fo_reserve(dn / 170, dn); /* how many, what they take in the arena, roughly */
        cache_reserve(dn / 128); /* ~200 bytes a packed answer, half of them without a stat */
    }
    /* records prefetched and not yet put: their offsets and hashes (a ring) */
    size_t ring_off[PUT_AHEAD + 1];
    put_hashes_t ring[PUT_AHEAD + 1];
    unsigned head = 0, tail = 0;
    for (; tail < PUT_AHEAD && ahead < end; tail++) {
        ring_off[tail] = ahead;
        ahead = prefetch_packed(data, ahead, end, &ring[tail]);
    }
    while (end - off >= PK_HEAD) {
        if (ahead < end) {
            ring_off[tail % (PUT_AHEAD + 1)] = ahead;
            ahead = prefetch_packed(data, ahead, end, &ring[tail % (PUT_AHEAD + 1)]);
            tail++;
        }
        const put_hashes_t *ph = NULL;
        if (head != tail) { /* the same walk as ours: this record's hashes, unless not */
            unsigned r = head++ % (PUT_AHEAD + 1);
            ph = ring_off[r] == off && ring[r].cache ? &ring[r] : NULL;
        }
        const char *p = data + off;
        uint32_t kn, bn;
        action_t a;
        memset(&a, 0, sizeof a);
        uint16_t f16;
        memcpy(&f16, p + 2, 2);
        int cls = (unsigned char)p[0], flags = f16;
        unsigned bits = (unsigned char)p[4];
        a.kind = (unsigned char)p[1];
        memcpy(&kn, p + 8, 4);
        memcpy(&bn, p + 12, 4);
        memcpy(&a.ival, p + 16, 8);
        size_t need = PK_HEAD + (bits & PK_ST ? 15 * 8 : 0) + (size_t)kn + bn;
        if (kn > PK_MAX_FIELD || bn > PK_MAX_FIELD || need > end - off)
            break;
        p += PK_HEAD;
        if (bits & PK_ST) {
            memcpy(a.st, p, 15 * 8);
            p += 15 * 8;
            if (bits & PK_UID)
                a.st[3] = job.uid;
            if (bits & PK_GID)
                a.st[4] = job.gid;
            if (bits & PK_DEV)
                a.st[8] = job.dev;
        }
        const char *key = p;
        p += kn;
        off += need;
        if (kn < wn || memcmp(key, within, wn) != 0 || (kn > wn && key[wn] != '/') ||
            memchr(key, 0, kn) || !packed_answer_ok(cls, a.kind))
            continue;
        if (opens && cls == C_OPEN) {
            if (buf_add(opens, data + off - need, need) < 0)
                return -1;
            continue;
        }
        size_t pre = bits & PK_PREFIX ? job.pn : 0;
        if (bits & PK_BVAL) {
            a.bval = malloc(pre + bn + 1);
            if (!a.bval)
                return -1;
            memcpy(a.bval, job.prefix, pre);
            memcpy(a.bval + pre, p, bn);
            a.blen = pre + bn;
            a.bval[a.blen] = 0;
        }
        char *target = NULL;
        size_t tn = 0;
        if (cls == C_OPEN && a.bval) { /* put_one may free it: keep the name for the note */
            tn = a.blen;
            target = malloc(tn + 1);
            if (!target) {
                free(a.bval);
                return -1;
            }
            memcpy(target, a.bval, tn + 1);
        }
        int took = put_one(cls, flags, key, kn, &a, job.dirfd, pre, ph);
        n += took;
        int bad = 0;
        if (took && target)
            bad = buf_add(&put_notes, target, tn + 1) < 0 || buf_add(&put_notes, key, kn) < 0 ||
                  buf_add(&put_notes, "", 1) < 0;
        else if (took && cls == C_LISTED)
            bad = buf_add(&put_listed, key, kn) < 0 || buf_add(&put_listed, "", 1) < 0;
        free(target);
        if (bad)
            return -1;
    }
    n_node_puts += (unsigned long long)n;
    return n;
}

/* The NUL-separated strings of a buffer as a list of bytes (pairs: a list of 2-tuples). */
static PyObject *strings_of(const buf_t *b, int pairs)
{
    PyObject *out = PyList_New(0);
    const char *p = b->b, *e = b->b + b->len;
    while (out && p < e) {
        const char *a = p, *a_end = memchr(p, 0, (size_t)(e - p));
        if (!a_end)
            break;
        p = a_end + 1;
        PyObject *item;
        if (pairs) {
            const char *b_end = memchr(p, 0, (size_t)(e - p));
            if (!b_end)
                break;
            item = Py_BuildValue("(y#y#)", a, (Py_ssize_t)(a_end - a), p,
                                 (Py_ssize_t)(b_end - p));
            p = b_end + 1;
        } else {
            item = PyBytes_FromStringAndSize(a, a_end - a);
        }
        if (!item || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

/* (n, directories listed by this put, (object file, path) of every open put since Python
 * last asked) */
static PyObject *put_result(long n)
{
    PyObject *listed = strings_of(&put_listed, 0), *opens = strings_of(&put_notes, 1);
    put_listed.len = 0;
    put_notes.len = 0;
    if (!listed || !opens) {
        Py_XDECREF(listed);
        Py_XDECREF(opens);
        return NULL;
    }
    return Py_BuildValue("lNN", n, listed, opens);
}
