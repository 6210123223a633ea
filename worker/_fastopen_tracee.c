/*
 * The in-process open handler: runs inside tracees (see _fastopen.h).
 *
 * Not linked into anything: setup.py compiles it freestanding and position-independent and
 * embeds the bytes of its .text in worker._trap, which copies them into the shared memfd
 * that every tracee maps.  So: no libc, no data outside .text, no relocations (setup.py
 * refuses to build if there are any), general registers only.
 *
 * A patched call site jumps to its trampoline, which steps over the red zone and calls
 * fo_entry with the syscall number in rax and the arguments in the syscall registers;
 * fo_entry returns the syscall's result in rax and preserves every other register a
 * syscall preserves.  Paths it cannot answer from the table, and calls that are not plain
 * read-only opens, are made as they were (and trap to the tracer as before).
 */
#include "_fastopen.h"

static long fo_main(const char *base, long nr, const long *a)
    __attribute__((used, noinline, noclone));

__asm__(".text\n"
        ".type fo_entry, @function\n"
        "fo_entry:\n"
        "    push %rbp\n"
        "    mov %rsp, %rbp\n"
        "    push %r9\n"
        "    push %r8\n"
        "    push %r10\n"
        "    push %rdx\n"
        "    push %rsi\n"
        "    push %rdi\n"
        "    mov %rsp, %rdx\n"        /* a: rdi rsi rdx r10 r8 r9 */
        "    mov %rax, %rsi\n"        /* nr */
        "    lea fo_entry(%rip), %rdi\n" /* base: the blob starts here */
        "    and $-16, %rsp\n"
        "    call fo_main\n"
        "    lea -48(%rbp), %rsp\n"
        "    pop %rdi\n"
        "    pop %rsi\n"
        "    pop %rdx\n"
        "    pop %r10\n"
        "    pop %r8\n"
        "    pop %r9\n"
        "    pop %rbp\n"
        "    ret\n");

static inline long fo_syscall6(long nr, long a, long b, long c, long d, long e, long f)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

/* The path, if it is "<mount>/..." already in normal form (no "//", ".", "..", trailing
 * "/"): the tracer publishes keys in that form.  Returns its length, or 0. */
static unsigned long normal_mount_path(const fo_hdr_t *h, const char *p, uint64_t *hash)
{
    uint64_t x = FO_HASH_INIT;
    unsigned long i = 0, m = h->mount_len;
    for (; i < m; i++) {
        if (p[i] != h->mount[i])
            return 0;
        x = fo_hash_step(x, (unsigned char)p[i]);
    }
    for (;; i++) {
        char c = p[i];
        if (c == 0)
            break;
        if (i >= 4000)
            return 0;
        if (c == '/') {
            char n = p[i + 1];
            if (n == 0 || n == '/')
                return 0;
            if (n == '.' && (p[i + 2] == 0 || p[i + 2] == '/' ||
                             (p[i + 2] == '.' && (p[i + 3] == 0 || p[i + 3] == '/'))))
                return 0;
        } else if (i == m) {
            return 0; /* "/cvmfsx" */
        }
        x = fo_hash_step(x, (unsigned char)c);
    }
    if (i <= m + 1)
        return 0; /* "/cvmfs" itself: the tracer's */
    *hash = x ? x : 1;
    return i;
}

static long fo_main(const char *base, long nr, const long *a)
{
    const fo_hdr_t *h = (const fo_hdr_t *)(base + FO_HDR_OFF);
    fo_counters_t *cnt = (fo_counters_t *)(base + FO_CNT_OFF);
    const char *path;
    long fl, mode;
    if (nr == 257) { /* openat */
        path = (const char *)a[1];
        fl = a[2];
        mode = a[3];
    } else if (nr == 2) { /* open */
        path = (const char *)a[0];
        fl = a[1];
        mode = a[2];
    } else {
        goto pass;
    }
    if ((fl & FO_REFUSE) || !path)
        goto pass;
    uint64_t hash;
    unsigned long len = normal_mount_path(h, path, &hash);
    if (len) {
        const fo_slot_t *slots = (const fo_slot_t *)(base + FO_SLOTS_OFF);
        const char *arena = base + FO_ARENA_OFF;
        uint32_t epoch = __atomic_load_n(&h->epoch, __ATOMIC_ACQUIRE);
        for (unsigned long i = hash & (FO_NSLOTS - 1), k = 0; k < FO_NSLOTS;
             i = (i + 1) & (FO_NSLOTS - 1), k++) {
            const fo_slot_t *s = &slots[i];
            uint64_t sh = __atomic_load_n(&s->hash, __ATOMIC_ACQUIRE);
            if (sh == 0)
                break;
            if (sh != hash || s->key_len != len ||
                __atomic_load_n(&s->epoch, __ATOMIC_ACQUIRE) != epoch)
                continue;
            const char *key = arena + s->key_off;
            unsigned long j = 0;
            while (j < len && key[j] == path[j])
                j++;
            if (j != len)
                continue;
            long r = fo_syscall6(257, -100 /* AT_FDCWD */, (long)(arena + s->tgt_off), fl,
                                 mode, 0, (long)h->cookie);
            if (r != -2 /* ENOENT: evicted meanwhile; the tracer fetches it again */) {
                __atomic_fetch_add(&cnt->hits, 1, __ATOMIC_RELAXED);
                return r;
            }
            break;
        }
        __atomic_fetch_add(&cnt->misses, 1, __ATOMIC_RELAXED);
    }
pass:
    return fo_syscall6(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
}
