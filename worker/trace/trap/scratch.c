/*
 * Calls of our own in a tracee: the exec scratch mapping (scratch table, signals held while we
 * run calls, inject_entry/inject_exit), exec_scratch, exec_failed and vfork_done.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and threads.c, memory.c, exec.c define.
 */

/* ---------- calls of our own in a tracee: the exec scratch mapping ---------- */

/*
 * Scratch mappings nobody is using (a thread holds its in-flight one in its tstate):
 * SCR_OWN ones lie in tid's own address space (a group-stop came between two of our steps;
 * the thread's next exec reuses it, its next VFORK_DONE unmaps it), SCR_LEFT ones in the
 * address space tid left by exec'ing or exiting, which is its vfork parent's if it was one
 * (unmapped at the parent's VFORK_DONE).
 * A full table forgets its oldest entry (a leaked mapping at worst: the cookie check means a
 * forgotten or stale entry can never unmap anything else).
 */
enum { SCR_OWN = 1, SCR_LEFT = 2 };
typedef struct {
    pid_t tid;
    int kind;
    unsigned long addr, len;
} scratch_t;
#define SCRATCH_MAX 256
static scratch_t scratch[SCRATCH_MAX];
static size_t n_scratch;

static void scratch_add(pid_t tid, int kind, unsigned long addr, unsigned long len)
{
    if (n_scratch == SCRATCH_MAX)
        memmove(scratch, scratch + 1, --n_scratch * sizeof *scratch);
    scratch[n_scratch++] = (scratch_t){tid, kind, addr, len};
}

/* Remove and return one entry of tid of this kind (0: any kind). */
static int scratch_take(pid_t tid, int kind, unsigned long *addr, unsigned long *len)
{
    for (size_t i = 0; i < n_scratch; i++) {
        if (scratch[i].tid != tid || (kind && scratch[i].kind != kind))
            continue;
        *addr = scratch[i].addr;
        *len = scratch[i].len;
        memmove(scratch + i, scratch + i + 1, (--n_scratch - i) * sizeof *scratch);
        return 1;
    }
    return 0;
}

static void scratch_drop(pid_t tid, int kind)
{
    unsigned long addr, len;
    while (scratch_take(tid, kind, &addr, &len)) {}
}

/* Is [addr, addr+len) in tid's address space a mapping of ours (its tail says so)? */
static int scratch_is_ours(pid_t tid, unsigned long addr, unsigned long len)
{
    uint64_t tail[2];
    struct iovec l = {tail, sizeof tail}, rv = {(void *)(addr + len - sizeof tail), sizeof tail};
    return len >= sizeof tail &&
           process_vm_readv(tid, &l, 1, &rv, 1, 0) == (ssize_t)sizeof tail &&
           tail[0] == scratch_cookie && tail[1] == addr;
}

/* tid leaves its address space (it exec'd or died): a vfork child's scratch stays behind in
 * its parent's (whose VFORK_DONE unmaps it), anyone else's goes with it.  A thread whose
 * creation event we have not seen yet may be a vfork child: kept until that event says. */
static void scratch_left_mm(pid_t tid)
{
    tstate_t *t = thread_find(tid, 0);
    int shared = !t || t->origin == ORIGIN_VFORK || t->origin == ORIGIN_UNKNOWN;
    if (t && t->scr_len) {
        if (shared)
            scratch_add(tid, SCR_LEFT, t->scr_addr, t->scr_len);
        t->scr_addr = t->scr_len = 0;
    }
    for (size_t i = 0; i < n_scratch; i++) {
        if (scratch[i].tid != tid || scratch[i].kind != SCR_OWN)
            continue;
        if (shared) {
            scratch[i].kind = SCR_LEFT;
        } else {
            memmove(scratch + i, scratch + i + 1, (n_scratch - i - 1) * sizeof *scratch);
            n_scratch--;
            i--;
        }
    }
}

static void drop_signals(pid_t tid);

/* A thread died (or was replaced by an exec in another thread): its scratch, the signals held
 * for it, then its state. */
static void thread_gone(pid_t tid)
{
    scratch_left_mm(tid);
    drop_signals(tid);
    thread_forget(tid);
}

