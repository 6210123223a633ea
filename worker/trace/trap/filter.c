/*
 * The syscalls the seccomp filter traps (TRAPPED_CALLS, with the names --stats prints), those
 * that still take a ptrace stop in notify mode (ptrace_only), and the filter the child installs
 * (install_filter; probe_notify: can this kernel run notify mode well).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses only
 * what _trap.c's header defines.
 */

/* ---------- syscalls the filter traps ---------- */

/* The calls the filter traps, with the names --stats prints (one list, so none is nameless). */
#define TRAPPED_CALLS(X) \
    X(SYS_open, "open") X(SYS_openat, "openat") X(437, "openat2") X(SYS_creat, "creat") \
    X(SYS_stat, "stat") X(SYS_lstat, "lstat") X(SYS_newfstatat, "newfstatat") \
    X(332, "statx") X(SYS_fstat, "fstat") X(SYS_access, "access") \
    X(SYS_faccessat, "faccessat") X(439, "faccessat2") X(SYS_readlink, "readlink") \
    X(SYS_readlinkat, "readlinkat") X(SYS_execve, "execve") X(SYS_execveat, "execveat") \
    X(SYS_chdir, "chdir") X(SYS_fchdir, "fchdir") X(SYS_fchmod, "fchmod") \
    X(SYS_fchown, "fchown") X(SYS_fsetxattr, "fsetxattr") X(SYS_fremovexattr, "fremovexattr") X(SYS_getcwd, "getcwd") \
    X(SYS_statfs, "statfs") X(SYS_truncate, "truncate") X(SYS_mkdir, "mkdir") \
    X(SYS_mkdirat, "mkdirat") X(SYS_rmdir, "rmdir") X(SYS_unlink, "unlink") \
    X(SYS_unlinkat, "unlinkat") X(SYS_rename, "rename") X(SYS_renameat, "renameat") \
    X(316, "renameat2") X(SYS_link, "link") X(SYS_linkat, "linkat") \
    X(SYS_symlink, "symlink") X(SYS_symlinkat, "symlinkat") X(SYS_chmod, "chmod") \
    X(SYS_fchmodat, "fchmodat") X(452, "fchmodat2") X(SYS_chown, "chown") \
    X(SYS_lchown, "lchown") X(SYS_fchownat, "fchownat") X(SYS_utime, "utime") \
    X(SYS_utimes, "utimes") X(SYS_futimesat, "futimesat") X(SYS_utimensat, "utimensat") \
    X(SYS_mknod, "mknod") X(SYS_mknodat, "mknodat") X(SYS_setxattr, "setxattr") \
    X(SYS_lsetxattr, "lsetxattr") X(SYS_removexattr, "removexattr") \
    X(SYS_lremovexattr, "lremovexattr") X(SYS_getxattr, "getxattr") \
    X(SYS_lgetxattr, "lgetxattr") X(SYS_listxattr, "listxattr") \
    X(SYS_llistxattr, "llistxattr") X(463, "setxattrat") X(464, "getxattrat") \
    X(465, "listxattrat") X(466, "removexattrat") X(SYS_inotify_add_watch, "inotify_add_watch") \
    X(SYS_getdents64, "getdents64") X(SYS_ptrace, "ptrace")
#define TRAPPED_NR(nr, name) nr,
#define TRAPPED_NAME(nr, name) name,
static const int trapped[] = {TRAPPED_CALLS(TRAPPED_NR)};
static const char *const trapped_names[] = {TRAPPED_CALLS(TRAPPED_NAME)};

/* A listener fd, and callers that stop being interruptible once we have read their call. */
#define NOTIFY_FILTER_FLAGS \
    (SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV)

/* In seccomp-notify mode these still take a ptrace stop: exec and chdir change the tracee
 * (registers, cwd), which only ptrace can do; openat2, the *xattrat calls and
 * inotify_add_watch (its path rewritten: a watch goes on the caller's inotify fd) are rare. */
static int ptrace_only(int nr)
{
    switch (nr) {
    case SYS_execve: case SYS_execveat: case SYS_chdir: case SYS_fchdir:
    case 437: /* openat2: O_PATH hides in struct open_how (see below) */
    case 464: case 465: case SYS_inotify_add_watch:
        return 1;
    default:
        return 0;
    }
}

/* Can the tracer renumber a listing's entries (trap/dents.c)?  It reads them through a copy
 * of the program's fd, which pidfd_getfd makes (Linux 5.6); before, a trapped getdents64
 * would cost a stop and change nothing, so the filter lets it through. */
static int dents_renumbered(void)
{
    static int known = -1;
    if (known < 0)
        known = !(syscall(SYS_pidfd_getfd, -1, 0, 0) < 0 && errno == ENOSYS);
    return known;
}

/* Refuse io_uring_setup in the command (see install_filter); set by trap_run. */
static int refuse_io_uring = 1;

/*
 * notify=0: every trapped syscall is a ptrace stop (SECCOMP_RET_TRACE).
 * notify=1: the hot ones (open, stat, access, readlink, getcwd, writes) are sent to a
 * seccomp user-notification listener instead, whose fd is returned: answering one costs two
 * context switches and no ptrace register traffic.
 * Returns the listener fd (notify), 0 (ptrace), or -1 with errno.
 *
 * Every other call is let through on its number alone, before any argument is looked at: the
 * kernel (5.11) then allows it from a bitmap without running the filter at all (its action
 * cache keeps only calls whose answer no argument changes).  Looking at the handler's cookie
 * first, as this did before, ran the whole filter, ~80 instructions, on every read, write,
 * mmap or futex of the command.
 */
