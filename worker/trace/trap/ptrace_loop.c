/*
 * The ptrace loop, first part: a call interrupted while notified made to restart, signals a
 * job's sender sent twice told apart (forward_to, duplicate_forward), and one waitpid report
 * handled (ptrace_event).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and filter.c, threads.c, config.c, memory.c, paths.c, seccomp_stop.c,
 * scratch.c, loop.c define.
 */

/* ---------- the ptrace loop ---------- */

#define ERESTARTSYS 512
#define ERESTARTNOINTR 513

/*
 * A signal that arrives while a call waits for its notification to be read interrupts the
 * wait, and the kernel ends the call with -ERESTARTSYS: without SA_RESTART on the handler the
 * program would see EINTR from an open or stat of a plain file, which it never expects (and
 * ptrace mode never shows).  At the signal-delivery stop, before the kernel decides, turn
 * that into -ERESTARTNOINTR so the call is always restarted.  Calls we let through to the
 * kernel can still block there for real (open of a FIFO or a terminal): those keep EINTR.
 */
static void restart_notified_call(pid_t tid)
{
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETREGS, tid, 0, &r) != 0 || (long long)r.rax != -ERESTARTSYS)
        return;
    long nr = (long)r.orig_rax;
    int ours = 0;
    for (size_t i = 0; i < sizeof trapped / sizeof trapped[0] && !ours; i++)
        ours = trapped[i] == nr && !ptrace_only((int)nr);
    if (!ours)
        return;
    if (nr == SYS_open || nr == SYS_openat) {
        char raw[MAXPATH], path[2 * MAXPATH + 2];
        long n = read_string(tid, nr == SYS_open ? r.rdi : r.rsi, raw, sizeof raw);
        int dirfd = nr == SYS_open ? AT_FDCWD : (int)r.rdi;
        ssize_t bn = 0;
        if (n > 0 && raw[0] != '/') { /* the host file the kernel was opening */
            char what[32];
            snprintf(what, sizeof what, dirfd == AT_FDCWD ? "cwd" : "fd/%d", dirfd);
            bn = proc_link(tid, what, path, MAXPATH);
            if (bn > 0)
                path[bn++] = '/';
        }
        struct stat st;
        if (n > 0 && bn >= 0) {
            memcpy(path + bn, raw, (size_t)n + 1);
            if (!has_prefix(path, strlen(path), mount_p, mount_n) &&
                !has_prefix(path, strlen(path), shadow_p, shadow_n) && stat(path, &st) == 0 &&
                (S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode)))
                return; /* may have blocked in the kernel: EINTR is real */
        }
    }
    r.rax = (unsigned long long)-ERESTARTNOINTR;
    ptrace(PTRACE_SETREGS, tid, 0, &r);
}

/* Handle one waitpid report (under big and the GIL). */
/* The command's pid while it runs, for forward_signal (0: nobody to tell; cleared when it
 * is reaped, so a reused pid never gets a signal meant for it). */
static volatile pid_t forward_to;

/* A sender that signals every process of a job itself (a terminal's process group, kill -PGID,
 * Slurm's signal to each task) reaches the command directly as well as through hep-exec: of
 * such a pair the command gets only the first, as it would natively.  Per signal: the last
 * one passed on (who sent it to hep-exec, when, and which of the pair the command has had)
 * and the last one the command got directly from someone else. */
#define FWD_NSIG 32
typedef struct {
    pid_t sender;
    int ours_delivered, direct_delivered;
    struct timespec at;
} fwd_rec_t;
static volatile fwd_rec_t fwd_rec[FWD_NSIG];
static volatile fwd_rec_t direct_rec[FWD_NSIG];

static int within_a_second(const volatile struct timespec *at)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long ms = (now.tv_sec - at->tv_sec) * 1000L + (now.tv_nsec - at->tv_nsec) / 1000000L;
    return at->tv_sec != 0 && ms <= 1000;
}

/* The process a tracee thread belongs to (0 if unknown). */
static pid_t tgid_of(pid_t tid)
{
    char buf[512];
    if (!proc_status(tid, buf, sizeof buf))
        return 0;
    const char *t = strstr(buf, "\nTgid:");
    return t ? (pid_t)atoi(t + 7) : 0;
}

/* At a signal-delivery stop of a tracee: true when the command must not get this signal
 * because it is the second of a pair (see fwd_rec). */
static int duplicate_forward(pid_t tid, pid_t child, int sig)
{
    if (sig <= 0 || sig >= FWD_NSIG)
        return 0;
    siginfo_t si;
    if (ptrace(PTRACE_GETSIGINFO, tid, 0, &si) != 0)
        return 0;
    if (si.si_code != SI_USER && si.si_code != SI_TKILL && si.si_code != SI_QUEUE)
        return 0;
    if (tid != child && tgid_of(tid) != child)
        return 0;
    volatile fwd_rec_t *f = &fwd_rec[sig];
    int paired = within_a_second(&f->at);
    if (si.si_pid == getpid()) { /* ours */
        if (paired && f->direct_delivered)
            return 1;
        f->ours_delivered = 1;
        return 0;
    }
    if (paired && si.si_pid == f->sender) {
        if (f->ours_delivered)
            return 1;
        f->direct_delivered = 1;
        return 0;
    }
    direct_rec[sig].sender = si.si_pid; /* hep-exec may be told the same in a moment */
    clock_gettime(CLOCK_MONOTONIC, (struct timespec *)&direct_rec[sig].at);
    return 0;
}