/* Wait for tid alone: other tracees' reports stay queued for the loop.  0, or -1 if it is
 * gone (nothing to wait for). */
static int wait_tid(pid_t tid, int *st)
{
    pid_t w;
    while ((w = waitpid(tid, st, __WALL)) < 0 && errno == EINTR) {}
    return w == tid ? 0 : -1;
}

static int is_syscall_stop(int st)
{
    return WIFSTOPPED(st) && WSTOPSIG(st) == (SIGTRAP | 0x80);
}

/*
 * Signals held back while a thread steps from one of our calls to the next.  Every step back
 * onto a syscall instruction passes through the return to user mode, where a pending signal
 * is delivered; natively it would have waited for the end of the program's execve.  Running
 * the handler in between would show the program our registers, and undoing our step instead
 * (making the call again after the handler) never ends when signals come faster than an exec
 * is set up (an interval timer).  So the signal-delivery stop is resumed without the signal,
 * and once the exec (or the unmapping) is done the tracer sends the same signal to the thread
 * again (tkill) and, at its delivery stop, puts the original siginfo back: the program gets
 * it with the sender, code and value it had, just after the call, as natively.
 */
typedef struct {
    pid_t tid;
    int sent; /* tkill'd again: the next delivery stop of this signal is this one */
    siginfo_t si;
} held_t;
#define HELD_MAX 64
static held_t held[HELD_MAX];
static size_t n_held;

/* Hold back the signal of this delivery stop; 0 if it cannot be (table full). */
static int hold_signal(pid_t tid)
{
    siginfo_t si;
    if (n_held == HELD_MAX || ptrace(PTRACE_GETSIGINFO, tid, 0, &si) != 0)
        return 0;
    for (size_t i = 0; i < n_held; i++) /* a standard signal pends once, as the kernel's would */
        if (held[i].tid == tid && !held[i].sent && held[i].si.si_signo == si.si_signo &&
            si.si_signo < SIGRTMIN)
            return 1;
    held[n_held++] = (held_t){tid, 0, si};
    return 1;
}

/* Send tid's held signals again (its steps are over).  A standard signal already sent and
 * not yet delivered again would merge with this one in the kernel: so does its entry. */
static void release_signals(pid_t tid)
{
    for (size_t i = 0; i < n_held; i++) {
        if (held[i].tid != tid || held[i].sent)
            continue;
        int merged = 0;
        for (size_t j = 0; j < n_held && held[i].si.si_signo < SIGRTMIN; j++)
            merged |= held[j].tid == tid && held[j].sent &&
                      held[j].si.si_signo == held[i].si.si_signo;
        if (merged) {
            memmove(held + i, held + i + 1, (n_held - i - 1) * sizeof *held);
            n_held--;
            i--;
            continue;
        }
        held[i].sent = 1;
        syscall(SYS_tkill, tid, held[i].si.si_signo);
    }
}

static void drop_signals(pid_t tid)
{
    size_t k = 0;
    for (size_t i = 0; i < n_held; i++)
        if (held[i].tid != tid)
            held[k++] = held[i];
    n_held = k;
}

/* At a signal-delivery stop of sig: if it is one of ours sent again, put its siginfo back
 * and return 1 (deliver it). */
static int resent_signal(pid_t tid, int sig)
{
    for (size_t i = 0; i < n_held; i++) {
        if (held[i].tid != tid || !held[i].sent || held[i].si.si_signo != sig)
            continue;
        siginfo_t si;
        if (ptrace(PTRACE_GETSIGINFO, tid, 0, &si) != 0 || si.si_code != SI_TKILL ||
            si.si_pid != getpid())
            return 0;
        ptrace(PTRACE_SETSIGINFO, tid, 0, &held[i].si);
        memmove(held + i, held + i + 1, (n_held - i - 1) * sizeof *held);
        n_held--;
        return 1;
    }
    return 0;
}

/* Resume tid with req and wait for its next stop, holding back signals delivered first
 * (hold_signal).  A group-stop, a signal that cannot be held, or its death is left in *st. */
