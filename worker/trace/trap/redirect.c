/*
 * Notify mode: a redirected call done on the tracee's behalf (fds added with SECCOMP_ADDFD),
 * opens of FIFOs by a thread of their own, notify_open/notify_xattr/notify_redirect.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and config.c, memory.c, paths.c define.
 */

/* ---------- notify mode: doing a redirected call on the tracee's behalf ---------- */

/* A target naming the caller's own process (a host symlink to /proc/self/..., /dev/fd/N)
 * must be resolved as the tracee, not as us. */
static const char *as_tracee(pid_t tid, const char *target, char *buf, size_t max)
{
    static const char *const selfs[] = {"/proc/self/", "/proc/thread-self/", "/dev/fd/"};
    static const char *const tails[] = {"", "", "fd/"};
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(selfs[i]);
        if (strncmp(target, selfs[i], n) == 0) {
            snprintf(buf, max, "/proc/%d/%s%s", (int)tid, tails[i], target + n);
            return buf;
        }
    }
    if (strncmp(target, "/dev/std", 8) == 0) {
        static const char *const names[] = {"in", "out", "err"};
        for (int i = 0; i < 3; i++)
            if (strcmp(target + 8, names[i]) == 0) {
                snprintf(buf, max, "/proc/%d/fd/%d", (int)tid, i);
                return buf;
            }
    }
    return target;
}

/* "/proc/<our pid>/fd/" */
static char own_fd_prefix[40];
static size_t own_fd_prefix_n;

/* A RAM file by name in a directory we hold an fd of (worker/ram/ramfiles.py named_path):
 * "/proc/<our pid>/fd/<N>/<name>" -> N and *name, else -1.  openat(N, name) opens the same
 * file as the kernel's walk through /proc would, 2 µs sooner. */
static int own_dir_name(const char *path, const char **name)
{
    if (!own_fd_prefix_n || strncmp(path, own_fd_prefix, own_fd_prefix_n) != 0)
        return -1;
    const char *p = path + own_fd_prefix_n;
    long n = 0;
    if (*p < '0' || *p > '9')
        return -1;
    for (; *p >= '0' && *p <= '9'; p++)
        if ((n = n * 10 + (*p - '0')) > 1 << 30)
            return -1;
    if (*p != '/' || !p[1] || strchr(p + 1, '/'))
        return -1;
    *name = p + 1;
    return (int)n;
}

/* open/openat: open the target ourselves and install the fd in the tracee as the call's
 * result (SECCOMP_ADDFD_FLAG_SEND), so the tracee gets its own open file description.
 * (O_PATH opens and openat2 take a ptrace stop instead: see install_filter.) */
/* A blocking open of a FIFO of the shadow tree (a FIFO published in the repository) waits
 * for the other end in a thread of its own, never in a notification thread: the caller's
 * notification stays unanswered meanwhile, as its open would block natively. */
#define FIFO_OPENS 32
static struct fifo_open {
    pthread_t th;
    int used, done, fd;
    pid_t tid; /* the caller */
    uint64_t id;
    char path[MAXPATH];
    int flags;
    mode_t mode;
    uint32_t newfd_flags;
} fifo_opens[FIFO_OPENS];

/* Does the caller have a signal pending that it does not block?  Natively a signal ends a
 * blocked FIFO open (EINTR, or the process dies of it); here the caller waits in the kernel for
 * our answer, where only SIGKILL reaches it, so the thread looks for it. */
static int caller_signalled(pid_t tid)
{
    char buf[2048];
    if (!proc_status(tid, buf, sizeof buf))
        return 0;
    const char *p = strstr(buf, "\nSigPnd:"), *q = strstr(buf, "\nShdPnd:"),
               *b = strstr(buf, "\nSigBlk:"), *g = strstr(buf, "\nSigIgn:");
    if (!p || !q || !b || !g)
        return 0;
    unsigned long long pending = strtoull(p + 9, NULL, 16) | strtoull(q + 9, NULL, 16);
    return (pending & ~strtoull(b + 9, NULL, 16) & ~strtoull(g + 9, NULL, 16)) != 0;
}

