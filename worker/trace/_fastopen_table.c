/*
 * In-process answers, the tracer's side (worker/trace/_fastopen.c, which #includes this): the
 * table of answers tracees look up.  It uses _fastopen.c's statics (shm, hdr, slots, nused,
 * arena_used, files, file_heads); one translation unit with it, as worker/trace/trap/ with
 * _trap.c.
 */

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* Fault in [off, off + n) of the table, 256 KiB a call: MADV_POPULATE_WRITE holds the
 * process's mmap lock (for reading) for as long as one call takes, and every mmap, munmap and
 * mremap of the tracer's other threads (Python's allocator, the mount that waits for the
 * node's service) waits for it, and their page faults queue behind.  On a VM whose free pages
 * went back to the host after a few idle seconds, a page costs 4-18 µs: 1 MiB a call held it
 * ~4.5 ms, one call over a 20 MiB table ~80 ms. */
static void populate(size_t off, size_t n)
{
    const size_t step = 256ul << 10;
    for (size_t done = 0; done < n; done += step)
        madvise(shm + off + done, n - done < step ? n - done : step, MADV_POPULATE_WRITE);
}

/* Many answers are about to be published at once (a node's answers): fault in the slot table
 * and the arena they need in a few calls instead of one page fault each (on a VM, ~5 µs a
 * page: 30 ms for a node's 17,000 answers).  Only a hint: older kernels ignore it. */
static unsigned populated_bits; /* the table size faulted in so */
static unsigned long long n_moves; /* answers moved to a bigger table: how many times */
static int grow_to(unsigned bits);
void fo_reserve(size_t answers, size_t arena_bytes)
{
    if (!shm)
        return;
    fo_expect(answers);
    if (populated_bits != slot_bits) {
        populated_bits = slot_bits;
        populate(FO_TABLE_OFF(slot_bits), sizeof(fo_slot_t) << slot_bits);
    }
    size_t from = (arena_used + FO_PAGE - 1) & ~(FO_PAGE - 1);
    if (from >= FO_ARENA_SIZE)
        return;
    if (arena_bytes > FO_ARENA_SIZE - from)
        arena_bytes = FO_ARENA_SIZE - from;
    populate(FO_ARENA_OFF + from, (arena_bytes + FO_PAGE - 1) & ~(FO_PAGE - 1));
}

/* The table grows to hold `answers` more (at most half its slots used): at once, while it
 * holds few, instead of moving them all at each size on the way. */
void fo_expect(size_t answers)
{
    unsigned bits = slot_bits;
    while (bits < FO_MAX_BITS && (nused + answers) * 2 > (1ul << bits))
        bits++;
    if (shm && bits > slot_bits)
        grow_to(bits);
}

static uint64_t key_hash(unsigned kind, const char *k, size_t n)
{
    uint64_t h = FO_HASH_INIT;
    for (size_t i = 0; i < n; i++)
        h = fo_hash_step(h, (unsigned char)k[i]);
    return fo_hash_finish(h, kind);
}

static size_t file_hash(uint64_t dev, uint64_t ino, size_t cap)
{
    return (size_t)fo_file_hash(dev, ino) & (cap - 1);
}

/* The chain head of (dev, ino) in file_heads (with `create`: a new empty one if it has none,
 * NULL if out of memory); NULL if none. */
static uint32_t *file_head(uint64_t dev, uint64_t ino, int create)
{
    if (create && (nfile_heads + 1) * 2 > cap_file_heads) {
        size_t cap = cap_file_heads ? cap_file_heads * 2 : 4096;
        uint32_t *t = calloc(cap, sizeof *t);
        if (!t)
            return NULL;
        for (size_t k = 0; k < cap_file_heads; k++) {
            uint32_t v = file_heads[k];
            if (!v)
                continue;
            size_t j = file_hash(files[v - 1].dev, files[v - 1].ino, cap);
            while (t[j])
                j = (j + 1) & (cap - 1);
            t[j] = v;
        }
        free(file_heads);
        file_heads = t;
        cap_file_heads = cap;
    }
    if (!cap_file_heads)
        return NULL;
    for (size_t j = file_hash(dev, ino, cap_file_heads);; j = (j + 1) & (cap_file_heads - 1)) {
        uint32_t v = file_heads[j];
        if (!v) {
            if (!create)
                return NULL;
            nfile_heads++;
            return &file_heads[j];
        }
        if (files[v - 1].ino == ino && files[v - 1].dev == dev)
            return &file_heads[j];
    }
}