static int wait_holding(pid_t tid, int req, int *st)
{
    for (;;) {
        if (ptrace(req, tid, 0, 0) != 0 || wait_tid(tid, st) < 0)
            return -1;
        if (!WIFSTOPPED(*st) || (*st >> 16) != 0 || WSTOPSIG(*st) == (SIGTRAP | 0x80) ||
            !hold_signal(tid))
            return 0;
    }
}

static void set_args(struct user_regs_struct *r, const unsigned long long a[6])
{
    r->rdi = a[0];
    r->rsi = a[1];
    r->rdx = a[2];
    r->r10 = a[3];
    r->r8 = a[4];
    r->r9 = a[5];
}

/*
 * At a seccomp stop (registers *at): make the trapped call nr(a) instead and run it to its
 * exit stop.  Since Linux 4.8 seccomp checks the new call again; the filter lets mmap,
 * mremap and munmap through.  No user code runs in between, so only the thread's death can
 * come first.  Returns 0 with the result in *ret, 1 with another waitpid status in *other
 * (for the loop), -1 when the thread is gone.
 */
static int inject_entry(pid_t tid, const struct user_regs_struct *at, long nr,
                        const unsigned long long a[6], long long *ret, int *other)
{
    struct user_regs_struct r = *at;
    r.orig_rax = (unsigned long long)nr;
    set_args(&r, a);
    int st;
    if (ptrace(PTRACE_SETREGS, tid, 0, &r) != 0 || ptrace(PTRACE_SYSCALL, tid, 0, 0) != 0 ||
        wait_tid(tid, &st) < 0)
        return -1;
    if (!is_syscall_stop(st)) {
        *other = st;
        return 1;
    }
    if (ptrace(PTRACE_GETREGS, tid, 0, &r) != 0)
        return -1;
    *ret = (long long)r.rax;
    return 0;
}

/*
 * At a syscall-exit stop: run nr(a) by stepping back onto the syscall instruction (2 bytes),
 * then leave the registers *final (the program's, after its own call).  Stepping back goes
 * through the return to user mode: signals delivered there are held (wait_holding); a
 * group-stop taken there puts *final back and is the loop's (1, *other), and our call is not
 * made.  Returns 0 (thread stopped at our call's exit with *final set, *ret its result), 1,
 * or -1 (gone).
 */
static int inject_exit(pid_t tid, const struct user_regs_struct *final, long nr,
                       const unsigned long long a[6], long long *ret, int *other)
{
    struct user_regs_struct r = *final;
    r.rip -= 2;
    r.rax = (unsigned long long)nr;
    r.orig_rax = (unsigned long long)-1; /* no syscall restart logic on the way back */
    set_args(&r, a);
    int st;
    if (ptrace(PTRACE_SETREGS, tid, 0, &r) != 0 || wait_holding(tid, PTRACE_SYSCALL, &st) < 0)
        return -1;
    if (!is_syscall_stop(st)) { /* a group-stop, a signal we could not hold, its death */
        if (WIFSTOPPED(st))
            ptrace(PTRACE_SETREGS, tid, 0, final);
        *other = st;
        return 1;
    }
    /* our call's entry stop (nothing of the program's ran); then its exit */
    if (ptrace(PTRACE_SYSCALL, tid, 0, 0) != 0 || wait_tid(tid, &st) < 0)
        return -1;
    if (!is_syscall_stop(st)) {
        *other = st;
        return 1;
    }
    if (ptrace(PTRACE_GETREGS, tid, 0, &r) != 0)
        return -1;
    *ret = (long long)r.rax;
    return ptrace(PTRACE_SETREGS, tid, 0, final) == 0 ? 0 : -1;
}

/* Unmap a scratch mapping from the exit stop the thread is at and resume it with *final.
 * Returns 1 with *other for the loop (the mapping is then kept as tid's SCR_OWN). */
static int unmap_and_resume(pid_t tid, const struct user_regs_struct *final, unsigned long addr,
                            unsigned long len, int *other)
{
    const unsigned long long a[6] = {addr, len, 0, 0, 0, 0};
    long long ret;
    int rc = inject_exit(tid, final, SYS_munmap, a, &ret, other);
    if (rc == 1)
        scratch_add(tid, SCR_OWN, addr, len);
    release_signals(tid);
    if (rc == 0)
        ptrace(PTRACE_CONT, tid, 0, 0);
    return rc == 1;
}