static void fifo_wake(int sig)
{
    (void)sig; /* only interrupts the thread's open (no SA_RESTART) */
}

#define FIFO_WAKE_SIG (SIGRTMIN + 7)

static void *fifo_open_thread(void *arg)
{
    struct fifo_open *f = arg;
    /* Every 100 ms the open is interrupted to look at the caller: gone (the notification is
     * no longer valid) or signalled (answered EINTR, as natively without SA_RESTART; with it
     * the program sees EINTR too, the one difference). */
    timer_t timer;
    struct sigevent ev;
    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev.sigev_signo = FIFO_WAKE_SIG;
    ev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    int timed = timer_create(CLOCK_MONOTONIC, &ev, &timer) == 0;
    if (timed) {
        struct itimerspec every = {{0, 100000000}, {0, 100000000}};
        timer_settime(timer, 0, &every, NULL);
    }
    sigset_t wake;
    sigemptyset(&wake);
    sigaddset(&wake, FIFO_WAKE_SIG);
    pthread_sigmask(SIG_UNBLOCK, &wake, NULL);
    int fd;
    for (;;) {
        fd = open(f->path, f->flags | O_CLOEXEC | O_NOCTTY, f->mode);
        if (fd >= 0 || errno != EINTR)
            break;
        uint64_t id = f->id;
        if (ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) != 0 || caller_signalled(f->tid))
            break; /* errno stays EINTR */
    }
    int e = errno;
    if (timed)
        timer_delete(timer);
    errno = e;
    if (fd >= 0) {
        struct seccomp_notif_addfd add = {
            .id = f->id, .flags = SECCOMP_ADDFD_FLAG_SEND, .srcfd = (uint32_t)fd,
            .newfd = 0, .newfd_flags = f->newfd_flags,
        };
        if (ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_ADDFD, &add) < 0) {} /* ENOENT: gone */
        close(fd);
    } else {
        struct seccomp_notif_resp resp = {.id = f->id, .val = 0, .error = -errno, .flags = 0};
        if (ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_SEND, &resp) < 0) {}
    }
    __atomic_store_n(&f->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* Start such an open (called with `big` held); 0 if no slot or thread could be had. */
static int fifo_open_later(pid_t tid, const char *path, unsigned long long fl,
                           unsigned long long mode)
{
    size_t n = strlen(path);
    if (n >= MAXPATH)
        return 0;
    for (int i = 0; i < FIFO_OPENS; i++) {
        struct fifo_open *f = &fifo_opens[i];
        if (f->used && !__atomic_load_n(&f->done, __ATOMIC_ACQUIRE))
            continue;
        if (f->used)
            pthread_join(f->th, NULL);
        struct sigaction wake;
        memset(&wake, 0, sizeof wake);
        wake.sa_handler = fifo_wake; /* no SA_RESTART: it must end the wait in open */
        sigaction(FIFO_WAKE_SIG, &wake, NULL);
        f->used = 1;
        f->done = 0;
        f->id = cur_notif.id;
        f->tid = tid;
        memcpy(f->path, path, n + 1);
        f->flags = (int)(fl & ~(unsigned long long)O_CLOEXEC);
        f->mode = (mode_t)mode;
        f->newfd_flags = (uint32_t)(fl & O_CLOEXEC);
        if (pthread_create(&f->th, NULL, fifo_open_thread, f) != 0) {
            f->used = 0;
            return 0;
        }
        return 1;
    }
    return 0;
}

/* At the end of a run: release FIFO opens still waiting (by opening both ends ourselves) and
 * wait for their threads, before the listener fd they answer through is closed. */
static void fifo_opens_finish(void)
{
    for (int i = 0; i < FIFO_OPENS; i++) {
        struct fifo_open *f = &fifo_opens[i];
        if (!f->used)
            continue;
        int fd = __atomic_load_n(&f->done, __ATOMIC_ACQUIRE)
                     ? -1 : open(f->path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
        pthread_join(f->th, NULL);
        if (fd >= 0)
            close(fd);
        f->used = 0;
    }
}

static long notify_open(pid_t tid, long nr, struct user_regs_struct *r, const char *path,
                        int magic)
{
    unsigned long long fl = nr == SYS_open ? r->rsi : r->rdx;
    unsigned long long mode = nr == SYS_open ? r->rdx : r->r10;
    if (magic)
        fl &= ~(unsigned long long)O_NOFOLLOW; /* a RAM file's /proc link: see allow_magic_link */
    /* Never block or take a controlling terminal on the tracee's behalf (a FIFO reached
     * through a symlink out of /cvmfs); O_NONBLOCK is taken back below. */
    int ours = magic || has_prefix(path, strlen(path), target_p, target_n);
    struct stat st;
    if (ours && !magic && !(fl & O_NONBLOCK) && stat(path, &st) == 0 && S_ISFIFO(st.st_mode)) {
        if (fifo_open_later(tid, path, fl, mode)) {
            cur_notif.replied = 1;
            return 0;
        }
        ours = 0; /* no thread to wait in: open it without waiting for the other end */
    }
    unsigned long long extra = O_CLOEXEC | O_NOCTTY | (ours ? 0 : O_NONBLOCK);
    const char *leaf = NULL;
    int dir = own_dir_name(path, &leaf);
    int fd = dir >= 0 ? (int)syscall(SYS_openat, dir, leaf, (long)(fl | extra), (long)mode)
                      : (int)syscall(SYS_openat, AT_FDCWD, path, (long)(fl | extra), (long)mode);
    if (fd < 0)
        return -errno;
    if ((extra & O_NONBLOCK) && !(fl & O_NONBLOCK)) {
        int cur = fcntl(fd, F_GETFL);
        if (cur >= 0)
            fcntl(fd, F_SETFL, cur & ~O_NONBLOCK);
    }
    struct seccomp_notif_addfd add = {
        .id = cur_notif.id,
        .flags = SECCOMP_ADDFD_FLAG_SEND,
        .srcfd = (uint32_t)fd,
        .newfd = 0,
        .newfd_flags = (uint32_t)(fl & O_CLOEXEC),
    };
    /* The ioctl sleeps until the caller has taken the fd; meanwhile the other notification
     * thread may answer the caller's next call (nothing shared is touched in between).
     * Handing it the wait costs a wake-up, worth it only where ADDFD is slow: one ADDFD in
     * 64 is timed without the hand-over (5 µs with a CPU to spare, 40 µs waking idle vCPUs). */
    int probe = (addfd_count++ & 63) == 0, hand_over = !probe && addfd_slow && !one_cpu;
    pthread_mutex_unlock(&big);
    if (hand_over)
        pass_lead();
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long got = ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_ADDFD, &add);
    int e = errno;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    big_lock();
    if (probe && got >= 0) {
        double us = (double)(t1.tv_sec - t0.tv_sec) * 1e6 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e3;
        addfd_us = addfd_us > 0 ? 0.7 * addfd_us + 0.3 * us : us;
        addfd_slow = addfd_us > 12;
    }
    close(fd);
    if (got >= 0 || e == ENOENT) {
        cur_notif.replied = 1; /* ENOENT: the caller is gone or was interrupted */
        return got >= 0 ? got : -ENOENT;
    }
    return -e; /* EMFILE ...: the caller gets the error in the ordinary reply */
}

/* getxattr/lgetxattr/listxattr/llistxattr on a redirected path, through our own buffer. */
static long notify_xattr(pid_t tid, long nr, struct user_regs_struct *r, const char *path)
{
    enum { XMAX = 65536 };
    int get = nr == SYS_getxattr || nr == SYS_lgetxattr;
    unsigned long dst = get ? r->rdx : r->rsi;
    size_t size = (size_t)(get ? r->r10 : r->rdx);
    char name[256];
    if (get && read_string(tid, r->rsi, name, sizeof name) < 0)
        return -ERANGE;
    size_t cap = size < XMAX ? size : XMAX;
    char *buf = cap ? malloc(cap) : NULL;
    if (cap && !buf)
        return -ENOMEM;
    ssize_t n = nr == SYS_getxattr    ? getxattr(path, name, buf, cap)
                : nr == SYS_lgetxattr ? lgetxattr(path, name, buf, cap)
                : nr == SYS_listxattr ? listxattr(path, buf, cap)
                                      : llistxattr(path, buf, cap);
    long rc = n < 0 ? -errno : n;
    if (n > 0 && size && write_mem(tid, dst, buf, (size_t)n) < 0)
        rc = -EFAULT;
    free(buf);
    return rc;
}

/* The other redirected calls, done here on the target and copied out. */
static long notify_redirect(pid_t tid, long nr, struct user_regs_struct *r, const char *target)
{
    char buf[MAXPATH + 64];
    const char *path = as_tracee(tid, target, buf, sizeof buf);
    switch (nr) {
    case SYS_open:
    case SYS_openat: /* one of our RAM files, by /proc/<our pid>/fd/N: a magic link */
        return notify_open(tid, nr, r, path,
                           path == target && strncmp(path, "/proc/", 6) == 0 &&
                               !has_prefix(path, strlen(path), target_p, target_n));
    case SYS_statfs: {
        struct statfs sf;
        if (statfs(path, &sf) != 0)
            return -errno;
        return write_mem(tid, r->rsi, &sf, sizeof sf);
    }
    case SYS_getxattr:
    case SYS_lgetxattr:
    case SYS_listxattr:
    case SYS_llistxattr:
        return notify_xattr(tid, nr, r, path);
    case SYS_stat:
    case SYS_lstat:
    case SYS_newfstatat: {
        struct stat st;
        int fl = nr == SYS_lstat ? AT_SYMLINK_NOFOLLOW
                 : nr == SYS_stat ? 0
                                  : (int)(r->r10 & (AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT));
        if (fstatat(AT_FDCWD, path, &st, fl) != 0)
            return -errno;
        return write_mem(tid, nr == SYS_newfstatat ? r->rdx : r->rsi, &st, sizeof st);
    }
    case 332: {
        struct statx x;
        int fl = (int)(r->rdx & ~(unsigned long long)AT_EMPTY_PATH);
        if (statx(AT_FDCWD, path, fl, (unsigned)r->r10, &x) != 0)
            return -errno;
        return write_mem(tid, r->r8, &x, sizeof x);
    }
    case SYS_access:
        return syscall(SYS_faccessat, AT_FDCWD, path, (long)r->rsi) ? -errno : 0;
    case SYS_faccessat:
        return syscall(SYS_faccessat, AT_FDCWD, path, (long)r->rdx) ? -errno : 0;
    case 439:
        return syscall(439, AT_FDCWD, path, (long)r->rdx,
                       (long)(r->r10 & ~(unsigned long long)AT_EMPTY_PATH))
                   ? -errno
                   : 0;
    case SYS_readlink:
    case SYS_readlinkat: {
        char out[MAXPATH];
        unsigned long dst = nr == SYS_readlink ? r->rsi : r->rdx;
        long long sz = (long long)(nr == SYS_readlink ? r->rdx : r->r10);
        if (sz <= 0)
            return -EINVAL;
        ssize_t n = readlink(path, out, sizeof out < (size_t)sz ? sizeof out : (size_t)sz);
        if (n < 0)
            return -errno;
        return write_mem(tid, dst, out, (size_t)n) < 0 ? -EFAULT : n;
    }
    default:
        return -EIO; /* the filter sends no other redirectable call here */
    }
}
