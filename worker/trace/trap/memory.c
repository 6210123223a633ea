/*
 * Tracee memory: read_string, write_mem, and a call's arguments in the registers (argreg,
 * argoff).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses only
 * what _trap.c's header defines.
 */

/* ---------- tracee memory ---------- */

static long read_string(pid_t pid, unsigned long addr, char *buf, size_t max)
{
    size_t got = 0;
    if (!addr)
        return -EFAULT;
    while (got < max) {
        size_t chunk = 4096 - ((addr + got) & 4095);
        if (chunk > max - got)
            chunk = max - got;
        struct iovec l = {buf + got, chunk}, r = {(void *)(addr + got), chunk};
        ssize_t n = process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (n <= 0)
            return -EFAULT;
        char *z = memchr(buf + got, 0, (size_t)n);
        if (z)
            return z - buf;
        got += (size_t)n;
    }
    return -ENAMETOOLONG;
}

static int write_mem(pid_t pid, unsigned long addr, const void *data, size_t n)
{
    struct iovec l = {(void *)data, n}, r = {(void *)addr, n};
    ssize_t w = process_vm_writev(pid, &l, 1, &r, 1, 0);
    return w == (ssize_t)n ? 0 : -EFAULT;
}

static unsigned long long *argreg(struct user_regs_struct *r, int i)
{
    switch (i) {
    case 0: return &r->rdi;
    case 1: return &r->rsi;
    case 2: return &r->rdx;
    case 3: return &r->r10;
    case 4: return &r->r8;
    default: return &r->r9;
    }
}

static int argoff(int i)
{
    static const int offs[6] = {
        offsetof(struct user_regs_struct, rdi), offsetof(struct user_regs_struct, rsi),
        offsetof(struct user_regs_struct, rdx), offsetof(struct user_regs_struct, r10),
        offsetof(struct user_regs_struct, r8),  offsetof(struct user_regs_struct, r9),
    };
    return offs[i];
}