/*
 * Run the exec prepared in pend from a mapping of its own.  The thread is at the execve's
 * seccomp stop with registers *at.  Steps: mmap (or mremap of a scratch mapping the thread
 * left, when a signal interrupted an earlier try) in place of the execve; the image into the
 * mapping; the execve again from the same instruction with filename and argv pointing into
 * it (its seccomp stop is awaited here and let through, and its exit watched: exec_failed).
 * Signals delivered on the way are held until the exec is over (wait_holding).  A group-stop
 * taken on the way instead finds the registers as they were just before the program's
 * syscall instruction, which it makes again when it goes on (the mapping is kept for it).
 * Returns 1 with *other when the loop must handle another stop of the thread.
 */
static int exec_scratch(pid_t tid, const struct user_regs_struct *at, int *other)
{
    long nr = (long)at->orig_rax;
    unsigned long have = 0, old = 0, len = pend.map_len;
    while (scratch_take(tid, SCR_OWN, &old, &have) && !scratch_is_ours(tid, old, have))
        have = 0; /* not ours (any more): forget it */
    long long ret = 0;
    int rc = 0;
    if (have && have == len) {
        ret = (long long)old;
    } else if (have) {
        const unsigned long long a[6] = {old, have, len, MREMAP_MAYMOVE, 0, 0};
        rc = inject_entry(tid, at, SYS_mremap, a, &ret, other);
    } else {
        const unsigned long long a[6] = {0, len, PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS, (unsigned long long)-1, 0};
        rc = inject_entry(tid, at, SYS_mmap, a, &ret, other);
    }
    if (rc != 0) {
        if (rc == 1 && have)
            scratch_add(tid, SCR_OWN, old, have); /* it died: thread_gone sees to it */
        return rc == 1;
    }
    struct user_regs_struct r = *at, orig = *at;
    if (ret < 0 && ret >= -4095) { /* no memory for it: the exec fails with that error */
        if (have)
            scratch_add(tid, SCR_OWN, old, have); /* a failed mremap leaves it as it was */
        r.rax = (unsigned long long)ret;
        ptrace(PTRACE_SETREGS, tid, 0, &r);
        ptrace(PTRACE_CONT, tid, 0, 0);
        return 0;
    }
    unsigned long base = (unsigned long)ret;
    unsigned long *ptrs = (unsigned long *)pend.img;
    for (size_t i = 0; i < pend.nfix; i++)
        ptrs[i] += base;
    uint64_t tail[2] = {scratch_cookie, base};
    struct iovec l[2] = {{pend.img, pend.used}, {tail, sizeof tail}};
    struct iovec rv[2] = {{(void *)base, pend.used},
                          {(void *)(base + len - sizeof tail), sizeof tail}};
    if (process_vm_writev(tid, l, 2, rv, 2, 0) != (ssize_t)(pend.used + sizeof tail)) {
        r.rax = (unsigned long long)-EFAULT;
        return unmap_and_resume(tid, &r, base, len, other);
    }
    r.rip -= 2; /* back onto the syscall instruction */
    r.rax = (unsigned long long)nr;
    r.orig_rax = (unsigned long long)-1;
    struct user_regs_struct back = r; /* the program's registers just before its call */
    *argreg(&r, pend.path_arg) = base + pend.fname_off;
    *argreg(&r, pend.argv_arg) = base;
    int st;
    if (ptrace(PTRACE_SETREGS, tid, 0, &r) != 0 || wait_holding(tid, PTRACE_CONT, &st) < 0)
        return 0;
    struct user_regs_struct now;
    if (WIFSTOPPED(st) && st >> 8 == (SIGTRAP | PTRACE_EVENT_SECCOMP << 8) &&
        ptrace(PTRACE_GETREGS, tid, 0, &now) == 0 && (long)now.orig_rax == nr &&
        now.rip == at->rip && *argreg(&now, pend.path_arg) == base + pend.fname_off &&
        *argreg(&now, pend.argv_arg) == base) {
        tstate_t *t = thread_find(tid, 1);
        if (t) {
            t->scr_addr = base;
            t->scr_len = len;
            t->scr_path_arg = pend.path_arg;
            t->scr_argv_arg = pend.argv_arg;
            t->scr_path0 = *argreg(&orig, pend.path_arg);
            t->scr_argv0 = *argreg(&orig, pend.argv_arg);
        }
        ptrace(PTRACE_SYSCALL, tid, 0, 0); /* to see it fail, if it does */
        return 0;
    }
    /* A group-stop (or a signal we could not hold) came first: the program gets the registers
     * it had just before its syscall instruction, and makes the call again when it goes on.
     * (Some other seccomp stop cannot happen: left as it is.) */
    if (WIFSTOPPED(st) && st >> 8 != (SIGTRAP | PTRACE_EVENT_SECCOMP << 8))
        ptrace(PTRACE_SETREGS, tid, 0, &back);
    scratch_add(tid, SCR_OWN, base, len); /* for the call when it is made again */
    release_signals(tid);
    *other = st;
    return 1;
}

