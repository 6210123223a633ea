/*
 * Per-thread state (tstate_t): registers to restore at syscall exit, whose memory the thread
 * runs in, the cwd generation; the table of threads (thread_find, thread_forget).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses only
 * what _trap.c's header defines.
 */

/* ---------- per-thread state: registers to restore at syscall exit ---------- */

/* Whose memory a thread runs in, for the mapping a rewritten exec leaves behind (see
 * exec_scratch): a vfork child's is its parent's until it execs or exits. */
enum { ORIGIN_UNKNOWN = 0, ORIGIN_OWN = 1, ORIGIN_VFORK = 2, ORIGIN_THREAD = 3 };

typedef struct {
    pid_t tid; /* 0 = free, -1 = tombstone */
    int nrestore;
    int off[2];
    unsigned long long val[2];
    int cwd_changes; /* chdir/fchdir in flight: bump cwd_gen at its exit */
    char *cwd;       /* cached readlink of /proc/<tid>/cwd, valid while cwd_gen matches */
    size_t cwd_len;
    unsigned long cwd_gen;
    int origin; /* ORIGIN_*: set by the event that created the thread, OWN after an exec */
    int execd;  /* has exec'd: a late creation event must not make it a vfork child again */
    pid_t parent; /* who forked or vforked it (0: not known): its exec's call site is there */
    /* An exec running from a scratch mapping (scr_len != 0): where the mapping is and the
     * caller's own filename and argv registers, put back if the exec fails. */
    unsigned long scr_addr, scr_len;
    unsigned long long scr_path0, scr_argv0;
    int scr_path_arg, scr_argv_arg;
} tstate_t;

/* Bumped by every chdir/fchdir of any tracee (at entry and exit): invalidates all cached
 * working directories, which saves a readlink per relative-path call otherwise. */
static unsigned long cwd_gen = 1;

static tstate_t *threads;
static size_t threads_cap, threads_used;

static tstate_t *thread_find(pid_t tid, int create)
{
    if (create && (threads_used + 1) * 2 > threads_cap) {
        /* threads_used counts tombstones too: a job that runs 20,000 short processes
         * leaves as many.  Purge them at the same size unless the live ones need room
         * (doubling every time grew hep-exec by ~85 bytes per exec). */
        size_t live = 0;
        for (size_t i = 0; i < threads_cap; i++)
            live += threads[i].tid > 0;
        size_t ncap = !threads_cap ? 1024 : (live + 1) * 4 > threads_cap ? threads_cap * 2
                                                                        : threads_cap;
        tstate_t *nt = table_calloc(ncap, sizeof(*nt));
        if (!nt)
            return NULL;
        size_t used = 0;
        for (size_t i = 0; i < threads_cap; i++) {
            if (threads[i].tid <= 0)
                continue;
            size_t j = (size_t)threads[i].tid & (ncap - 1);
            while (nt[j].tid)
                j = (j + 1) & (ncap - 1);
            nt[j] = threads[i];
            used++;
        }
        free(threads);
        threads = nt;
        threads_cap = ncap;
        threads_used = used;
    }
    if (!threads_cap)
        return NULL;
    size_t tomb = (size_t)-1;
    for (size_t i = (size_t)tid & (threads_cap - 1);; i = (i + 1) & (threads_cap - 1)) {
        if (threads[i].tid == tid)
            return &threads[i];
        if (threads[i].tid == -1 && tomb == (size_t)-1)
            tomb = i;
        if (threads[i].tid == 0) {
            if (!create)
                return NULL;
            size_t j = tomb != (size_t)-1 ? tomb : i;
            if (tomb == (size_t)-1)
                threads_used++;
            memset(&threads[j], 0, sizeof(threads[j]));
            threads[j].tid = tid;
            return &threads[j];
        }
    }
}

static void thread_forget(pid_t tid)
{
    tstate_t *t = thread_find(tid, 0);
    if (t) {
        free(t->cwd);
        memset(t, 0, sizeof *t);
        t->tid = -1;
    }
}