/* Put answers prefetch the slots their next few will probe: each is a cache and TLB miss in
 * a table of megabytes, most of the cost of a publish when they are not overlapped. */
uint64_t fo_prefetch_hash(uint64_t h)
{
    if (shm)
        __builtin_prefetch(&slots[h & ((1ul << slot_bits) - 1)], 0, 3);
    return h;
}

/* The live slot for (kind, key) in the table of 1 << bits slots at t, or NULL. */
static fo_slot_t *find_in(fo_slot_t *t, unsigned bits, unsigned kind, const char *k, size_t n,
                          uint64_t h)
{
    const size_t mask = (1ul << bits) - 1;
    for (size_t i = h & mask, c = 0; c <= mask; i = (i + 1) & mask, c++) {
        fo_slot_t *s = &t[i];
        if (!s->hash)
            return NULL;
        if (s->hash == h && s->kind == kind && s->key_len == n && s->epoch == hdr->epoch &&
            memcmp(shm + FO_ARENA_OFF + s->key_off, k, n) == 0)
            return s;
    }
    return NULL;
}

static fo_slot_t *slot_find(unsigned kind, const char *k, size_t n, uint64_t h)
{
    return find_in(slots, slot_bits, kind, k, n, h);
}

/* An answer withdrawn from the table is withdrawn from the smaller ones it grew out of too: a
 * lookup that read the header before the table grew is still in one of them. */
static void kill_older(unsigned kind, const char *k, size_t n, uint64_t h)
{
    for (unsigned b = first_bits; b < slot_bits; b++) {
        fo_slot_t *s = find_in((fo_slot_t *)(shm + FO_TABLE_OFF(b)), b, kind, k, n, h);
        if (s)
            __atomic_store_n(&s->epoch, 0, __ATOMIC_RELEASE);
    }
}

static void withdraw_slot(fo_slot_t *s)
{
    __atomic_store_n(&s->epoch, 0, __ATOMIC_RELEASE);
    if (slot_bits > first_bits)
        kill_older(s->kind, shm + FO_ARENA_OFF + s->key_off, s->key_len, s->hash);
}

#define NO_SLOT UINT32_MAX /* a file's answer that a grown table did not take (withdrawn) */

/* Move the live answers into the table of 1 << bits slots, then name it in the header (one
 * release store: a tracee that reads the new size finds every answer there).  The old table
 * stays as it is; a slot is never reused.  0, or -1 out of memory (nothing moved). */
static int grow_to(unsigned bits)
{
    const size_t n = 1ul << bits, old_n = 1ul << slot_bits;
    fo_slot_t *t = (fo_slot_t *)(shm + FO_TABLE_OFF(bits));
    uint32_t *moved = malloc(old_n * sizeof *moved); /* old slot -> new */
    if (!moved)
        return -1;
    size_t live = 0;
    for (size_t i = 0; i < old_n; i++) {
        const fo_slot_t *s = &slots[i];
        moved[i] = NO_SLOT;
        if (!s->hash || s->epoch != hdr->epoch)
            continue;
        size_t j = s->hash & (n - 1);
        while (t[j].hash)
            j = (j + 1) & (n - 1);
        t[j] = *s; /* (no tracee reads this table before the header names it) */
        moved[i] = (uint32_t)j;
        live++;
    }
    for (size_t f = 0; f < nfiles; f++)
        if (files[f].slot != NO_SLOT)
            files[f].slot = moved[files[f].slot];
    free(moved);
    slots = t;
    slot_bits = bits;
    nused = live;
    n_moves++;
    if (!live) /* no older table holds a live answer either: none to withdraw there */
        first_bits = bits;
    __atomic_store_n(&hdr->slot_bits, bits, __ATOMIC_RELEASE);
    return 0;
}

int fo_find(unsigned kind, const char *key, size_t kn, const char **data, size_t *dlen,
            int *err, int *is_path)
{
    if (!shm)
        return 0;
    const fo_slot_t *sl = slot_find(kind, key, kn, key_hash(kind, key, kn));
    if (!sl)
        return 0;
    *data = shm + FO_ARENA_OFF + sl->data_off;
    *dlen = sl->data_len;
    *err = sl->err;
    *is_path = sl->is_path;
    return 1;
}

int fo_publish(unsigned kind, const char *key, size_t kn, const void *data, size_t dlen,
               int is_path, int err, uint64_t dev, uint64_t ino)
{
    return fo_publish_hashed(kind, key, kn, key_hash(kind, key, kn), data, dlen, is_path, err,
                             dev, ino);
}