/* The exit stop of an exec made from a scratch mapping: it failed (success ends in
 * PTRACE_EVENT_EXEC).  Unmap, and return the error with the caller's own registers. */
static int exec_failed(pid_t tid, tstate_t *t, int *other)
{
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETREGS, tid, 0, &r) != 0)
        return 0;
    unsigned char info[88] = {0}; /* struct ptrace_syscall_info: op is its first byte */
    if (ptrace(PTRACE_GET_SYSCALL_INFO, tid, (void *)sizeof info, info) > 0 ?
            info[0] == 1 /* PTRACE_SYSCALL_INFO_ENTRY */ :
            (long long)r.rax == -ENOSYS) {
        ptrace(PTRACE_SYSCALL, tid, 0, 0); /* not its exit yet */
        return 0;
    }
    unsigned long addr = t->scr_addr, len = t->scr_len;
    *argreg(&r, t->scr_path_arg) = t->scr_path0;
    *argreg(&r, t->scr_argv_arg) = t->scr_argv0;
    t->scr_addr = t->scr_len = 0;
    return unmap_and_resume(tid, &r, addr, len, other);
}

/*
 * PTRACE_EVENT_VFORK_DONE of tid: its vfork child c has exec'd or exited, and any scratch
 * mapping c made is in tid's address space.  Unmap those (and any tid itself left) from the
 * vfork call's exit stop, then resume tid with that call's own result.
 */
static int vfork_done(pid_t tid, pid_t c, int *other)
{
    unsigned long addr[8], len[8];
    int n = 0;
    tstate_t *ct = thread_find(c, 0);
    if (ct && ct->scr_len) {
        addr[n] = ct->scr_addr;
        len[n++] = ct->scr_len;
        ct->scr_addr = ct->scr_len = 0;
    }
    while (n < 8 && scratch_take(c, 0, &addr[n], &len[n]))
        n++;
    while (n < 8 && scratch_take(tid, SCR_OWN, &addr[n], &len[n]))
        n++;
    if (!n) {
        ptrace(PTRACE_CONT, tid, 0, 0);
        return 0;
    }
    struct user_regs_struct final;
    int st, i = 0;
    if (ptrace(PTRACE_SYSCALL, tid, 0, 0) != 0 || wait_tid(tid, &st) < 0)
        return 0;
    if (is_syscall_stop(st) && ptrace(PTRACE_GETREGS, tid, 0, &final) == 0) {
        for (; i < n; i++) {
            if (!scratch_is_ours(tid, addr[i], len[i]))
                continue;
            const unsigned long long a[6] = {addr[i], len[i], 0, 0, 0, 0};
            long long ret;
            int rc = inject_exit(tid, &final, SYS_munmap, a, &ret, other);
            if (rc < 0)
                return 0;
            if (rc == 1) {
                st = *other;
                break;
            }
        }
        if (i == n) {
            release_signals(tid);
            ptrace(PTRACE_CONT, tid, 0, 0);
            return 0;
        }
    }
    for (; i < n; i++) /* interrupted: left for tid's next exec or VFORK_DONE */
        scratch_add(tid, SCR_OWN, addr[i], len[i]);
    release_signals(tid);
    *other = st;
    return 1;
}
