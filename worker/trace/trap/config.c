/*
 * Run-wide configuration (mount, shadow and target paths, the Python handler, the notify fd,
 * the `big` lock (and how threads of ours working ahead take it, start and stop) and the
 * leader hand-off of the notify threads) and the statistics counters.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses only
 * what _trap.c's header defines.
 */

/* ---------- run-wide configuration and statistics ---------- */

/* The shadow tree under two names: shadow_p as the kernel spells it in /proc/<pid>/cwd and
 * fd links (the tracer's private mount renders as "/hep-exec-.../cvmfs"), target_p as tracees
 * are sent to it (through the tracer's fd of its read-only view: /proc/<pid>/fd/<n>/...).  The
 * same string where the shadow tree is a plain directory. */
static char mount_p[MAXPATH], shadow_p[MAXPATH], target_p[MAXPATH];
static size_t mount_n, shadow_n, target_n;
static PyObject *handler;
static unsigned long long n_trapped[NSYS], n_pass, n_hits, n_upcalls, n_notified, n_absent;
static uid_t my_uid;

/* Threads answering tracees in notify mode: the ptrace loop (the thread that called run) and
 * two notification threads.  `big` serialises them over all the state above and below, and
 * over calls into Python (only the ADDFD wait in notify_open runs outside it); lock order is
 * big, then the GIL. */
static pthread_mutex_t big = PTHREAD_MUTEX_INITIALIZER;
/* Threads waiting for `big` to answer a call: the thread putting opens ahead gives way to
 * them (a mutex is not fair: it would take the lock again and again). */
static int big_wanted;

static inline void big_lock(void)
{
    __atomic_add_fetch(&big_wanted, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_lock(&big);
    __atomic_sub_fetch(&big_wanted, 1, __ATOMIC_ACQ_REL);
}

/* `big` for a thread of ours working ahead of the program: taken only by trying, and not while
 * a thread answering a call waits for it; 0 (not taken) once *stop is set, so that a thread
 * holding `big` can stop and join this one. */
static int big_lock_giving_way(const int *stop)
{
    while (__atomic_load_n(&big_wanted, __ATOMIC_ACQUIRE) || pthread_mutex_trylock(&big) != 0) {
        if (__atomic_load_n(stop, __ATOMIC_ACQUIRE))
            return 0;
        struct timespec pause = {0, 20000};
        nanosleep(&pause, NULL);
    }
    return 1;
}

/* This thread holds `big` through holding() (worker/trace/trap/tables.c): the work it does
 * there is ahead of the program, so it gives way to the threads answering calls. */
static __thread int holding_ahead;

/* Between two pieces of holding()'s work: `big` (and the GIL) to a thread answering a call
 * that waits for it, and back once none does.  0: the run ended meanwhile (its handler is
 * cleared under `big`), so the work stops. */
static int give_way_held(void)
{
    static const int never = 0;
    if (!holding_ahead || !__atomic_load_n(&big_wanted, __ATOMIC_ACQUIRE))
        return 1;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_unlock(&big);
    big_lock_giving_way(&never);
    Py_END_ALLOW_THREADS
    return handler != NULL;
}

/* A thread of ours working ahead: started with every signal blocked (they stay the main
 * thread's); *running says whether it was. */
static void ahead_thread_start(pthread_t *t, void *(*fn)(void *), int *running, int *stop)
{
    *stop = 0;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    *running = pthread_create(t, NULL, fn, NULL) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* ... and stopped: told to, then joined. */
static void ahead_thread_join(pthread_t t, int *running, int *stop)
{
    if (*running) {
        __atomic_store_n(stop, 1, __ATOMIC_RELEASE);
        pthread_join(t, NULL);
        *running = 0;
    }
}
static int notify_fd = -1;
/* The notification this thread is answering (notification threads only). */
static __thread struct {
    int active;
    uint64_t id;
    int replied; /* answered already, by SECCOMP_IOCTL_NOTIF_ADDFD with ADDFD_FLAG_SEND */
    uint64_t ip; /* where the caller's syscall instruction ends */
} cur_notif;

/* Two notification threads take turns: the leader waits on the listener and answers.  An
 * open's ADDFD sleeps until the caller has taken its fd, and then that thread is woken on
 * another CPU (not a synchronous wake-up); so before ADDFD the leader hands the wait to the
 * other thread, which picks up the caller's next call (its fstat, the next open) meanwhile. */
#define NOTIFY_THREADS 2
static pthread_mutex_t lead_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t lead_cv = PTHREAD_COND_INITIALIZER;
static int lead_taken, notify_stopping;
static __thread int leading;
static unsigned addfd_count; /* under big */
static double addfd_us;      /* recent un-handed-over ADDFD time (µs), under big */
static int addfd_slow;
static int one_cpu; /* we may run on one CPU only: nobody to hand the wait to */

static void pass_lead(void)
{
    if (!leading)
        return;
    leading = 0;
    pthread_mutex_lock(&lead_mu);
    lead_taken = 0;
    pthread_cond_signal(&lead_cv);
    pthread_mutex_unlock(&lead_mu);
}