static void ptrace_event(pid_t tid, int status, pid_t child, int *exit_status)
{
    if (WIFEXITED(status) || WIFSIGNALED(status)) {
        thread_gone(tid);
        fo_gone(tid);
        if (tid == child) {
            forward_to = 0;
            /* The job is over when the command is, as under a batch system: processes
             * it left behind are killed rather than waited for. */
            *exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            kill_all();
        }
        return;
    }
    if (!WIFSTOPPED(status))
        return;
    if (*exit_status >= 0) {
        kill(tid, SIGKILL); /* a leftover that had not reported yet */
        ptrace(PTRACE_CONT, tid, 0, 0);
        return;
    }
    tstate_t *t = thread_find(tid, 1);
    if (!t) { /* out of memory: keep the tracee going, untouched */
        ptrace(PTRACE_CONT, tid, 0, 0);
        return;
    }
    int sig = WSTOPSIG(status);
    int event = status >> 16;
    if (event == PTRACE_EVENT_SECCOMP) {
        struct user_regs_struct regs;
        if (ptrace(PTRACE_GETREGS, tid, 0, &regs) != 0)
            return; /* killed meanwhile */
        int changed = handle_syscall(tid, &regs, t), other;
        if (changed == EXEC_SCRATCH) {
            if (exec_scratch(tid, &regs, &other))
                ptrace_event(tid, other, child, exit_status);
            return;
        }
        if (changed)
            ptrace(PTRACE_SETREGS, tid, 0, &regs);
        ptrace(t->nrestore || t->cwd_changes ? PTRACE_SYSCALL : PTRACE_CONT, tid, 0, 0);
    } else if (sig == (SIGTRAP | 0x80) && t->scr_len) {
        int other;
        if (exec_failed(tid, t, &other))
            ptrace_event(tid, other, child, exit_status);
    } else if (sig == (SIGTRAP | 0x80)) {
        /* syscall exit after a rewrite: put the caller's argument registers back */
        if (t->cwd_changes) {
            cwd_gen++;
            t->cwd_changes = 0;
        }
        for (int i = 0; i < t->nrestore; i++)
            ptrace(PTRACE_POKEUSER, tid, (void *)(offsetof(struct user, regs) + (size_t)t->off[i]),
                   (void *)t->val[i]);
        t->nrestore = 0;
        ptrace(PTRACE_CONT, tid, 0, 0);
    } else if (event == PTRACE_EVENT_STOP) {
        if (is_stop_signal(sig))
            ptrace(PTRACE_LISTEN, tid, 0, 0); /* group-stop: stay stopped */
        else
            ptrace(PTRACE_CONT, tid, 0, 0); /* new tracee or interrupt */
    } else if (event) {
        unsigned long msg = 0;
        ptrace(PTRACE_GETEVENTMSG, tid, 0, &msg);
        if (event == PTRACE_EVENT_EXEC) {
            /* the old image, and a scratch mapping of the exec with it (unless it was a vfork
             * child's: its parent's, unmapped at the parent's VFORK_DONE) */
            scratch_left_mm(tid);
            t->nrestore = t->cwd_changes = 0;
            t->origin = ORIGIN_OWN;
            t->execd = 1;
            if ((pid_t)msg != tid) {
                for (size_t i = 0; i < n_held; i++) /* the exec'ing thread is tid now */
                    if (held[i].tid == (pid_t)msg)
                        held[i].tid = tid;
                thread_gone((pid_t)msg);
                fo_gone((pid_t)msg);
            }
            int other;
            /* map the in-process open handler into the image; then the signals held during
             * the exec, which natively come after it */
            int stopped = fo_exec(tid, &other);
            if (!stopped || WIFSTOPPED(other))
                release_signals(tid);
            if (stopped) {
                ptrace_event(tid, other, child, exit_status); /* it stopped or died meanwhile */
                return;
            }
        } else if (event == PTRACE_EVENT_VFORK_DONE) {
            int other;
            if (vfork_done(tid, (pid_t)msg, &other))
                ptrace_event(tid, other, child, exit_status);
            return;
        } else if (event == PTRACE_EVENT_FORK || event == PTRACE_EVENT_VFORK ||
                   event == PTRACE_EVENT_CLONE) {
            /* The child may have run (even exec'd) before this report reached us: keep what
             * it has in flight, only say where it came from.  (A dead thread's state is gone
             * with its death report, before its tid can be reused.) */
            tstate_t *c = thread_find((pid_t)msg, 1); /* may move t: not used below */
            if (c && !c->execd) {
                c->origin = event == PTRACE_EVENT_VFORK  ? ORIGIN_VFORK
                            : event == PTRACE_EVENT_FORK ? ORIGIN_OWN
                                                         : ORIGIN_THREAD;
                c->parent = event == PTRACE_EVENT_CLONE ? 0 : tid;
            }
            if (event != PTRACE_EVENT_VFORK) /* it exec'd before we knew: not a vfork */
                scratch_drop((pid_t)msg, SCR_LEFT); /* child, that mapping went with it */
            fo_gone((pid_t)msg);
            if (event == PTRACE_EVENT_FORK)
                fo_fork(tid, (pid_t)msg); /* same mapping; vfork children share the parent's */
        }
        ptrace(PTRACE_CONT, tid, 0, 0); /* fork/vfork/clone/exec events */
    } else {
        /* signal-delivery stop: deliver it */
        if (resent_signal(tid, sig)) { /* held during an exec of ours, as it came */
            ptrace(PTRACE_CONT, tid, 0, (void *)(long)sig);
            return;
        }
        if (sig == SIGTRAP && fo_sigtrap(tid)) {
            ptrace(PTRACE_CONT, tid, 0, 0);
            return;
        }
        if (duplicate_forward(tid, child, sig)) {
            ptrace(PTRACE_CONT, tid, 0, 0);
            return;
        }
        if (notify_fd >= 0)
            restart_notified_call(tid);
        ptrace(PTRACE_CONT, tid, 0, (void *)(long)sig);
    }
}