enum { FILTER_MAX = 40 + sizeof(trapped) / sizeof(trapped[0]) };

/* The filter's program (install_filter; filter_program shows it to the tests); its length.
 * with_cookie: calls made by the in-process handler (or injected at exec) carry `cookie`, the
 * run's random one, as their 6th argument (no trapped call has six) and are let through. */
static int build_filter(int notify, int with_cookie, uint64_t cookie_value,
                        struct sock_filter prog[FILTER_MAX])
{
    enum { N = sizeof(trapped) / sizeof(trapped[0]) };
    int k = 0;
    const uint32_t allow = SECCOMP_RET_ALLOW, trace = SECCOMP_RET_TRACE;
    const uint32_t hot = notify ? SECCOMP_RET_USER_NOTIF : trace;
    const int cookie = notify && with_cookie;
#define STMT(c, v) prog[k++] = (struct sock_filter)BPF_STMT(c, v)
#define JUMP(c, v, t, f) prog[k++] = (struct sock_filter)BPF_JUMP(c, v, t, f)
#define COOKIE()                                                                          \
    do {                                                                                  \
        if (cookie) {                                                                     \
            STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[5]));        \
            JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)cookie_value, 0, 3);                \
            STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[5]) + 4);    \
            JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)(cookie_value >> 32), 0, 1);        \
            STMT(BPF_RET | BPF_K, allow);                                                 \
        }                                                                                 \
    } while (0)
    STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
    STMT(BPF_RET | BPF_K, allow); /* other ABIs (i386) do not see /cvmfs */
    STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    JUMP(BPF_JMP | BPF_JGE | BPF_K, X32_SYSCALL_BIT, 0, 1);
    STMT(BPF_RET | BPF_K, allow);
    if (refuse_io_uring) {
        /* io_uring's opens and stats happen in the kernel's workers, where no filter sees
         * them: a ring would reach the mirror behind /cvmfs.  ENOSYS is what programs and
         * libraries take for "no io_uring here" and fall back to ordinary calls. */
        JUMP(BPF_JMP | BPF_JEQ | BPF_K, 425 /* io_uring_setup */, 0, 1);
        STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA));
    }
    /* the trapped calls jump to one of two blocks after the "allow" below: the hot ones to
     * the first, those that stop for ptrace in any mode to the second (offsets set below) */
    const int first = k;
    for (int i = 0; i < N; i++)
        JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)trapped[i], 0, 0);
    STMT(BPF_RET | BPF_K, allow);
    const int hot_block = k;
    COOKIE();
    if (notify) {
        /* O_PATH opens take a ptrace stop: an O_PATH fd cannot be installed with ADDFD.
         * (fstat, and newfstatat/statx with AT_EMPTY_PATH, stop as well: see fd_stat.) */
        STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
        JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_open, 0, 3);
        STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1]));
        JUMP(BPF_JMP | BPF_JSET | BPF_K, O_PATH, 0, 1);
        STMT(BPF_RET | BPF_K, trace);
        STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
        JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_openat, 0, 3);
        STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[2]));
        JUMP(BPF_JMP | BPF_JSET | BPF_K, O_PATH, 0, 1);
        STMT(BPF_RET | BPF_K, trace);
    }
    STMT(BPF_RET | BPF_K, hot);
    const int ptrace_block = k;
    COOKIE();
    STMT(BPF_RET | BPF_K, trace);
    for (int i = 0; i < N; i++)
        prog[first + i].jt = (uint8_t)((trapped[i] == SYS_getdents64 && !dents_renumbered()
                                            ? hot_block - 1 /* the "allow" before it */
                                        : ptrace_only(trapped[i]) ? ptrace_block
                                                                  : hot_block) -
                                       (first + i + 1));
#undef COOKIE
#undef STMT
#undef JUMP
    return k;
}

static int install_filter(int notify)
{
    struct sock_filter prog[FILTER_MAX];
    const int with_cookie = fo_enabled();
    const int k = build_filter(notify, with_cookie, with_cookie ? fo_cookie() : 0, prog);
    struct sock_fprog fprog = {.len = (unsigned short)k, .filter = prog};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return -1;
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, notify ? NOTIFY_FILTER_FLAGS : 0,
                        &fprog);
}

/* Can this kernel run notify mode well?  It needs a listener that wakes us on the trapping
 * task's CPU (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, Linux 6.6, which implies WAIT_KILLABLE_RECV
 * and ADDFD_FLAG_SEND): without it a notification costs a cross-CPU wake-up each way and
 * ptrace with polling is faster.  A listener cannot be installed under another one (nested
 * hep-exec, container runtimes), which this finds too.  Probed in a throwaway child
 * (spawn_in_our_memory). */
static int probe_child(void *arg)
{
    (void)arg;
    struct sock_filter prog[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
    struct sock_fprog fprog = {.len = 1, .filter = prog};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return 1;
    int fd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, NOTIFY_FILTER_FLAGS, &fprog);
    if (fd < 0)
        return 1;
    return ioctl(fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, 0) ? 1 : 0;
}

static int probe_notify(void)
{
    static int known = -1;
    if (known >= 0)
        return known;
    pid_t c = spawn_in_our_memory(probe_child, NULL);
    int st = 0;
    if (c > 0)
        while (waitpid(c, &st, 0) < 0 && errno == EINTR) {}
    return known = c > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0;
}
