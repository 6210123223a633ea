/*
 * In-process answers, the tracer's side (worker/trace/_fastopen.c, which #includes this
 * after its publishing): files that serve paths with different answers (fo_shared_t, see
 * _fastopen.h).  It uses _fastopen.c's statics (shm, hdr, arena_used, slot_find,
 * publish_slot, key_hash); one translation unit with it, as worker/trace/trap/ with _trap.c.
 */

/* The entry of (dev, ino) in the shared files (create: a new one, NULL if the table is
 * full), or NULL. */
static fo_shared_t *shared_entry(uint64_t dev, uint64_t ino, int create)
{
    fo_shared_t *t = (fo_shared_t *)(shm + FO_SHARED_OFF);
    for (size_t i = fo_file_hash(dev, ino) & (FO_NSHARED - 1), c = 0; c < FO_NSHARED / 2;
         i = (i + 1) & (FO_NSHARED - 1), c++) {
        if (t[i].ino == ino && t[i].dev == dev)
            return &t[i];
        if (!t[i].ino) {
            if (!create)
                return NULL;
            t[i].dev = dev;
            __atomic_store_n(&t[i].ino, ino, __ATOMIC_RELEASE);
            return &t[i];
        }
    }
    return NULL; /* probes are kept short: past half of them, the tracer's way */
}

/* A copy of a struct stat in the arena, as `last` says it (0: none, the tracer answers).
 * Each open the tracer answers may add one: past 3/4 of the arena they stop, so that they
 * never crowd out answers (a program opening shared files from sites that cannot be patched,
 * ~10 µs a stop, would need minutes to get there). */
static uint64_t last_of(const void *st)
{
    size_t off = (arena_used + 7) & ~(size_t)7;
    if (off + 144 > FO_ARENA_SIZE / 4 * 3)
        return 0;
    memcpy(shm + FO_ARENA_OFF + off, st, 144);
    arena_used = off + 144;
    return (uint64_t)hdr->epoch << 32 | off;
}

int fo_shared_add(uint64_t dev, uint64_t ino, const void *last)
{
    fo_shared_t *e = shm && ino ? shared_entry(dev, ino, 1) : NULL;
    if (!e)
        return 0;
    uint64_t l = last ? last_of(last) : 0;
    __atomic_store_n(&e->last, l, __ATOMIC_RELEASE);
    return 1;
}

int fo_shared_known(uint64_t dev, uint64_t ino)
{
    return shm && ino && shared_entry(dev, ino, 0) != NULL;
}

void fo_shared_opened(uint64_t dev, uint64_t ino, const void *st)
{
    fo_shared_t *e = shm && ino ? shared_entry(dev, ino, 0) : NULL;
    if (!e)
        return;
    uint64_t l = __atomic_load_n(&e->last, __ATOMIC_ACQUIRE);
    if (l && (uint32_t)(l >> 32) == hdr->epoch &&
        memcmp(shm + FO_ARENA_OFF + (uint32_t)l, st, 144) == 0)
        return; /* the same path again */
    __atomic_store_n(&e->last, last_of(st), __ATOMIC_RELEASE);
}

int fo_shared_last(uint64_t dev, uint64_t ino, void *st)
{
    fo_shared_t *e = shm && ino ? shared_entry(dev, ino, 0) : NULL;
    uint64_t l = e ? __atomic_load_n(&e->last, __ATOMIC_ACQUIRE) : 0;
    if (!l || (uint32_t)(l >> 32) != hdr->epoch)
        return 0;
    memcpy(st, shm + FO_ARENA_OFF + (uint32_t)l, 144);
    return 1;
}

int fo_publish_shared_open(const char *key, size_t kn, const char *target, size_t tn,
                           const void *st, uint64_t dev, uint64_t ino)
{
    if (!fo_shared_known(dev, ino))
        return 0;
    size_t at = (tn + 1 + 7) & ~(size_t)7; /* the path, its NUL, then the stat (aligned) */
    char data[4096 + 8 + 144];
    if (at + 144 > sizeof data)
        return 0;
    memcpy(data, target, tn);
    memset(data + tn, 0, at - tn);
    memcpy(data + at, st, 144);
    return publish_slot(FO_OPEN, key, kn, key_hash(FO_OPEN, key, kn), data, at + 144, 1, 0, dev,
                        ino, (uint32_t)at);
}