static int publish_slot(unsigned kind, const char *key, size_t kn, uint64_t h, const void *data,
                        size_t dlen, int is_path, int err, uint64_t dev, uint64_t ino,
                        uint32_t stat_at);

int fo_publish_hashed(unsigned kind, const char *key, size_t kn, uint64_t h, const void *data,
                      size_t dlen, int is_path, int err, uint64_t dev, uint64_t ino)
{
    return publish_slot(kind, key, kn, h, data, dlen, is_path, err, dev, ino, 0);
}

static int publish_slot(unsigned kind, const char *key, size_t kn, uint64_t h, const void *data,
                        size_t dlen, int is_path, int err, uint64_t dev, uint64_t ino,
                        uint32_t stat_at)
{
    if (!shm)
        return 0;
    fo_slot_t *s = slot_find(kind, key, kn, h);
    char *arena = shm + FO_ARENA_OFF;
    if (s) {
        if (s->data_len == dlen && s->err == err && s->stat_at == stat_at &&
            (!dlen || memcmp(arena + s->data_off, data, dlen) == 0))
            return 1;
        withdraw_slot(s); /* a new answer: replace */
    }
    size_t koff = (arena_used + 7) & ~(size_t)7, doff = (koff + kn + 1 + 7) & ~(size_t)7;
    if (doff + dlen > FO_ARENA_SIZE)
        return 0; /* full: later answers take the tracer's way */
    if ((nused + 1) * 2 > (1ul << slot_bits) &&
        (slot_bits == FO_MAX_BITS || grow_to(slot_bits + 1) < 0))
        return 0;
    const size_t mask = (1ul << slot_bits) - 1;
    size_t i = h & mask;
    while (slots[i].hash)
        i = (i + 1) & mask;
    s = &slots[i];
    memcpy(arena + koff, key, kn);
    arena[koff + kn] = 0;
    if (dlen)
        memcpy(arena + doff, data, dlen);
    s->key_off = (uint32_t)koff;
    s->key_len = (uint32_t)kn;
    s->data_off = (uint32_t)doff;
    s->data_len = (uint32_t)dlen;
    s->kind = (uint16_t)kind;
    s->is_path = (uint16_t)(is_path != 0);
    s->err = err;
    s->stat_at = stat_at;
    s->epoch = hdr->epoch;
    if (ino) {
        uint32_t *head = file_head(dev, ino, 1);
        if (head && nfiles == cap_files) {
            size_t cap = cap_files ? cap_files * 2 : 4096;
            struct fo_file *more = realloc(files, cap * sizeof *files);
            if (more) {
                files = more;
                cap_files = cap;
            }
        }
        if (!head || nfiles == cap_files) /* cannot track it: not published (hash stays 0) */
            return 0;
        files[nfiles] = (struct fo_file){dev, ino, (uint32_t)i, *head};
        *head = (uint32_t)++nfiles;
    }
    arena_used = doff + dlen;
    nused++;
    __atomic_store_n(&s->hash, h, __ATOMIC_RELEASE);
    return 1;
}

void fo_withdraw(unsigned kind, const char *key, size_t kn)
{
    if (!shm)
        return;
    fo_slot_t *s = slot_find(kind, key, kn, key_hash(kind, key, kn));
    if (s)
        withdraw_slot(s);
}

size_t fo_withdraw_file(uint64_t dev, uint64_t ino, const char **opens, size_t *lens,
                        size_t max)
{
    uint32_t *head = shm && ino ? file_head(dev, ino, 0) : NULL;
    size_t n = 0;
    for (uint32_t f = head ? *head : 0; f; f = files[f - 1].next) {
        if (files[f - 1].slot == NO_SLOT)
            continue;
        fo_slot_t *sl = &slots[files[f - 1].slot];
        if (sl->epoch != hdr->epoch)
            continue;
        withdraw_slot(sl);
        if (sl->kind == FO_OPEN && n < max) { /* (keys stay in the arena) */
            opens[n] = shm + FO_ARENA_OFF + sl->key_off;
            lens[n++] = sl->key_len;
        }
    }
    return n;
}

void fo_withdraw_all(void)
{
    if (shm)
        __atomic_add_fetch(&hdr->epoch, 1, __ATOMIC_RELEASE);
}

/* --stats-internals: the table's live answers (at its last move, and put since), its size,
 * and how many times answers were moved to a bigger one. */
void fo_table(unsigned long long *answers, unsigned long long *nslots, unsigned long long *moves)
{
    *answers = shm ? nused : 0;
    *nslots = shm ? 1ull << slot_bits : 0;
    *moves = shm ? n_moves : 0;
}
