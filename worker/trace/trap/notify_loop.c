/*
 * The notification loop (notify mode): answer_notification and the notify threads (start,
 * stop).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and threads.c, config.c, redirect.c, seccomp_stop.c define.
 */

/* ---------- the notification loop (notify mode) ---------- */

static int stop_efd = -1;
static size_t notif_req_size, notif_resp_size;
static void answer_notification(const struct seccomp_notif *req, struct seccomp_notif_resp *resp)
{
    struct user_regs_struct regs;
    memset(&regs, 0, sizeof regs);
    regs.orig_rax = (unsigned long long)req->data.nr;
    regs.rdi = req->data.args[0];
    regs.rsi = req->data.args[1];
    regs.rdx = req->data.args[2];
    regs.r10 = req->data.args[3];
    regs.r8 = req->data.args[4];
    regs.r9 = req->data.args[5];
    memset(resp, 0, notif_resp_size);
    resp->id = req->id;
    resp->flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
    big_lock();
    n_notified++;
    tstate_t *t = thread_find((pid_t)req->pid, 1);
    if (t) {
        cur_notif.active = 1;
        cur_notif.id = req->id;
        cur_notif.replied = 0;
        cur_notif.ip = req->data.instruction_pointer;
        int changed = handle_syscall((pid_t)req->pid, &regs, t);
        cur_notif.active = 0;
        if (cur_notif.replied) {
            resp->id = 0; /* answered by ADDFD_FLAG_SEND */
        } else if (changed && regs.orig_rax == (unsigned long long)-1) {
            long long v = (long long)regs.rax;
            resp->flags = 0;
            if (v < 0 && v >= -4095)
                resp->error = (int32_t)v;
            else
                resp->val = v;
        }
    }
    pthread_mutex_unlock(&big);
}

static void *notify_main(void *arg)
{
    (void)arg;
    struct seccomp_notif *req = calloc(1, notif_req_size);
    struct seccomp_notif_resp *resp = calloc(1, notif_resp_size);
    struct pollfd pf[2] = {{notify_fd, POLLIN, 0}, {stop_efd, POLLIN, 0}};
    while (req && resp) {
        if (!leading) {
            pthread_mutex_lock(&lead_mu);
            while (lead_taken && !notify_stopping)
                pthread_cond_wait(&lead_cv, &lead_mu);
            int stopping = notify_stopping;
            lead_taken = leading = !stopping;
            pthread_mutex_unlock(&lead_mu);
            if (stopping)
                break;
        }
        int got = 0, done = 0;
        while (!got && !done) {
            if (poll(pf, 2, -1) < 0) {
                done = errno != EINTR;
                continue;
            }
            if (pf[1].revents || (!(pf[0].revents & POLLIN) &&
                                  (pf[0].revents & (POLLHUP | POLLERR | POLLNVAL)))) {
                done = 1; /* stopped, or no tracee left */
                continue;
            }
            if (!(pf[0].revents & POLLIN))
                continue;
            memset(req, 0, notif_req_size);
            got = ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_RECV, req) == 0; /* else: caller gone */
        }
        if (done) {
            pthread_mutex_lock(&lead_mu);
            lead_taken = leading = 0;
            notify_stopping = 1;
            pthread_cond_broadcast(&lead_cv);
            pthread_mutex_unlock(&lead_mu);
            break;
        }
        answer_notification(req, resp);
        if (resp->id)
            ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_SEND, resp); /* ENOENT: gone, fine */
    }
    free(req);
    free(resp);
    return NULL;
}

static pthread_t notify_threads[NOTIFY_THREADS];
static int notify_started;

static int start_notify_threads(void)
{
    struct seccomp_notif_sizes sz;
    notif_req_size = sizeof(struct seccomp_notif);
    notif_resp_size = sizeof(struct seccomp_notif_resp);
    if (syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &sz) == 0) {
        if (sz.seccomp_notif > notif_req_size)
            notif_req_size = sz.seccomp_notif;
        if (sz.seccomp_notif_resp > notif_resp_size)
            notif_resp_size = sz.seccomp_notif_resp;
    }
    stop_efd = eventfd(0, EFD_CLOEXEC);
    if (stop_efd < 0)
        return -1;
    lead_taken = notify_stopping = 0;
    cpu_set_t cpus;
    one_cpu = sched_getaffinity(0, sizeof cpus, &cpus) == 0 && CPU_COUNT(&cpus) == 1;
    /* Wake us on the trapping task's CPU and hand the CPU straight back on reply. */
    if (ioctl(notify_fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, 0)) {}
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay with Python's threads */
    for (notify_started = 0; notify_started < NOTIFY_THREADS; notify_started++)
        if (pthread_create(&notify_threads[notify_started], NULL, notify_main, NULL) != 0)
            break;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return notify_started ? 0 : -1;
}

static void stop_notify_threads(void)
{
    fifo_opens_finish();
    if (notify_started) {
        uint64_t one = 1;
        if (write(stop_efd, &one, sizeof one) < 0) {}
        pthread_mutex_lock(&lead_mu);
        notify_stopping = 1;
        pthread_cond_broadcast(&lead_cv);
        pthread_mutex_unlock(&lead_mu);
        for (int i = 0; i < notify_started; i++)
            pthread_join(notify_threads[i], NULL);
        notify_started = 0;
    }
    if (stop_efd >= 0)
        close(stop_efd);
    if (notify_fd >= 0)
        close(notify_fd);
    stop_efd = notify_fd = -1;
}
