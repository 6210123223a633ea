/*
 * The ptrace loop, second part: the child's report of its filter (send_report, recv_report),
 * signals forwarded to the command, the run's answers cleared, and run() itself (trap_run).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and filter.c, answers.c, fstat.c, threads.c, config.c, redirect.c, exec.c,
 * scratch.c, loop.c, notify_loop.c, ptrace_loop.c define.
 */

/* The child's report after installing its filter: mode 'N' (+ listener fd), 'P', or 'S'. */
static int send_report(int sock, char mode, int err, int fd)
{
    int body[2] = {mode, err};
    struct iovec io = {body, sizeof body};
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct msghdr m;
    memset(&m, 0, sizeof m);
    memset(cbuf, 0, sizeof cbuf);
    m.msg_iov = &io;
    m.msg_iovlen = 1;
    if (fd >= 0) {
        m.msg_control = cbuf;
        m.msg_controllen = sizeof cbuf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    return sendmsg(sock, &m, MSG_NOSIGNAL) == (ssize_t)sizeof body ? 0 : -1;
}

static int recv_report(int sock, int *err, int *fd)
{
    int body[2] = {0, 0};
    struct iovec io = {body, sizeof body};
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &io;
    m.msg_iovlen = 1;
    m.msg_control = cbuf;
    m.msg_controllen = sizeof cbuf;
    ssize_t n;
    do {
        n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    *fd = -1;
    *err = body[1];
    struct cmsghdr *c = n > 0 ? CMSG_FIRSTHDR(&m) : NULL;
    if (c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
        memcpy(fd, CMSG_DATA(c), sizeof *fd);
    return n == (ssize_t)sizeof body ? body[0] : 0;
}

/* The child's exec of the command: execvp, but a PATH entry that has no such file is found
 * out with access(), not with a failed execve.  execve is always a ptrace stop (~0.15 ms on
 * the test VM, eight of them for `env` with this machine's PATH); access is a notification
 * answered in C, or a plain call outside /cvmfs (the same view of the file system: both are
 * the tracer's).  Where that first candidate does not run (a directory, no x bit, ENOEXEC
 * for a script without #!, a race), execvp does the whole search, as it would have. */
static void exec_command(char **argv)
{
    const char *file = argv[0], *path = getenv("PATH");
    size_t fl = strlen(file);
    char cand[MAXPATH];
    if (path && *file && !strchr(file, '/') && fl <= 255 /* NAME_MAX */) {
        for (const char *p = path;; p++) {
            const char *end = strchrnul(p, ':');
            size_t dl = (size_t)(end - p);
            if (dl + 1 + fl + 1 > sizeof cand)
                break; /* what execvp does with it: its business */
            if (dl) {
                memcpy(cand, p, dl);
                cand[dl] = '/';
                memcpy(cand + dl + 1, file, fl + 1);
            } else {
                memcpy(cand, file, fl + 1); /* an empty entry: the working directory */
            }
            if (access(cand, F_OK) == 0) {
                execv(cand, argv);
                break;
            }
            if ((errno != ENOENT && errno != ENOTDIR) || !*end)
                break;
            p = end;
        }
    }
    execvp(file, argv);
}

#define N_FWD_SIGS 7

/* Pass a signal sent to hep-exec on to the command.  One the kernel made for a terminal's
 * process group (^C, ^\, a hang-up: si_code SI_KERNEL) has reached the command already; one
 * the command has just had from the same sender is not sent again (see fwd_rec). */
static void forward_signal(int sig, siginfo_t *info, void *uctx)
{
    (void)uctx;
    int saved_errno = errno;
    pid_t to = forward_to;
    if (to > 0 && info->si_code != SI_KERNEL && sig > 0 && sig < FWD_NSIG &&
        !(direct_rec[sig].sender == info->si_pid && within_a_second(&direct_rec[sig].at))) {
        fwd_rec[sig].ours_delivered = fwd_rec[sig].direct_delivered = 0;
        fwd_rec[sig].sender = info->si_pid;
        clock_gettime(CLOCK_MONOTONIC, (struct timespec *)&fwd_rec[sig].at);
        kill(to, sig);
    }
    errno = saved_errno;
}

static void restore_signals(const int *sigs, const struct sigaction *saved, const int *forwarding)
{
    forward_to = 0;
    for (int i = 0; i < N_FWD_SIGS; i++)
        if (forwarding[i])
            sigaction(sigs[i], &saved[i], NULL);
}

/* A run's answers (the answer cache, fstat identities, what was staged, the in-process
 * table): kept after a run until the next one starts. */
static int answers_left;

static void answers_clear(void)
{
    cache_clear();
    ids_clear();
    stage_clear();
    fo_fini();
    answers_left = 0;
}

static PyObject *trap_run(PyObject *self, PyObject *args)
{
    PyObject *argv_o, *env_o, *h;
    const char *mnt, *shd;
    Py_ssize_t mn, sn;
    long spin_us = 0;
    int mode = 2; /* 0 ptrace, 1 notify, 2 notify where the kernel does it well */
    int in_process = 1; /* notify mode: opens of published paths inside tracees */
    int io_uring = 0;   /* let the command set up io_uring rings (see install_filter) */
    const char *rnd = NULL; /* the shadow tree as /proc links spell it (default: shd) */
    Py_ssize_t rn = 0;
    const char *wr = NULL; /* where we write the shadow tree (default: none) */
    Py_ssize_t wrn = 0;
    PyObject *dirs_o = NULL; /* RAM file directories that open answers name (fo_add_object_dir) */
    (void)self;
    if (!PyArg_ParseTuple(args, "OOy#y#O|lippy#y#O", &argv_o, &env_o, &mnt, &mn, &shd, &sn, &h,
                          &spin_us, &mode, &in_process, &io_uring, &rnd, &rn, &wr, &wrn,
                          &dirs_o))
        return NULL;
    if (dirs_o && dirs_o != Py_None && !PyList_Check(dirs_o)) {
        PyErr_SetString(PyExc_TypeError, "object_dirs must be a list of bytes");
        return NULL;
    }
    if (!rnd) {
        rnd = shd;
        rn = sn;
    }
    refuse_io_uring = !io_uring;
    if (handler) {
        PyErr_SetString(PyExc_RuntimeError, "worker.trace._trap.run is not re-entrant");
        return NULL;
    }
    if (mn <= 1 || mn >= MAXPATH || sn <= 1 || sn >= MAXPATH || rn <= 1 || rn >= MAXPATH ||
        mnt[0] != '/' || shd[0] != '/' || rnd[0] != '/') {
        PyErr_SetString(PyExc_ValueError, "mount and shadow must be absolute paths");
        return NULL;
    }
    char **cargv = to_cstrings(argv_o);
    if (!cargv)
        return NULL;
    char **cenv = to_cstrings(env_o);
    if (!cenv) {
        free_cstrings(cargv);
        return NULL;
    }
    if (!cargv[0]) {
        free_cstrings(cargv);
        free_cstrings(cenv);
        PyErr_SetString(PyExc_ValueError, "empty command");
        return NULL;
    }
    if (answers_left)
        answers_clear();
    free(mirror_w);
    mirror_w = NULL;
    if (wr && wrn > 0 && !(mirror_w = strndup(wr, (size_t)wrn)))
        return PyErr_NoMemory();
    mirror_wn = mirror_w ? (size_t)wrn : 0;
    int notify = mode == 1 || (mode == 2 && probe_notify());
    n_node_puts = n_node_dirs = fo_only = n_opens_put = 0;
    fo_lost = 0;
    memcpy(mount_p, mnt, (size_t)mn);
    mount_p[mn] = 0;
    mount_n = (size_t)mn;
    memcpy(target_p, shd, (size_t)sn);
    target_p[sn] = 0;
    target_n = (size_t)sn;
    memcpy(shadow_p, rnd, (size_t)rn);
    shadow_p[rn] = 0;
    shadow_n = (size_t)rn;
    memset(n_trapped, 0, sizeof n_trapped);
    n_pass = n_hits = n_upcalls = n_notified = n_absent = 0;
    said_tracer = 0;
    my_uid = getuid();
    n_scratch = n_held = 0;
    if (getrandom(&scratch_cookie, sizeof scratch_cookie, 0) != sizeof scratch_cookie)
        scratch_cookie = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
    own_fd_prefix_n = (size_t)snprintf(own_fd_prefix, sizeof own_fd_prefix, "/proc/%d/fd/",
                                       (int)getpid());
    if (notify && in_process && fo_init(mount_p, mount_n, mirror_w) == 0) { /* before fork */
        struct stat sd;
        fo_set_shadow(shadow_p, shadow_n, stat(target_p, &sd) == 0 ? (uint64_t)sd.st_dev : 0);
        for (Py_ssize_t i = 0; dirs_o && dirs_o != Py_None && i < PyList_GET_SIZE(dirs_o); i++) {
            PyObject *d = PyList_GET_ITEM(dirs_o, i);
            if (PyBytes_Check(d))
                fo_add_object_dir(PyBytes_AS_STRING(d), (size_t)PyBytes_GET_SIZE(d));
        }
    }
    fo_give_table(-1); /* a table file given for the run and not taken (ptrace mode ...) */

    int go[2], err[2], ctl[2];
    if (pipe2(go, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0 ||
        socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ctl) < 0) {
        free_cstrings(cargv);
        free_cstrings(cenv);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    /* Like a shell running a foreground job: ^C and ^\ are for the command, which gets them
     * from the terminal; the tracer keeps going until the command has reacted.  What a batch
     * system sends to hep-exec itself (SIGTERM before SIGKILL, SIGHUP, SIGUSR1/2, SIGXCPU, a
     * kill -INT) is passed on to the command, whose status hep-exec then exits with: the
     * command's own handlers get their grace period. */
    static const int fwd_sigs[N_FWD_SIGS] = {SIGINT, SIGQUIT, SIGTERM, SIGHUP,
                                             SIGUSR1, SIGUSR2, SIGXCPU};
    struct sigaction saved[N_FWD_SIGS];
    int forwarding[N_FWD_SIGS] = {0};
    forward_to = 0;
    memset((void *)fwd_rec, 0, sizeof fwd_rec);
    memset((void *)direct_rec, 0, sizeof direct_rec);
    for (int i = 0; i < N_FWD_SIGS; i++) {
        struct sigaction fwd;
        memset(&fwd, 0, sizeof fwd);
        fwd.sa_sigaction = forward_signal;
        fwd.sa_flags = SA_SIGINFO | SA_RESTART;
        sigfillset(&fwd.sa_mask);
        /* a signal the caller ignores (nohup, a background job) stays ignored, for us and for
         * the command, which inherits the disposition */
        if (sigaction(fwd_sigs[i], NULL, &saved[i]) == 0 && saved[i].sa_handler != SIG_IGN)
            forwarding[i] = sigaction(fwd_sigs[i], &fwd, NULL) == 0;
    }
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0) {
        restore_signals(fwd_sigs, saved, forwarding);
        free_cstrings(cargv);
        free_cstrings(cenv);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (child == 0) {
        char c;
        close(go[1]);
        close(err[0]);
        close(ctl[0]);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        /* what Python ignores for itself, and what the tracer ignores while it runs */
        signal(SIGPIPE, SIG_DFL);
        signal(SIGXFSZ, SIG_DFL);
        for (int i = 0; i < N_FWD_SIGS; i++)
            if (forwarding[i])
                signal(fwd_sigs[i], SIG_DFL);
        /* The filter goes in before the tracer attaches: nothing it traps runs until exec,
         * which waits for "go". */
        int lfd = install_filter(notify);
        char got = notify ? 'N' : 'P';
        if (lfd < 0 && notify && (errno == EBUSY || errno == EINVAL)) {
            lfd = install_filter(0); /* a listener above us already, or an old kernel */
            got = 'P';
        }
        if (lfd < 0) {
            send_report(ctl[1], 'S', errno, -1);
            _exit(127);
        }
        if (send_report(ctl[1], got, 0, got == 'N' ? lfd : -1) < 0)
            _exit(127);
        if (got == 'N')
            close(lfd);
        close(ctl[1]);
        if (read(go[0], &c, 1) != 1)
            _exit(127);
        environ = cenv;
        exec_command(cargv);
        int e[2] = {'E', errno};
        if (write(err[1], e, sizeof e) < 0) {}
        _exit(errno == ENOENT ? 127 : 126);
    }
    forward_to = child;
    close(go[0]);
    close(err[1]);
    close(ctl[1]);
    free_cstrings(cargv);
    free_cstrings(cenv);
    int report_err = 0, lfd = -1, report;
    Py_BEGIN_ALLOW_THREADS
    report = recv_report(ctl[0], &report_err, &lfd);
    Py_END_ALLOW_THREADS
    close(ctl[0]);
    if (report != 'N')
        fo_fini(); /* ptrace mode: its filter has no way through for injected calls */
    long opts = PTRACE_O_TRACESECCOMP | PTRACE_O_EXITKILL | PTRACE_O_TRACECLONE |
                PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACEVFORKDONE |
                PTRACE_O_TRACEEXEC | PTRACE_O_TRACESYSGOOD;
    int seize_err = 0;
    if (report != 'N' && report != 'P')
        seize_err = -1;
    else if (ptrace(PTRACE_SEIZE, child, 0, (void *)opts) != 0)
        seize_err = errno;
    if (seize_err) {
        restore_signals(fwd_sigs, saved, forwarding);
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
        close(go[1]);
        close(err[0]);
        fo_fini();
        if (lfd >= 0)
            close(lfd);
        if (report == 'S')
            return PyErr_Format(PyExc_PermissionError, "seccomp filter refused: %s",
                                strerror(report_err));
        if (seize_err < 0)
            return PyErr_Format(PyExc_OSError, "the traced command did not start");
        return PyErr_Format(PyExc_PermissionError, "ptrace(PTRACE_SEIZE) failed: %s",
                            strerror(seize_err));
    }
    tstate_t *first = thread_find(child, 1);
    if (first)
        first->origin = ORIGIN_OWN;
    if (lfd >= 0) {
        notify_fd = lfd;
        if (start_notify_threads() != 0) {
            kill(child, SIGKILL); /* nobody would answer its notifications */
            waitpid(child, NULL, __WALL);
            stop_notify_threads();
            close(go[1]);
            close(err[0]);
            restore_signals(fwd_sigs, saved, forwarding);
            thread_forget(child);
            fo_fini();
            return PyErr_Format(PyExc_OSError, "cannot start the notification thread");
        }
    }
    /* The handler before "go": the child's first calls (exec_command's access() along PATH)
     * may be notifications on a /cvmfs path, answered by the notification threads at once. */
    handler = h;
    Py_INCREF(handler);
    if (write(go[1], "g", 1) != 1) {}
    close(go[1]);

    int exit_status = -1;
    long spin_ns = spin_us * 1000L, gap_ns = 0;
    PyObject *failure = NULL, *f_val = NULL, *f_tb = NULL;
    for (;;) {
        int status;
        pid_t tid;
        Py_BEGIN_ALLOW_THREADS
        tid = 0;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        if (spin_ns > 0 && gap_ns < spin_ns) {
            /* Poll briefly before sleeping when tracees have been coming back quickly: on
             * VMs, waking an idle CPU costs more than the whole round trip.  gap_ns (a moving
             * average of the time between resuming and the next stop) keeps the tracer from
             * burning CPU while tracees compute. */
            for (;;) {
                tid = waitpid(-1, &status, __WALL | WNOHANG);
                if (tid != 0)
                    break;
                clock_gettime(CLOCK_MONOTONIC, &t1);
                if ((t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec) > spin_ns)
                    break;
            }
        }
        if (tid == 0)
            tid = waitpid(-1, &status, __WALL);
        if (spin_ns > 0) {
            clock_gettime(CLOCK_MONOTONIC, &t1);
            long gap = (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec);
            if (gap > 4 * spin_ns)
                gap = 4 * spin_ns;
            gap_ns = (7 * gap_ns + gap) / 8;
        }
        if (tid >= 0)
            big_lock(); /* before the GIL: the lock order */
        Py_END_ALLOW_THREADS
        if (tid < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0 && !failure) {
                    PyErr_Fetch(&failure, &f_val, &f_tb);
                    Py_BEGIN_ALLOW_THREADS /* `big` before the GIL: the lock order */
                    big_lock();
                    kill_all();
                    pthread_mutex_unlock(&big);
                    Py_END_ALLOW_THREADS
                }
                continue;
            }
            break; /* ECHILD: nothing left */
        }
        ptrace_event(tid, status, child, &exit_status);
        if (failure)
            kill_all();
        pthread_mutex_unlock(&big);
    }
    Py_BEGIN_ALLOW_THREADS
    stop_notify_threads();
    ahead_join();
    opens_join();
    Py_END_ALLOW_THREADS
    restore_signals(fwd_sigs, saved, forwarding);
    Py_BEGIN_ALLOW_THREADS
    big_lock(); /* a thread of ours in holding() puts nothing after this */
    Py_END_ALLOW_THREADS
    Py_CLEAR(handler);
    pthread_mutex_unlock(&big);
    size_t cached = table_len;
    for (size_t i = 0; i < threads_cap; i++)
        free(threads[i].cwd);
    free(threads);
    threads = NULL;
    threads_cap = threads_used = 0;
    n_scratch = n_held = 0;
    xattrs_unpublished = names_unpublished = 0;
    free(pend.img);
    memset(&pend, 0, sizeof pend);

    int e[2] = {0, 0};
    ssize_t got = read(err[0], e, sizeof e);
    close(err[0]);
    if (failure) {
        answers_clear();
        PyErr_Restore(failure, f_val, f_tb);
        return NULL;
    }
    PyObject *st = stats_dict(cached, report == 'N' ? "seccomp-notify" : "ptrace");
    /* the answers stay until the next run (or the process's exit, which frees them at once
     * rather than tens of thousands of entries one by one) */
    answers_left = 1;
    if (!st)
        return NULL;
    int exec_errno = got == sizeof e && e[0] == 'E' ? e[1] : 0;
    return Py_BuildValue("iiN", exit_status, exec_errno, st);
}
