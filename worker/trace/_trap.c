/*
 * worker._trap: the ptrace + seccomp trap loop of hep-exec (x86_64 Linux).
 *
 * Why C: every trapped syscall costs a waitpid, a register read and a memory read; doing
 * that in Python caps a tracer near Parrot's rates.  So this loop keeps the hot path in C:
 * paths outside the mount prefix are let through without any Python call, and answers
 * for paths inside it are cached in a hash table (answers are immutable during a run).
 * Python (worker/tracer.py) is called only on a cache miss, with (tid, class, flags, path),
 * and returns an action tuple that this file applies and, if cacheable, remembers.
 *
 * The seccomp filter traps only path-taking syscalls, so read, write, mmap, fstat ... never
 * stop.  Where the kernel allows (notify mode), the hot ones go to a seccomp user-notification
 * fd answered by a second thread instead of a ptrace stop; see worker/TRACER.md.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/xattr.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#include "_fastopen_sup.h"
#include "_mirror.h"

#ifndef __x86_64__
#error "worker._trap supports x86_64 only"
#endif

#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif
#ifndef AT_EMPTY_PATH
#define AT_EMPTY_PATH 0x1000
#endif
#define X32_SYSCALL_BIT 0x40000000
#ifndef SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
#define SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (1UL << 5)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (1UL << 0)
#endif
#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif

/* Syscall classes; must match worker/tracer.py (Cls). */
enum {
    C_NONE = 0,
    C_OPEN = 1,
    C_STAT = 2,
    C_ACCESS = 3,
    C_READLINK = 4,
    C_EXEC = 5,
    C_CHDIR = 6,
    C_STATFS = 7,
    C_XATTR_GET = 8,
    C_XATTR_LIST = 9,
    C_WRITE = 10,  /* answered in C: EROFS */
    C_GETCWD = 11, /* answered in C from the shadow mapping */
    /* markers Python puts (trap_put), never asked: a directory whose every entry is known
     * (C_LISTED), and each of those entries (C_NAMED).  A path in a listed directory that is
     * not named there does not exist: ENOENT without asking Python. */
    C_LISTED = 30,
    C_NAMED = 31,
    /* a listed directory whose entries have no extended attributes but those answered
     * (A_XATTRS): getxattr/listxattr of the others are answered in C (see derived) */
    C_NOXATTR = 32,
};
/* Action kinds; must match worker/tracer.py (Act). */
enum {
    A_PASS = 0,
    A_RETURN = 1,
    A_REDIRECT = 2,
    A_STAT = 3,
    A_READLINK = 4,
    A_EXEC = 5,
    A_XATTRS = 6, /* bval: the entry's extended attributes, a CVMFS xattr blob */
};
#define F_NOFOLLOW 0x100
#define F_OPATH 0x200
#define F_PROCEXE 0x400 /* never cached: answers depend on the process */
#define F_WRITE 0x800   /* open for writing, nothing created or truncated: EROFS but FIFOs */

#define NSYS 512
#define MAXPATH 4096

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
    X(465, "listxattrat") X(466, "removexattrat")
#define TRAPPED_NR(nr, name) nr,
#define TRAPPED_NAME(nr, name) name,
static const int trapped[] = {TRAPPED_CALLS(TRAPPED_NR)};
static const char *const trapped_names[] = {TRAPPED_CALLS(TRAPPED_NAME)};

/* A listener fd, and callers that stop being interruptible once we have read their call. */
#define NOTIFY_FILTER_FLAGS \
    (SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV)

/* In seccomp-notify mode these still take a ptrace stop: exec and chdir change the tracee
 * (registers, cwd), which only ptrace can do; openat2 and the *xattrat calls are rare. */
static int ptrace_only(int nr)
{
    switch (nr) {
    case SYS_execve: case SYS_execveat: case SYS_chdir: case SYS_fchdir:
    case 437: /* openat2: O_PATH hides in struct open_how (see below) */
    case 464: case 465:
        return 1;
    default:
        return 0;
    }
}

/* Refuse io_uring_setup in the command (see install_filter); set by trap_run. */
static int refuse_io_uring = 1;

/*
 * notify=0: every trapped syscall is a ptrace stop (SECCOMP_RET_TRACE).
 * notify=1: the hot ones (open, stat, access, readlink, getcwd, writes) are sent to a
 * seccomp user-notification listener instead, whose fd is returned: answering one costs two
 * context switches and no ptrace register traffic.
 * Returns the listener fd (notify), 0 (ptrace), or -1 with errno.
 */
static int install_filter(int notify)
{
    enum { N = sizeof(trapped) / sizeof(trapped[0]) };
    struct sock_filter prog[44 + 2 * N];
    int k = 0;
    const uint32_t allow = SECCOMP_RET_ALLOW, trace = SECCOMP_RET_TRACE;
    const uint32_t hot = notify ? SECCOMP_RET_USER_NOTIF : trace;
#define STMT(c, v) prog[k++] = (struct sock_filter)BPF_STMT(c, v)
#define JUMP(c, v, t, f) prog[k++] = (struct sock_filter)BPF_JUMP(c, v, t, f)
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
    /* fstat (newfstatat/statx with AT_EMPTY_PATH too) stops as well: see fd_stat. */
    if (notify && fo_enabled()) {
        /* calls made by the in-process handler (or injected at exec): their 6th argument is
         * the run's random cookie (no trapped call has six) */
        uint64_t cookie = fo_cookie();
        STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[5]));
        JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)cookie, 0, 3);
        STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[5]) + 4);
        JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)(cookie >> 32), 0, 1);
        STMT(BPF_RET | BPF_K, allow);
    }
    if (notify) {
        /* O_PATH opens take a ptrace stop: an O_PATH fd cannot be installed with ADDFD. */
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
    STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    for (int i = 0; i < N; i++) {
        JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)trapped[i], 0, 1);
        STMT(BPF_RET | BPF_K, ptrace_only(trapped[i]) ? trace : hot);
    }
    STMT(BPF_RET | BPF_K, allow);
#undef STMT
#undef JUMP
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
 * hep-exec, container runtimes), which this finds too.  Probed in a throwaway child. */
static int probe_notify(void)
{
    static int known = -1;
    if (known >= 0)
        return known;
    pid_t c = fork();
    if (c < 0)
        return known = 0;
    if (c == 0) {
        struct sock_filter prog[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
        struct sock_fprog fprog = {.len = 1, .filter = prog};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
            _exit(1);
        int fd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, NOTIFY_FILTER_FLAGS, &fprog);
        if (fd < 0)
            _exit(1);
        _exit(ioctl(fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, 0)
                  ? 1 : 0);
    }
    int st = 0;
    while (waitpid(c, &st, 0) < 0 && errno == EINTR) {}
    return known = WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

/* ---------- answer cache ---------- */

/* An entry's xattrs could not be published in-process: no directory says "no xattrs" there
 * any more (FO_NOXATTR), or the handler would deny that entry's. */
static int xattrs_unpublished;
/* A name of a listed directory could not be published (the table is full): no directory is
 * published as listed any more (FO_LISTED), or the handler would deny that name. */
static int names_unpublished;

static unsigned long long n_node_puts; /* answers put from the node's */

/* answers from the node, staged per directory (defined with stage_dir) */
static int put_staged_ancestors(const char *key, size_t kn);
static unsigned long long n_node_dirs; /* directory opens answered from the node's listings */
static unsigned long long n_opens_put; /* open answers put ahead (objects the node holds) */
/* the shadow tree's read-write view: the mount's mirror (NULL: none; set by run) */
static char *mirror_w;
static size_t mirror_wn;
static void stage_clear(void);
static void dirs_clear(void);


typedef struct {
    int kind;
    int64_t ival;
    char *bval; /* redirect target (NUL-terminated) or readlink bytes */
    size_t blen;
    int64_t st[15]; /* see tracer.py STAT_FIELDS */
    uint64_t ram_dev, ram_ino; /* open served from a RAM file: its device and inode, or 0 */
} action_t;

typedef struct {
    uint64_t hash;
    int cls;
    int flags;
    char *key;
    size_t klen;
    action_t act;
    int pooled; /* it and its key are in the pool (answers put ahead): not freed one by one */
} entry_t;

/*
 * The answer cache's entries for answers put ahead: a job on a warm node puts 20,000 of them
 * while its program waits for the mount.  They come from one mapping, entry and key side by
 * side, with no malloc bookkeeping, and go all at once with the run's answers.  (Not huge
 * pages: on a VM whose host takes back free memory, a fresh 2 MiB page costs 512 host faults,
 * 30 ms for a job's entries, where recycled small pages cost little.)
 */
#define POOL_MAX (1ul << 32) /* address space only: what is used gets memory */
static char *pool;
static size_t pool_used;

static void *pool_alloc(size_t n)
{
    if (!pool) {
        void *m = mmap(NULL, POOL_MAX, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED)
            return NULL;
        pool = m;
        pool_used = 0;
    }
    n = (n + 15) & ~(size_t)15;
    if (n > POOL_MAX - pool_used)
        return NULL;
    void *p = pool + pool_used;
    pool_used += n;
    return p;
}

static void pool_clear(void)
{
    if (pool)
        munmap(pool, POOL_MAX);
    pool = NULL;
    pool_used = 0;
}

static void entry_free(entry_t *e)
{
    free(e->act.bval);
    if (!e->pooled) {
        free(e->key);
        free(e);
    }
}
static int dir_open_from_node(const char *key, size_t kn, action_t *out);
static int put_deferred_opens(const char *key, size_t kn);
static void ahead_join(void);
static void ahead_clear(void);

/* The hash beside each pointer: probing a run of slots reads no entry but the one that
 * matches (tens of thousands of answers are put at a job's start, each probed first). */
typedef struct {
    uint64_t hash; /* the entry's; 0 with e NULL */
    entry_t *e;
} cslot_t;
static cslot_t *table;

/* Move the live slots of an open-addressing table (`old`, `ocap` slots) into an empty one
 * (`nt`, `ncap` slots, a power of two), each at its hash (field HF; 0: an empty slot). */
#define OA_MOVE(nt, ncap, old, ocap, HF)                                                    \
    for (size_t oa_i = 0; oa_i < (ocap); oa_i++) {                                          \
        if (!(old)[oa_i].HF)                                                                \
            continue;                                                                       \
        size_t oa_j = (old)[oa_i].HF & ((ncap) - 1);                                        \
        while ((nt)[oa_j].HF)                                                               \
            oa_j = (oa_j + 1) & ((ncap) - 1);                                               \
        (nt)[oa_j] = (old)[oa_i];                                                           \
    }
static size_t table_cap, table_len;

static uint64_t fnv(int cls, int flags, const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ULL ^ (uint64_t)(cls * 131 + flags);
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    return h ? h : 1;
}

/* The slot holding (cls, flags, key), or the empty one ending its run. */
static cslot_t *cache_slot(int cls, int flags, const char *k, size_t n, uint64_t h)
{
    for (size_t i = h & (table_cap - 1);; i = (i + 1) & (table_cap - 1)) {
        cslot_t *c = &table[i];
        if (!c->e)
            return c;
        entry_t *e = c->e;
        if (c->hash == h && e->cls == cls && e->flags == flags && e->klen == n &&
            memcmp(e->key, k, n) == 0)
            return c;
    }
}

static entry_t *cache_get(int cls, int flags, const char *k, size_t n, uint64_t h)
{
    return table_cap ? cache_slot(cls, flags, k, n, h)->e : NULL;
}

/* Answers the C side put into the in-process table only (stat and lstat answers, the names of
 * listed directories: most of a node's answers), made entries of the answer cache when a
 * trapped call or a derivation needs one.  Putting 20,000 answers at a job's start then
 * writes each once. */
static unsigned long long fo_only; /* answers put that way this run (0: nothing to look for) */
static int fo_lost; /* the in-process table was withdrawn since: those answers are gone */
static entry_t *fo_backed(int cls, int flags, const char *key, size_t kn, uint64_t h);

static entry_t *cache_find(int cls, int flags, const char *k, size_t n, uint64_t h)
{
    entry_t *e = cache_get(cls, flags, k, n, h);
    return e || !fo_only || fo_lost ? e : fo_backed(cls, flags, k, n, h);
}

/* Withdraw every in-process answer; the names of listed directories among them, so no
 * listing may deny a name in C any more (absent_from_listing). */
static void withdraw_all(void)
{
    fo_withdraw_all();
    fo_lost = fo_only != 0;
}

/* Room for `more` entries at half load (one rehash instead of several as a table grows);
 * -1: out of memory. */
static int cache_reserve(size_t more)
{
    if ((table_len + more) * 2 <= table_cap)
        return 0;
    size_t ncap = table_cap ? table_cap : 4096;
    while ((table_len + more) * 2 > ncap)
        ncap *= 2;
    cslot_t *nt = calloc(ncap, sizeof(*nt));
    if (!nt)
        return -1;
    OA_MOVE(nt, ncap, table, table_cap, hash) /* (a live slot's hash is never 0) */
    free(table);
    table = nt;
    table_cap = ncap;
    return 0;
}

static void cache_put(entry_t *e)
{
    if (cache_reserve(1) < 0)
        return;
    size_t j = e->hash & (table_cap - 1);
    while (table[j].e)
        j = (j + 1) & (table_cap - 1);
    table[j].hash = e->hash;
    table[j].e = e;
    table_len++;
}

/* Remove one entry (linear probing: shift later entries of the run back). */
static int cache_del(int cls, int flags, const char *k, size_t n)
{
    uint64_t h = fnv(cls, flags, k, n);
    entry_t *e = cache_get(cls, flags, k, n, h);
    if (!e)
        return 0;
    size_t mask = table_cap - 1, i = h & mask;
    while (table[i].e != e)
        i = (i + 1) & mask;
    entry_free(e);
    table[i].e = NULL;
    table[i].hash = 0;
    table_len--;
    for (size_t j = (i + 1) & mask; table[j].e; j = (j + 1) & mask) {
        cslot_t m = table[j];
        table[j].e = NULL;
        table[j].hash = 0;
        size_t k2 = m.hash & mask;
        while (table[k2].e)
            k2 = (k2 + 1) & mask;
        table[k2] = m;
    }
    return 1;
}

static void cache_clear(void)
{
    withdraw_all();
    for (size_t i = 0; i < table_cap; i++) {
        if (table[i].e)
            entry_free(table[i].e);
    }
    free(table);
    table = NULL;
    table_cap = table_len = 0;
    pool_clear();
}

/* ---------- what fstat of a /cvmfs file descriptor says ---------- */

/*
 * An open /cvmfs file is one of the cache's RAM files (a memfd, or a file on its private
 * tmpfs: worker/ramfiles.py), whose own fstat shows another inode, device, mode and times
 * than stat of its path; cp and install compare the two and refuse ("replaced while being
 * copied"), cp -p would copy the RAM file's mode and times.  So every open served from a RAM
 * file (a regular file reached through our /proc/<pid>/fd) records its (device, inode) -> the
 * path's stat answer, and fstat of a tracee fd whose target is one of those files gets that
 * answer (several paths with the same content share one file: the one opened last wins).
 */
typedef struct {
    uint64_t dev, ino; /* ino 0 = free */
    int64_t st[15];
    int shared; /* opened under paths with different answers: never opened in-process */
} fdid_t;

static fdid_t *ids;
static size_t ids_cap, ids_len;
#define IDS_MAX (1u << 18) /* forget them all beyond this (a job opening that many files) */

static fdid_t *ids_find(uint64_t dev, uint64_t ino)
{
    if (!ids_cap)
        return NULL;
    size_t mask = ids_cap - 1;
    for (size_t i = ((ino ^ dev << 40) * 0x9E3779B97F4A7C15ull) >> 20 & mask;;
         i = (i + 1) & mask) {
        if ((ids[i].ino == ino && ids[i].dev == dev) || ids[i].ino == 0)
            return &ids[i];
    }
}

static void ids_put(uint64_t dev, uint64_t ino, const int64_t *st)
{
    if (!ino)
        return;
    fo_add_ram_dev(dev); /* fstat from a patched site of any file there comes to us */
    if ((ids_len + 1) * 2 > ids_cap) {
        size_t cap = ids_len >= IDS_MAX || !ids_cap ? 1024 : ids_cap * 2;
        fdid_t *old = ids;
        size_t old_cap = ids_cap;
        fdid_t *n = calloc(cap, sizeof *n);
        if (!n)
            return;
        ids = n;
        ids_cap = cap;
        ids_len = 0;
        if (cap <= old_cap)
            withdraw_all(); /* which files are shared is forgotten too */
        if (cap > old_cap) /* grow; past IDS_MAX start again empty */
            for (size_t i = 0; i < old_cap; i++)
                if (old[i].ino) {
                    *ids_find(old[i].dev, old[i].ino) = old[i];
                    ids_len++;
                }
        free(old);
    }
    fdid_t *slot = ids_find(dev, ino);
    if (slot->ino == 0)
        ids_len++;
    else if (!slot->shared && memcmp(slot->st, st, sizeof slot->st) != 0) {
        slot->shared = 1; /* fstat must follow the last open: keep those in the tracer */
        fo_withdraw_file(dev, ino);
    }
    slot->dev = dev;
    slot->ino = ino;
    memcpy(slot->st, st, sizeof slot->st);
}

/* A RAM file about to be offered for a path before anyone opened it (trap_put): record
 * its answer if the file is new to us; if it already serves a path with another answer it
 * becomes shared (its in-process answers go), but fstat keeps following the last real open.
 * 0: the path's open may be answered in-process. */
static int ids_claim(uint64_t dev, uint64_t ino, const int64_t *st)
{
    fdid_t *slot = ids_len ? ids_find(dev, ino) : NULL;
    if (!slot || slot->ino == 0) {
        ids_put(dev, ino, st);
        slot = ids_find(dev, ino);
        return slot->ino == ino && !slot->shared ? 0 : -1;
    }
    if (slot->shared)
        return -1;
    if (memcmp(slot->st, st, sizeof slot->st) != 0) {
        slot->shared = 1;
        fo_withdraw_file(dev, ino);
        return -1;
    }
    return 0;
}

static void ids_clear(void)
{
    withdraw_all();
    free(ids);
    ids = NULL;
    ids_cap = ids_len = 0;
}

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
        tstate_t *nt = calloc(ncap, sizeof(*nt));
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

/* ---------- paths ---------- */

static int has_prefix(const char *p, size_t n, const char *pre, size_t pn)
{
    return n >= pn && memcmp(p, pre, pn) == 0 && (n == pn || p[pn] == '/');
}

/* readlink of /proc/<tid>/<what>; returns length or -1 */
static ssize_t proc_link(pid_t tid, const char *what, char *out, size_t max)
{
    char lp[64];
    snprintf(lp, sizeof lp, "/proc/%d/%s", (int)tid, what);
    ssize_t n = readlink(lp, out, max - 1);
    if (n >= 0)
        out[n] = 0;
    return n;
}

/*
 * A path through one of the kernel's magic links to a directory -- /proc/self/cwd/x,
 * /proc/<pid>/fd/<n>/x, /dev/fd/<n>/x, /proc/thread-self/... -- that lands in the shadow tree:
 * the kernel would resolve the rest in the private mirror (empty placeholder files, writable
 * directories), so spell it out as the shadow path it stands for, which mount_key maps to the
 * mount.  Returns the length of the rewritten path in `out`, or 0 when `raw` is not such a
 * path (the kernel resolves it, as before).
 */
static long via_magic_link(pid_t tid, const char *raw, size_t n, char *out, size_t max,
                           int whole)
{
    char link[96], target[MAXPATH];
    const char *p;
    size_t ln;
    if (has_prefix(raw, n, "/dev/fd", 7) && raw[7] == '/') {
        p = raw + 8;
        ln = (size_t)snprintf(link, sizeof link, "/proc/%d/fd/", (int)tid);
    } else if (has_prefix(raw, n, "/proc", 5) && raw[5] == '/') {
        p = raw + 6;
        if (!strncmp(p, "self/", 5)) {
            p += 5;
            ln = (size_t)snprintf(link, sizeof link, "/proc/%d/", (int)tid);
        } else if (!strncmp(p, "thread-self/", 12)) {
            p += 12;
            ln = (size_t)snprintf(link, sizeof link, "/proc/%d/", (int)tid);
        } else {
            size_t d = strspn(p, "0123456789");
            if (!d || d > 10 || p[d] != '/')
                return 0;
            ln = (size_t)snprintf(link, sizeof link, "/proc/%.*s/", (int)d, p);
            p += d + 1;
            if (!strncmp(p, "task/", 5)) { /* /proc/<pid>/task/<tid>/... */
                size_t td = strspn(p + 5, "0123456789");
                if (!td || td > 10 || p[5 + td] != '/')
                    return 0;
                ln += (size_t)snprintf(link + ln, sizeof link - ln, "task/%.*s/", (int)td, p + 5);
                p += 5 + td + 1;
            }
        }
        if (!strncmp(p, "cwd", 3) && (p[3] == '/' || !p[3])) {
            memcpy(link + ln, "cwd", 4);
            p += 3;
        } else if (!strncmp(p, "root", 4) && (p[4] == '/' || !p[4])) {
            return 0; /* the root is never in the shadow tree */
        } else if (!strncmp(p, "fd/", 3)) {
            p += 3;
            ln += (size_t)snprintf(link + ln, sizeof link - ln, "fd/");
        } else {
            return 0;
        }
    } else {
        return 0;
    }
    if (link[strlen(link) - 1] == '/') { /* fd/<n> still to read */
        size_t d = strspn(p, "0123456789");
        if (!d || d > 10 || (p[d] != '/' && p[d]))
            return 0;
        snprintf(link + strlen(link), sizeof link - strlen(link), "%.*s", (int)d, p);
        p += d;
    }
    ssize_t tn = readlink(link, target, sizeof target - 1);
    if (tn <= 0 || !has_prefix(target, (size_t)tn, shadow_p, shadow_n))
        return 0;
    size_t rest = n - (size_t)(p - raw);
    if (!rest && !whole)
        return 0; /* the link itself (readlink, lstat): see magic_readlink */
    if ((size_t)tn + rest + 1 > max)
        return -ENAMETOOLONG;
    memcpy(out, target, (size_t)tn);
    memcpy(out + tn, p, rest + 1);
    return tn + (long)rest;
}

/* /proc/<tid>/status into buf (NUL-terminated); its length, or 0. */
static size_t proc_status(pid_t tid, char *buf, size_t max)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/status", (int)tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, max - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    return (size_t)n;
}

/* Collapse "//" and "/./" (keeps ".."); out must hold n+2. */
static size_t collapse(const char *in, size_t n, char *out)
{
    size_t o = 0, i = 0;
    int dir_after = 0; /* a '/' or "." after the last name: it must be a directory */
    while (i < n) {
        while (i < n && in[i] == '/')
            i++;
        size_t s = i;
        while (i < n && in[i] != '/')
            i++;
        size_t len = i - s;
        if (len == 1 && in[s] == '.')
            dir_after = 1;
        if (len == 0 || (len == 1 && in[s] == '.'))
            continue;
        out[o++] = '/';
        memcpy(out + o, in + s, len);
        o += len;
        dir_after = 0;
    }
    if (o == 0)
        out[o++] = '/';
    else if (dir_after || (n > 0 && in[n - 1] == '/'))
        out[o++] = '/'; /* "file/" and "file/." must still fail with ENOTDIR */
    out[o] = 0;
    return o;
}

/* Lexical ".." removal on a collapsed absolute path, in place. */
static size_t lexnorm(char *p, size_t n)
{
    size_t o = 0, i = 0;
    while (i < n) {
        i++; /* skip '/' */
        size_t s = i;
        while (i < n && p[i] != '/')
            i++;
        size_t len = i - s;
        if (len == 2 && p[s] == '.' && p[s + 1] == '.') {
            while (o > 0 && p[o - 1] != '/')
                o--;
            if (o > 0)
                o--;
            continue;
        }
        p[o++] = '/';
        memmove(p + o, p + s, len);
        o += len;
    }
    if (o == 0)
        p[o++] = '/';
    p[o] = 0;
    return o;
}

/*
 * Turn the path argument of a trapped call into the key under the mount, or decide that it
 * is not ours.  Returns key length (>0) with the key in `key`, 0 when the call is not ours,
 * or -errno.  `raw` receives the tracee's string.
 */
static ssize_t tracee_cwd(pid_t tid, tstate_t *t, char *out, size_t max)
{
    if (t && t->cwd && t->cwd_gen == cwd_gen && t->cwd_len < max) {
        memcpy(out, t->cwd, t->cwd_len + 1);
        return (ssize_t)t->cwd_len;
    }
    ssize_t n = proc_link(tid, "cwd", out, max);
    if (n >= 0 && t) {
        char *c = realloc(t->cwd, (size_t)n + 1);
        if (c) {
            memcpy(c, out, (size_t)n + 1);
            t->cwd = c;
            t->cwd_len = (size_t)n;
            t->cwd_gen = cwd_gen;
        }
    }
    return n;
}

/* The directory a relative path starts from: the tracee's cwd, or where its dirfd points. */
static ssize_t dirfd_path(pid_t tid, tstate_t *t, long dirfd, char *out, size_t max)
{
    if (dirfd == AT_FDCWD)
        return tracee_cwd(tid, t, out, max);
    char what[32];
    snprintf(what, sizeof what, "fd/%d", (int)dirfd);
    return proc_link(tid, what, out, max);
}

/* raw/n: the path argument as read_string returned it (n < 0: its error). */
static long mount_key(pid_t tid, tstate_t *t, long dirfd, const char *raw, long n, char *key,
                      int allow_empty)
{
    char base[MAXPATH], joined[2 * MAXPATH + 2];
    if (n < 0)
        return n;
    if (n == 0)
        return allow_empty ? 0 : -ENOENT;
    size_t jn;
    char magic[MAXPATH];
    if (raw[0] == '/' && (raw[1] == 'p' || raw[1] == 'd')) {
        long mn = via_magic_link(tid, raw, (size_t)n, magic, sizeof magic, 0);
        if (mn < 0)
            return mn;
        if (mn > 0) {
            raw = magic;
            n = mn;
        }
    }
    if (raw[0] == '/') {
        /* fast path: absolute and not under /cvmfs (or the shadow tree) */
        if (raw[1] != '/' && raw[1] != '.' && !has_prefix(raw, (size_t)n, mount_p, mount_n) &&
            !has_prefix(raw, (size_t)n, shadow_p, shadow_n) && !strstr(raw, "/.") &&
            !strstr(raw, "//"))
            return 0;
        memcpy(joined, raw, (size_t)n + 1);
        jn = (size_t)n;
    } else {
        ssize_t bn = dirfd_path(tid, t, dirfd, base, sizeof base);
        if (bn < 0 || base[0] != '/')
            return 0; /* let the kernel report EBADF / ENOTDIR */
        if (!has_prefix(base, (size_t)bn, shadow_p, shadow_n) && base[1] != 0 &&
            !strstr(raw, ".."))
            return 0; /* relative to a host directory other than "/" */
        memcpy(joined, base, (size_t)bn);
        joined[bn] = '/';
        memcpy(joined + bn + 1, raw, (size_t)n + 1);
        jn = (size_t)bn + 1 + (size_t)n;
    }
    char col[2 * MAXPATH + 4];
    size_t cn = collapse(joined, jn, col);
    if (has_prefix(col, cn, shadow_p, shadow_n)) {
        /* the shadow tree stands for the mount */
        size_t rest = cn - shadow_n;
        if (mount_n + rest >= MAXPATH)
            return -ENAMETOOLONG;
        memcpy(key, mount_p, mount_n);
        memcpy(key + mount_n, col + shadow_n, rest + 1);
        return (long)(mount_n + rest);
    }
    if (!has_prefix(col, cn, mount_p, mount_n)) {
        if (!strstr(col, "/.."))
            return 0;
        cn = lexnorm(col, cn);
        if (!has_prefix(col, cn, mount_p, mount_n) && !has_prefix(col, cn, shadow_p, shadow_n))
            return 0;
        if (has_prefix(col, cn, shadow_p, shadow_n)) {
            size_t rest = cn - shadow_n;
            memmove(col + mount_n, col + shadow_n, rest + 1);
            memcpy(col, mount_p, mount_n);
            cn = mount_n + rest;
        }
    }
    if (cn >= MAXPATH)
        return -ENAMETOOLONG;
    memcpy(key, col, cn + 1);
    return (long)cn;
}

/*
 * A host path that reaches the mount through a symlink: a CMSSW work area (full of links
 * into the release), ln -s /cvmfs/..., a site's /opt/exp_soft -> /cvmfs/....  The kernel
 * cannot follow it (there is no /cvmfs here), so when it would fail, resolve the path the way
 * the kernel does, component by component, and if it enters the mount hand back the /cvmfs
 * key.  Costs one stat for every host path (the kernel finds it: done), three for a path
 * missing from an existing host directory, a walk only when a symlink is involved.
 */
static long resolve_into_mount(const char *path, int follow, char *key)
{
    char done[MAXPATH], todo[2 * MAXPATH + 2], link[MAXPATH], next[2 * MAXPATH + 2];
    size_t dn = 0, tn = strlen(path);
    int links = 0;
    if (tn >= sizeof todo)
        return 0;
    memcpy(todo, path, tn + 1);
    done[0] = 0;
    char *c = todo;
    for (;;) {
        while (*c == '/')
            c++;
        if (!*c)
            return 0; /* resolved entirely on the host */
        char *end = strchr(c, '/');
        size_t cn = end ? (size_t)(end - c) : strlen(c);
        const char *rest = end ? end : "";
        int last = !end || !end[strspn(end, "/")];
        if (cn == 1 && c[0] == '.') {
            c += cn;
            continue;
        }
        if (cn == 2 && c[0] == '.' && c[1] == '.') {
            while (dn > 0 && done[dn - 1] != '/')
                dn--;
            if (dn > 0)
                dn--;
            done[dn] = 0;
            c += cn;
            continue;
        }
        if (dn + 1 + cn >= sizeof done)
            return 0;
        done[dn] = '/';
        memcpy(done + dn + 1, c, cn);
        size_t cand = dn + 1 + cn;
        done[cand] = 0;
        if (has_prefix(done, cand, mount_p, mount_n)) {
            int kn = snprintf(next, sizeof next, "%s%s", done, rest);
            if (kn <= 0 || (size_t)kn + 2 > MAXPATH)
                return 0;
            return (long)collapse(next, (size_t)kn, key); /* a trailing '/' stays: a dir */
        }
        struct stat st;
        if (lstat(done, &st) != 0)
            return 0; /* really missing */
        if (!S_ISLNK(st.st_mode) || (last && !follow)) {
            dn = cand;
            c += cn;
            continue;
        }
        if (++links > 40)
            return 0; /* ELOOP: the kernel says so */
        ssize_t ln = readlink(done, link, sizeof link - 1);
        if (ln <= 0)
            return 0;
        link[ln] = 0;
        done[dn] = 0; /* a relative target starts from the link's directory */
        if (link[0] == '/')
            dn = 0, done[0] = 0;
        int nn = snprintf(next, sizeof next, "%s%s", link, rest);
        if (nn <= 0 || (size_t)nn >= sizeof todo)
            return 0;
        memcpy(todo, next, (size_t)nn + 1);
        c = todo;
    }
}

static long via_host_symlink(pid_t tid, tstate_t *t, long dirfd, const char *raw, long n,
                             int follow, char *key)
{
    char base[MAXPATH], path[2 * MAXPATH + 2];
    if (n <= 0)
        return 0;
    if (raw[n - 1] == '/')
        follow = 1; /* "link/" names the directory the link points to, even for lstat */
    if (raw[0] == '/') {
        if (!strncmp(raw, "/proc/", 6) || !strncmp(raw, "/dev/", 5))
            return 0; /* names the caller's own process: not for us to resolve */
        memcpy(path, raw, (size_t)n + 1);
    } else {
        ssize_t bn = dirfd_path(tid, t, dirfd, base, sizeof base);
        if (bn <= 0 || base[0] != '/')
            return 0;
        memcpy(path, base, (size_t)bn);
        path[bn] = '/';
        memcpy(path + bn + 1, raw, (size_t)n + 1);
    }
    struct stat st;
    if ((follow ? stat(path, &st) : lstat(path, &st)) == 0 || errno != ENOENT)
        return 0; /* the kernel finds it (or fails for another reason) */
    if (!follow || lstat(path, &st) != 0) {
        /* missing: from an existing host directory (resolved on the host), it stays so */
        char *slash = strrchr(path, '/');
        if (!slash)
            return 0;
        while (slash > path && slash[-1] == '/')
            slash--;
        char keep = *slash;
        *slash = 0;
        int parent_ok = slash == path || stat(path, &st) == 0;
        *slash = keep;
        if (parent_ok)
            return 0;
    }
    return resolve_into_mount(path, follow, key);
}

/* getxattr/lgetxattr (value of the name asked for) or listxattr/llistxattr (the names) of
 * a /cvmfs entry with published extended attributes, from its CVMFS xattr blob (version 1,
 * count, then key length, value length, key, value): as the kernel answers, a size of 0
 * asks for the length, a smaller buffer is ERANGE, a name it does not have ENODATA. */
static long xattr_answer(pid_t tid, struct user_regs_struct *r, long nr, const action_t *a)
{
    const unsigned char *b = (const unsigned char *)a->bval;
    size_t n = a->blen;
    if (n < 2 || b[0] != 1)
        return -EIO;
    int list = nr == SYS_listxattr || nr == SYS_llistxattr;
    unsigned long buf = list ? r->rsi : r->rdx;
    unsigned long long size = list ? r->rdx : r->r10;
    char name[256], out[255 * 256];
    size_t outn = 0;
    if (!list) {
        long nn = read_string(tid, r->rsi, name, sizeof name);
        if (nn < 0)
            return nn == -ENAMETOOLONG ? -ERANGE : nn;
    }
    for (size_t i = 0, pos = 2; i < b[1]; i++) {
        if (pos + 2 > n || pos + 2 + b[pos] + b[pos + 1] > n)
            return -EIO;
        size_t kl = b[pos], vl = b[pos + 1];
        const unsigned char *k = b + pos + 2, *v = k + kl;
        pos += 2 + kl + vl;
        if (list) {
            memcpy(out + outn, k, kl);
            outn += kl;
            out[outn++] = 0;
        } else if (strlen(name) == kl && memcmp(name, k, kl) == 0) {
            memcpy(out, v, vl);
            outn = vl;
            goto found;
        }
    }
    if (!list)
        return -ENODATA;
found:
    if (size == 0)
        return (long)outn;
    if (size < outn)
        return -ERANGE;
    if (outn && write_mem(tid, buf, out, outn) < 0)
        return -EFAULT;
    return (long)outn;
}

/* ---------- upcall ---------- */

static int parse_action(PyObject *res, action_t *a, int *cacheable, PyObject **argv_prefix)
{
    /* (cacheable, kind, ival, bval, st_tuple|None, argv_prefix|None) */
    PyObject *bval, *st, *argv;
    int c, kind;
    long long ival;
    memset(a, 0, sizeof *a);
    if (!PyArg_ParseTuple(res, "piLOOO", &c, &kind, &ival, &bval, &st, &argv))
        return -1;
    a->kind = kind;
    a->ival = ival;
    *cacheable = c;
    if (bval != Py_None) {
        char *b;
        Py_ssize_t bl;
        if (PyBytes_AsStringAndSize(bval, &b, &bl) < 0)
            return -1;
        a->bval = malloc((size_t)bl + 1);
        if (!a->bval) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(a->bval, b, (size_t)bl);
        a->bval[bl] = 0;
        a->blen = (size_t)bl;
    }
    if (st != Py_None) {
        if (!PyTuple_Check(st) || PyTuple_GET_SIZE(st) != 15) {
            PyErr_SetString(PyExc_TypeError, "stat tuple must have 15 ints");
            return -1;
        }
        for (int i = 0; i < 15; i++) {
            a->st[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(st, i));
            if (a->st[i] == -1 && PyErr_Occurred())
                return -1;
        }
    }
    if (argv != Py_None) {
        Py_INCREF(argv);
        *argv_prefix = argv;
    }
    return 0;
}

/* Is `key` a name its listed parent directory does not have (see C_LISTED)? */
static int absent_from_listing(const char *key, size_t kn)
{
    const char *slash = memrchr(key, '/', kn);
    if (!slash || slash == key)
        return 0;
    size_t pn = (size_t)(slash - key), nn = kn - pn - 1;
    const char *name = slash + 1;
    if (nn == 0 || (name[0] == '.' && (nn == 1 || (nn == 2 && name[1] == '.'))))
        return 0;
    return !fo_lost && cache_get(C_LISTED, 0, key, pn, fnv(C_LISTED, 0, key, pn)) &&
           !cache_find(C_NAMED, 0, key, kn, fnv(C_NAMED, 0, key, kn));
}

/* The stat answer at hand for a path (C_STAT, `flags` 0 or F_NOFOLLOW), or NULL. */
static const action_t *known_stat(const char *key, size_t kn, int flags)
{
    entry_t *s = cache_find(C_STAT, flags, key, kn, fnv(C_STAT, flags, key, kn));
    return s && s->act.kind == A_STAT && s->act.st[0] ? &s->act : NULL;
}

/* Answers that follow from answers at hand, as Python would give them (worker/tracer.py):
 * access and readlink of a path whose stat is known, ENOTDIR below a known non-directory.
 * So a path answered ahead (a directory's entries, the node's answers) needs Python for
 * none of these.  1 if *out is set. */
static int derived(int cls, int flags, const char *key, size_t kn, action_t *out)
{
    memset(out, 0, sizeof *out);
    out->kind = A_RETURN;
    const char *slash = memrchr(key, '/', kn);
    if (slash && slash != key && cls != C_EXEC && cls < C_WRITE && !(flags & F_PROCEXE)) {
        const action_t *up = known_stat(key, (size_t)(slash - key), 0);
        if (up && !S_ISDIR((mode_t)up->st[0])) {
            out->ival = -ENOTDIR;
            return 1;
        }
    }
    if (cls == C_ACCESS && !(flags & ~(7 | F_NOFOLLOW))) {
        const action_t *st = known_stat(key, kn, flags & F_NOFOLLOW);
        if (!st)
            return 0;
        int want = flags & 7;
        mode_t mode = (mode_t)st->st[0];
        int ok;
        if (want & W_OK) {
            out->ival = -EROFS;
            return 1;
        }
        if ((want & X_OK) && !(mode & 0111) && !S_ISDIR(mode))
            ok = 0;
        else if (getuid() == 0)
            ok = !((want & X_OK) && !(mode & 0111));
        else {
            unsigned bits = (want & R_OK ? 4u : 0u) | (want & X_OK ? 1u : 0u);
            ok = ((mode >> 6) & bits) == bits;
        }
        out->ival = ok ? 0 : -EACCES;
        return 1;
    }
    if ((cls == C_XATTR_GET || cls == C_XATTR_LIST) && !(flags & ~F_NOFOLLOW) && slash &&
        slash != key) {
        const action_t *st = known_stat(key, kn, F_NOFOLLOW);
        size_t pn = (size_t)(slash - key);
        if (!st || (!(flags & F_NOFOLLOW) && S_ISLNK((mode_t)st->st[0])) ||
            !cache_get(C_NOXATTR, 0, key, pn, fnv(C_NOXATTR, 0, key, pn)))
            return 0;
        out->ival = cls == C_XATTR_GET ? -ENODATA : 0;
        return 1;
    }
    if (cls == C_READLINK && !flags) {
        const action_t *st = known_stat(key, kn, F_NOFOLLOW);
        if (!st || S_ISLNK((mode_t)st->st[0]))
            return 0;
        out->ival = -EINVAL;
        return 1;
    }
    return 0;
}

/* Returns a pointer to a cached or temporary action (tmp); *argv_prefix set for A_EXEC. */
static action_t *lookup(pid_t tid, int cls, int flags, const char *key, size_t kn, action_t *tmp,
                        PyObject **argv_prefix)
{
    uint64_t h = fnv(cls, flags, key, kn);
    entry_t *e = cache_find(cls, flags, key, kn, h);
    if (e) {
        n_hits++;
        return &e->act;
    }
    if (put_staged_ancestors(key, kn) || /* what the node knows of this part of the tree */
        (cls == C_OPEN && put_deferred_opens(key, kn))) {
        e = cache_find(cls, flags, key, kn, h);
        if (e) {
            n_hits++;
            return &e->act;
        }
    }
    int cacheable = 0;
    if (cls != C_EXEC && cls < C_WRITE && !(flags & F_PROCEXE) && absent_from_listing(key, kn)) {
        n_absent++;
        memset(tmp, 0, sizeof *tmp);
        tmp->kind = A_RETURN;
        tmp->ival = -ENOENT;
        cacheable = 1;
        goto answered;
    }
    if (derived(cls, flags, key, kn, tmp)) {
        n_absent++;
        cacheable = 1;
        goto answered;
    }
    if (cls == C_OPEN && !flags && dir_open_from_node(key, kn, tmp)) {
        n_node_dirs++;
        cacheable = 1;
        goto answered;
    }
    n_upcalls++;
    PyGILState_STATE gil = PyGILState_Ensure(); /* the notification thread has no GIL */
    PyObject *res = PyObject_CallFunction(handler, "iiiy#", (int)tid, cls, flags, key,
                                          (Py_ssize_t)kn);
    if (!res || parse_action(res, tmp, &cacheable, argv_prefix) < 0) {
        PyErr_WriteUnraisable(handler);
        Py_XDECREF(res);
        PyGILState_Release(gil);
        free(tmp->bval);
        memset(tmp, 0, sizeof *tmp);
        tmp->kind = A_RETURN;
        tmp->ival = -EIO;
        return tmp;
    }
    Py_DECREF(res);
    PyGILState_Release(gil);
answered:
    if (!cacheable || *argv_prefix || (flags & F_PROCEXE))
        return tmp;
    e = calloc(1, sizeof *e);
    char *k = malloc(kn + 1);
    if (!e || !k) {
        free(e);
        free(k);
        return tmp;
    }
    memcpy(k, key, kn + 1);
    e->hash = h;
    e->cls = cls;
    e->flags = flags;
    e->key = k;
    e->klen = kn;
    e->act = *tmp;
    tmp->bval = NULL;
    cache_del(cls, flags, key, kn); /* one the handler put meanwhile (trap_put): ours wins */
    cache_put(e);
    return &e->act;
}

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

/* A RAM file by name in a directory we hold an fd of (worker/ramfiles.py named_path):
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
    pthread_mutex_lock(&big);
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

/* ---------- applying answers ---------- */

static void skip_with(struct user_regs_struct *r, long long ret)
{
    r->orig_rax = (unsigned long long)-1;
    r->rax = (unsigned long long)ret;
}

static void fill_stat(const int64_t *f, struct stat *s)
{
    memset(s, 0, sizeof *s);
    s->st_mode = (mode_t)f[0];
    s->st_ino = (ino_t)f[1];
    s->st_nlink = (nlink_t)f[2];
    s->st_uid = (uid_t)f[3];
    s->st_gid = (gid_t)f[4];
    s->st_size = (off_t)f[5];
    s->st_blocks = (blkcnt_t)f[6];
    s->st_rdev = (dev_t)f[7];
    s->st_dev = (dev_t)f[8];
    s->st_blksize = 4096;
    s->st_atim.tv_sec = f[9];
    s->st_atim.tv_nsec = f[10];
    s->st_mtim.tv_sec = f[11];
    s->st_mtim.tv_nsec = f[12];
    s->st_ctim.tv_sec = f[13];
    s->st_ctim.tv_nsec = f[14];
}

static entry_t *fo_backed(int cls, int flags, const char *key, size_t kn, uint64_t h)
{
    unsigned kind;
    if (cls == C_STAT && (flags == 0 || flags == F_NOFOLLOW))
        kind = flags ? FO_LSTAT : FO_STAT;
    else if (cls == C_NAMED && !flags)
        kind = FO_NAMED;
    else
        return NULL;
    const char *d;
    size_t dl;
    int err, is_path;
    if (!fo_find(kind, key, kn, &d, &dl, &err, &is_path))
        return NULL;
    action_t a;
    memset(&a, 0, sizeof a);
    a.kind = A_RETURN; /* a listed name */
    if (kind != FO_NAMED) {
        struct stat st;
        if (is_path || dl != sizeof st)
            return NULL; /* (a directory's mirror, or an error: those are the tracer's own) */
        memcpy(&st, d, sizeof st);
        int64_t f[15] = {st.st_mode, (int64_t)st.st_ino, (int64_t)st.st_nlink, st.st_uid,
                         st.st_gid, st.st_size, st.st_blocks, (int64_t)st.st_rdev,
                         (int64_t)st.st_dev, st.st_atim.tv_sec, st.st_atim.tv_nsec,
                         st.st_mtim.tv_sec, st.st_mtim.tv_nsec, st.st_ctim.tv_sec,
                         st.st_ctim.tv_nsec};
        memcpy(a.st, f, sizeof f);
        a.kind = A_STAT;
    }
    entry_t *e = pool_alloc(sizeof *e + kn + 1);
    if (!e)
        return NULL;
    char *k = (char *)(e + 1);
    memcpy(k, key, kn);
    k[kn] = 0;
    e->hash = h;
    e->cls = cls;
    e->flags = flags;
    e->key = k;
    e->klen = kn;
    e->act = a;
    e->pooled = 1;
    cache_put(e);
    return e;
}

static void fill_statx(const int64_t *f, struct statx *x)
{
    memset(x, 0, sizeof *x);
    x->stx_mask = STATX_BASIC_STATS;
    x->stx_blksize = 4096;
    x->stx_nlink = (uint32_t)f[2];
    x->stx_uid = (uint32_t)f[3];
    x->stx_gid = (uint32_t)f[4];
    x->stx_mode = (uint16_t)f[0];
    x->stx_ino = (uint64_t)f[1];
    x->stx_size = (uint64_t)f[5];
    x->stx_blocks = (uint64_t)f[6];
    x->stx_rdev_major = major((dev_t)f[7]);
    x->stx_rdev_minor = minor((dev_t)f[7]);
    x->stx_dev_major = major((dev_t)f[8]);
    x->stx_dev_minor = minor((dev_t)f[8]);
    x->stx_atime.tv_sec = f[9];
    x->stx_atime.tv_nsec = (uint32_t)f[10];
    x->stx_mtime.tv_sec = f[11];
    x->stx_mtime.tv_nsec = (uint32_t)f[12];
    x->stx_ctime.tv_sec = f[13];
    x->stx_ctime.tv_nsec = (uint32_t)f[14];
}

/* Write `s` below the red zone and point argument `arg` at it; remember to restore. */
/* An open served from a RAM file: remember what fstat of the tracee's fd must say. */
static void note_open(action_t *a)
{
    if (!a->ram_ino) {
        struct stat s;
        /* one of our RAM files, or a host file a policy serves a /cvmfs file from (the
         * host-directory policy): fstat of it must say what stat of the /cvmfs path says */
        if (stat(a->bval, &s) != 0 || !(S_ISREG(s.st_mode) || S_ISDIR(s.st_mode)))
            return; /* a directory: its mirror, whose fstat must say the catalog's stat */
        a->ram_dev = (uint64_t)s.st_dev;
        a->ram_ino = (uint64_t)s.st_ino;
    }
    ids_put(a->ram_dev, a->ram_ino, a->st);
}

/* Is the path argument at addr "" (fstatat/statx of the fd itself)?  statx accepts NULL. */
static int empty_path(pid_t tid, unsigned long addr, int null_ok)
{
    char c;
    if (!addr)
        return null_ok;
    struct iovec l = {&c, 1}, rv = {(void *)addr, 1};
    return process_vm_readv(tid, &l, 1, &rv, 1, 0) == 1 && c == 0;
}

/* stat of a path that names a file we handed out (/proc/<pid>/fd/N): the /cvmfs path's stat
 * (note_open), else let the kernel answer.  buf: the tracee's struct stat (statx for 332). */
static int ram_file_stat(pid_t tid, struct user_regs_struct *r, long nr, const char *p,
                      unsigned long buf)
{
    struct stat s;
    fdid_t *id = NULL;
    if (ids_len) {
        if (stat(p, &s) == 0 && (S_ISREG(s.st_mode) || S_ISDIR(s.st_mode))) {
            id = ids_find((uint64_t)s.st_dev, (uint64_t)s.st_ino);
            /* a RAM file has its object's size; a mirror directory the catalog's mode */
            if (!id || id->ino != (uint64_t)s.st_ino ||
                (S_ISREG(s.st_mode) ? id->st[5] != (int64_t)s.st_size
                                    : !S_ISDIR((mode_t)id->st[0])))
                id = NULL;
        }
    }
    if (!id) {
        n_pass++;
        return 0;
    }
    int rc;
    if (nr == 332) {
        struct statx x;
        fill_statx(id->st, &x);
        rc = write_mem(tid, buf, &x, sizeof x);
    } else {
        struct stat o;
        fill_stat(id->st, &o);
        rc = write_mem(tid, buf, &o, sizeof o);
    }
    n_hits++;
    skip_with(r, rc);
    if (cur_notif.active && !id->shared && (nr == SYS_fstat || nr == SYS_newfstatat))
        fo_patch(tid, nr, cur_notif.ip); /* later ones in-process (worker/_fastopen.c) */
    return 1;
}

/* fstat of a tracee fd */
static int fd_stat(pid_t tid, struct user_regs_struct *r, long nr, long fd, unsigned long buf)
{
    char p[48];
    if (fd < 0 || !ids_len) {
        n_pass++;
        return 0;
    }
    snprintf(p, sizeof p, "/proc/%d/fd/%d", (int)tid, (int)fd);
    return ram_file_stat(tid, r, nr, p, buf);
}

static int redirect_arg(pid_t tid, struct user_regs_struct *r, int arg, const char *s, size_t n,
                        tstate_t *t)
{
    unsigned long addr = (r->rsp - 128 - (n + 1)) & ~15UL;
    if (write_mem(tid, addr, s, n + 1) < 0)
        return -EFAULT;
    unsigned long long *reg = argreg(r, arg);
    t->off[t->nrestore] = argoff(arg);
    t->val[t->nrestore] = *reg;
    t->nrestore++;
    *reg = addr;
    return 0;
}

/* An open answered with a RAM file (/proc/<pid>/fd/<n>, a "magic link") must not carry
 * O_NOFOLLOW (tar, find -exec, openat2 users pass it): the /cvmfs path was already resolved
 * without following its last component, so drop the flag (and openat2's RESOLVE_* limits,
 * which would refuse the /proc link) for the redirected call only.  Called right after
 * redirect_arg, which used one restore slot. */
static int allow_magic_link(pid_t tid, struct user_regs_struct *r, long nr, tstate_t *t,
                            int keep_nofollow)
{
    if (nr != 437) {
        unsigned long long *reg = nr == SYS_open ? &r->rsi : &r->rdx;
        t->off[t->nrestore] = nr == SYS_open ? argoff(1) : argoff(2);
        t->val[t->nrestore] = *reg;
        t->nrestore++;
        *reg &= ~(unsigned long long)O_NOFOLLOW;
        return 0;
    }
    unsigned long long how[8] = {0}; /* struct open_how: flags, mode, resolve (+ future) */
    size_t size = (size_t)r->r10;
    if (size < 24 || size > sizeof how)
        return -EINVAL;
    struct iovec l = {how, size}, rv = {(void *)r->rdx, size};
    if (process_vm_readv(tid, &l, 1, &rv, 1, 0) != (ssize_t)size)
        return -EFAULT;
    if (!keep_nofollow)
        how[0] &= ~(unsigned long long)O_NOFOLLOW;
    how[2] = 0;
    unsigned long addr = (unsigned long)(t->nrestore ? r->rsi : r->rsp - 128);
    addr = (addr - size) & ~15UL; /* below the path string redirect_arg wrote */
    if (write_mem(tid, addr, how, size) < 0)
        return -EFAULT;
    t->off[t->nrestore] = argoff(2);
    t->val[t->nrestore] = r->rdx;
    t->nrestore++;
    r->rdx = addr;
    return 0;
}

/* ---------- exec of a #! script: the rewritten call's own memory ---------- */

/*
 * exec of a script whose interpreter is under the mount becomes an exec of the interpreter
 * (the kernel cannot open /cvmfs paths): filename -> the interpreter's file, argv -> prefix
 * (interpreter, its argument, the script's /cvmfs path) + the caller's argv[1:].  The new
 * filename and pointer array must live in the caller's address space, and there is no room
 * of the caller's we may take: below the stack pointer is the caller's stack (a vfork child
 * runs on its parent's stack, a Go child on a goroutine's few KiB, a thread on a stack that
 * does not grow), and a 100,000-argument pointer array needs 800 KB.  So the exec gets a
 * private anonymous mapping of its own, made by an mmap the tracee runs in place of the
 * trapped execve (exec_scratch); the exec is then made again from the mapping, which goes
 * with the old image when the exec succeeds, and is unmapped by the tracee when it fails.
 * A vfork child's old image is its parent's: the parent unmaps it at PTRACE_EVENT_VFORK_DONE.
 */

/* execve refuses (E2BIG) when the argv and envp pointers alone reach its limit for strings,
 * which is at most 3/4 of _STK_LIM (6 MiB) whatever RLIMIT_STACK says: a caller's argv is
 * read up to this many pointers and no further. */
#define EXEC_MAX_PTRS ((6UL << 20) / sizeof(unsigned long))
/* The last 16 bytes of every scratch mapping: the run's cookie and the mapping's address, so
 * that nothing but a mapping of ours is ever unmapped (see scratch_is_ours). */
#define SCRATCH_TAIL 16
static uint64_t scratch_cookie;

/* The image of a rewritten exec (ptrace loop only, under big): the new argv pointer array
 * (its first nfix entries are offsets into the image, the rest the caller's own pointers),
 * the new filename, the prefix strings; the mapping is map_len bytes, the tail at its end. */
static struct {
    unsigned char *img;
    size_t cap, used, map_len, nfix, fname_off;
    int path_arg, argv_arg;
} pend;

/* The caller's argv pointers up to and including its NULL, read a page-sized run at a time
 * (a 100,000-argument exec is 200 reads, not 100,000).  A NULL argv is an empty one, as
 * execve takes it. */
static long read_argv(pid_t tid, unsigned long at, unsigned long **out, size_t *n)
{
    size_t cap = 512, got = 0;
    unsigned long *v = malloc(cap * sizeof *v);
    if (!v)
        return -ENOMEM;
    if (!at) {
        v[0] = 0;
        *out = v;
        *n = 1;
        return 0;
    }
    for (;;) {
        if (got == EXEC_MAX_PTRS) {
            free(v);
            return -E2BIG;
        }
        if (got == cap) {
            size_t ncap = cap * 4 < EXEC_MAX_PTRS ? cap * 4 : EXEC_MAX_PTRS;
            unsigned long *nv = realloc(v, ncap * sizeof *nv);
            if (!nv) {
                free(v);
                return -ENOMEM;
            }
            v = nv;
            cap = ncap;
        }
        unsigned long addr = at + got * sizeof *v;
        size_t want = 4096 - (addr & 4095); /* to the end of the page, or 2 if one straddles */
        if (want < sizeof *v)
            want += 4096;
        want /= sizeof *v;
        if (want > cap - got)
            want = cap - got;
        struct iovec l = {v + got, want * sizeof *v}, rv = {(void *)addr, want * sizeof *v};
        ssize_t r = process_vm_readv(tid, &l, 1, &rv, 1, 0);
        if (r < (ssize_t)sizeof *v) {
            free(v);
            return -EFAULT;
        }
        for (size_t i = 0, k = (size_t)r / sizeof *v; i < k; i++) {
            if (!v[got++]) {
                *out = v;
                *n = got;
                return 0;
            }
        }
    }
}

/* Build pend for exec of a.bval with argv prefix + the caller's argv[1:]. */
static int exec_prepare(pid_t tid, struct user_regs_struct *r, int path_arg, int argv_arg,
                        const action_t *a, PyObject *prefix)
{
    Py_ssize_t np = PyList_Size(prefix);
    if (np < 0 || np > 64) {
        PyErr_Clear();
        return -EIO;
    }
    size_t strs = a->blen + 1;
    for (Py_ssize_t i = 0; i < np; i++) {
        PyObject *o = PyList_GET_ITEM(prefix, i);
        if (!PyBytes_Check(o))
            return -EIO;
        strs += (size_t)PyBytes_GET_SIZE(o) + 1;
    }
    unsigned long *old;
    size_t nold;
    long rc = read_argv(tid, *argreg(r, argv_arg), &old, &nold);
    if (rc < 0)
        return (int)rc;
    size_t nnew = (size_t)np + (nold > 1 ? nold - 1 : 1); /* prefix, argv[1:], NULL */
    if (nnew > EXEC_MAX_PTRS) {
        free(old);
        return -E2BIG;
    }
    size_t used = nnew * sizeof *old + strs;
    size_t map_len = (used + SCRATCH_TAIL + 4095) & ~(size_t)4095;
    if (pend.cap < used) {
        unsigned char *img = realloc(pend.img, used);
        if (!img) {
            free(old);
            return -ENOMEM;
        }
        pend.img = img;
        pend.cap = used;
    }
    unsigned long *ptrs = (unsigned long *)pend.img;
    size_t off = nnew * sizeof *old;
    pend.fname_off = off;
    memcpy(pend.img + off, a->bval, a->blen + 1);
    off += a->blen + 1;
    for (Py_ssize_t i = 0; i < np; i++) {
        PyObject *o = PyList_GET_ITEM(prefix, i);
        size_t sl = (size_t)PyBytes_GET_SIZE(o);
        ptrs[i] = off; /* made an address once the mapping's is known */
        memcpy(pend.img + off, PyBytes_AS_STRING(o), sl + 1);
        off += sl + 1;
    }
    if (nold > 1)
        memcpy(ptrs + np, old + 1, (nold - 1) * sizeof *old);
    else
        ptrs[np] = 0;
    free(old);
    pend.used = used;
    pend.map_len = map_len;
    pend.nfix = (size_t)np;
    pend.path_arg = path_arg;
    pend.argv_arg = argv_arg;
    return 0;
}

/*
 * Handle one seccomp stop.  Returns 1 if the registers were changed (SETREGS needed),
 * 0 to continue untouched, EXEC_SCRATCH when pend holds a rewritten exec for exec_scratch.
 * t->nrestore > 0 means "stop at syscall exit".
 */
#define EXEC_SCRATCH 2
/* Does this write call follow a symlink in the last component of its path? */
static int follows_last(long nr, const struct user_regs_struct *r)
{
    switch (nr) {
    case SYS_open: return !(r->rsi & O_NOFOLLOW);
    case SYS_openat: return !(r->rdx & O_NOFOLLOW);
    case SYS_creat: case SYS_truncate: case SYS_chmod: case SYS_chown: case SYS_utime:
    case SYS_utimes: case SYS_setxattr: case SYS_removexattr:
        return 1;
    default:
        return 0; /* creates, removes, renames name the link itself */
    }
}

/* "/proc/<pid>/fd/<n>/<name>": a RAM file by name (worker/ramfiles.py named_path), ours
 * or a node cache service's; names are never reused while the file exists. */
static int named_ram_file(const char *p)
{
    if (strncmp(p, "/proc/", 6) != 0)
        return 0;
    p += 6;
    for (int part = 0; part < 2; part++) {
        if (*p < '0' || *p > '9')
            return 0;
        while (*p >= '0' && *p <= '9')
            p++;
        if (part == 0 && strncmp(p, "/fd/", 4) != 0)
            return 0;
        p += part == 0 ? 4 : 0;
    }
    return *p == '/' && p[1] && !strchr(p + 1, '/');
}

/* A cached open answer naming a node cache service's object that is gone: Python put it
 * ahead (trap_put) without pinning the object, and the service has evicted it since (names
 * are never reused, so a missing name is always this).  Drop it, here and in-process; the
 * caller's open is then asked of Python, which fetches the object again. */
static void stale_open(int cls, int flags, const char *key, size_t kn)
{
    cache_del(cls, flags, key, kn);
    fo_withdraw(FO_OPEN, key, kn);
}

/* A notified open of `key` (the caller's own path, in normal form) was answered by a
 * cached redirect: let tracees open the target themselves from now on (worker/_fastopen.c),
 * and patch the call site.  Not for RAM files opened under other paths with other answers
 * (fstat follows the last open: see note_open), memfds by number (numbers are reused), or
 * host targets. */
static void offer_open(pid_t tid, long nr, const action_t *a, const char *key, size_t kn)
{
    uint64_t dev = 0, ino = 0;
    if (strncmp(a->bval, own_fd_prefix, own_fd_prefix_n) == 0) {
        const char *leaf;
        fdid_t *f = a->ram_ino ? ids_find(a->ram_dev, a->ram_ino) : NULL;
        if (own_dir_name(a->bval, &leaf) < 0 || !f || f->ino != a->ram_ino || f->shared)
            return;
        dev = a->ram_dev;
        ino = a->ram_ino;
    } else if (named_ram_file(a->bval)) {
        /* a node cache service's object (tmpfs: inode numbers are not reused while the
         * file system lives); withdrawn when it turns out to serve paths with different
         * stat answers */
        fdid_t *f = a->ram_ino ? ids_find(a->ram_dev, a->ram_ino) : NULL;
        if (!f || f->ino != a->ram_ino || f->shared)
            return;
        dev = a->ram_dev;
        ino = a->ram_ino;
    } else if (!has_prefix(a->bval, a->blen, target_p, target_n)) {
        return;
    } else if (a->ram_ino) { /* a directory's mirror, noted by note_open: fstat says its stat */
        fdid_t *f = ids_find(a->ram_dev, a->ram_ino);
        if (f && f->ino == a->ram_ino && !f->shared) {
            dev = a->ram_dev;
            ino = a->ram_ino;
        }
    }
    if (!fo_publish(FO_OPEN, key, kn, a->bval, a->blen + 1, 1, 0, dev, ino))
        return;
    if (ino) { /* and fstat of an fd on it: the path's answer (see note_open) */
        uint64_t id[2] = {dev, ino};
        struct stat st;
        fill_stat(a->st, &st);
        fo_publish(FO_IDENT, (const char *)id, sizeof id, &st, sizeof st, 0, 0, dev, ino);
    }
    fo_patch(tid, nr, cur_notif.ip);
}

/* The same for other answers from the cache: stat, lstat, newfstatat and statx (a struct
 * stat or statx, ENOENT, ENOTDIR; or the shadow directory to ask), access and its kin (the
 * result, or the shadow directory), readlink (the target, or the error), and a read-only open
 * of a path that does not exist (Python tries __pycache__/x.pyc before every x.py). */
static void offer_answer(pid_t tid, long nr, int cls, int flags, const action_t *a,
                         const char *key, size_t kn)
{
    int shadow = a->kind == A_REDIRECT && has_prefix(a->bval, a->blen, target_p, target_n);
    int missing = a->kind == A_RETURN && (a->ival == -ENOENT || a->ival == -ENOTDIR);
    union {
        struct stat st;
        char link[MAXPATH];
    } buf;
    size_t dlen = 0;
    unsigned kind;
    if (cls == C_OPEN && flags == 0) { /* found: offer_open */
        kind = FO_OPEN;
        shadow = 0;
    } else if (cls == C_ACCESS && (nr == SYS_access || nr == SYS_faccessat || nr == 439)) {
        kind = FO_ACCESS + (unsigned)(flags & 7) + (flags & F_NOFOLLOW ? 8 : 0);
        missing = a->kind == A_RETURN && a->ival <= 0 && a->ival >= -4095; /* any result */
    } else if (cls == C_READLINK && (nr == SYS_readlink || nr == SYS_readlinkat)) {
        kind = FO_READLINK;
        missing = a->kind == A_RETURN && a->ival < 0 && a->ival >= -4095; /* EINVAL too */
        shadow = 0;
        if (a->kind == A_READLINK && a->blen && a->blen <= sizeof buf) {
            memcpy(&buf, a->bval, a->blen);
            dlen = a->blen;
        }
    } else if ((cls == C_XATTR_GET && (nr == SYS_getxattr || nr == SYS_lgetxattr)) ||
               (cls == C_XATTR_LIST && (nr == SYS_listxattr || nr == SYS_llistxattr))) {
        kind = (cls == C_XATTR_GET ? FO_XATTR : FO_XATTR_LIST) + (flags & F_NOFOLLOW ? 1 : 0);
        /* no attribute: any errno, or an empty list (0); never a list to copy */
        missing = a->kind == A_RETURN && a->ival <= 0 && a->ival >= -4095 &&
                  (cls == C_XATTR_GET ? a->ival < 0 : a->ival == 0);
        shadow = 0;
    } else if (cls == C_STAT && (nr == 332 || nr == SYS_newfstatat || nr == SYS_stat ||
                                  nr == SYS_lstat)) { /* statx too: the handler converts */
        kind = flags & F_NOFOLLOW ? FO_LSTAT : FO_STAT;
        if (a->kind == A_STAT) {
            fill_stat(a->st, &buf.st);
            dlen = sizeof buf.st;
        }
    } else {
        return;
    }
    int ok = dlen      ? fo_publish(kind, key, kn, &buf, dlen, 0, 0, 0, 0)
             : missing ? fo_publish(kind, key, kn, NULL, 0, 0, (int)-a->ival, 0, 0)
             : shadow  ? fo_publish(kind, key, kn, a->bval, a->blen + 1, 1, 0, 0, 0)
                       : 0;
    if (ok)
        fo_patch(tid, nr, cur_notif.ip);
}

/* readlink of /proc/<pid>/cwd or /proc/<pid>/fd/N (/dev/fd/N ...) standing in the shadow
 * tree: the /cvmfs path it stands for, as getcwd says (the kernel would name the shadow). */
static int magic_readlink(pid_t tid, struct user_regs_struct *r, long nr, const char *raw,
                          size_t n)
{
    char target[MAXPATH], out[MAXPATH];
    if (raw[0] != '/' || (raw[1] != 'p' && raw[1] != 'd'))
        return 0;
    long tn = via_magic_link(tid, raw, n, target, sizeof target, 1);
    if (tn <= 0 || !has_prefix(target, (size_t)tn, shadow_p, shadow_n))
        return 0;
    size_t on = mount_n + (size_t)tn - shadow_n;
    if (on >= sizeof out)
        return 0;
    memcpy(out, mount_p, mount_n);
    memcpy(out + mount_n, target + shadow_n, (size_t)tn - shadow_n + 1);
    unsigned long buf = nr == SYS_readlink ? r->rsi : r->rdx;
    long long sz = (long long)(nr == SYS_readlink ? r->rdx : r->r10);
    if (sz <= 0) {
        skip_with(r, -EINVAL);
        return 1;
    }
    size_t w = on < (size_t)sz ? on : (size_t)sz;
    skip_with(r, write_mem(tid, buf, out, w) < 0 ? -EFAULT : (long long)w);
    return 1;
}

/* Is a tracee fd a directory of the shadow tree or one of our RAM files (both stand for
 * read-only /cvmfs entries)? */
static int fd_is_ours(pid_t tid, long fd)
{
    char what[32], target[MAXPATH];
    snprintf(what, sizeof what, "fd/%d", (int)fd);
    ssize_t n = proc_link(tid, what, target, sizeof target);
    if (n > 0 && has_prefix(target, (size_t)n, shadow_p, shadow_n))
        return 1;
    struct stat st;
    char lp[64];
    snprintf(lp, sizeof lp, "/proc/%d/fd/%d", (int)tid, (int)fd);
    if (!ids_len || stat(lp, &st) != 0)
        return 0;
    fdid_t *id = ids_find((uint64_t)st.st_dev, (uint64_t)st.st_ino);
    return id && id->ino != 0;
}

static int handle_syscall(pid_t tid, struct user_regs_struct *r, tstate_t *t)
{
    long nr = (long)r->orig_rax;
    int cls = C_NONE, flags = 0, path_arg = 0, allow_empty = 0;
    long dirfd = AT_FDCWD;
    char key[MAXPATH];
    if (nr >= 0 && nr < NSYS)
        n_trapped[nr]++;
    switch (nr) {
    case SYS_open:
    case SYS_openat:
    case 437: {
        unsigned long long fl;
        if (nr == SYS_open) {
            path_arg = 0;
            fl = r->rsi;
        } else {
            dirfd = (long)(int)r->rdi;
            path_arg = 1;
            fl = r->rdx;
            if (nr == 437) {
                struct iovec l = {&fl, sizeof fl}, rv = {(void *)r->rdx, sizeof fl};
                if (process_vm_readv(tid, &l, 1, &rv, 1, 0) != sizeof fl)
                    return 0;
            }
        }
        cls = C_OPEN;
        if ((fl & (O_CREAT | O_TRUNC)) || (fl & O_TMPFILE) == O_TMPFILE)
            cls = C_WRITE;
        else if (fl & (O_WRONLY | O_RDWR))
            flags |= F_WRITE; /* Python answers: EROFS, or a FIFO's other end */
        if (fl & O_NOFOLLOW)
            flags |= F_NOFOLLOW;
        if (fl & O_PATH)
            flags |= F_OPATH;
        break;
    }
    case SYS_creat: cls = C_WRITE; break;
    case SYS_stat: cls = C_STAT; break;
    case SYS_lstat: cls = C_STAT; flags = F_NOFOLLOW; break;
    case SYS_fstat:
        return fd_stat(tid, r, nr, (long)(int)r->rdi, r->rsi);
    case SYS_newfstatat:
        cls = C_STAT; dirfd = (long)(int)r->rdi; path_arg = 1; allow_empty = 1;
        if (r->r10 & AT_SYMLINK_NOFOLLOW) flags = F_NOFOLLOW;
        if ((r->r10 & AT_EMPTY_PATH) && dirfd >= 0 && empty_path(tid, r->rsi, 0))
            return fd_stat(tid, r, nr, dirfd, r->rdx);
        break;
    case 332:
        cls = C_STAT; dirfd = (long)(int)r->rdi; path_arg = 1; allow_empty = 1;
        if (r->rdx & AT_SYMLINK_NOFOLLOW) flags = F_NOFOLLOW;
        if ((r->rdx & AT_EMPTY_PATH) && dirfd >= 0 && empty_path(tid, r->rsi, 1))
            return fd_stat(tid, r, nr, dirfd, r->r8);
        break;
    case SYS_access: cls = C_ACCESS; flags = (int)(r->rsi & 7); break;
    case SYS_faccessat:
    case 439:
        cls = C_ACCESS; dirfd = (long)(int)r->rdi; path_arg = 1; flags = (int)(r->rdx & 7);
        if (nr == 439 && (r->r10 & AT_SYMLINK_NOFOLLOW)) flags |= F_NOFOLLOW;
        if (nr == 439) allow_empty = (r->r10 & AT_EMPTY_PATH) != 0;
        break;
    case SYS_readlink: cls = C_READLINK; break;
    case SYS_readlinkat: cls = C_READLINK; dirfd = (long)(int)r->rdi; path_arg = 1; allow_empty = 1; break;
    case SYS_execve: cls = C_EXEC; break;
    case SYS_execveat:
        cls = C_EXEC; dirfd = (long)(int)r->rdi; path_arg = 1;
        allow_empty = (r->r8 & AT_EMPTY_PATH) != 0;
        break;
    case SYS_chdir:
        cls = C_CHDIR;
        cwd_gen++;
        t->cwd_changes = 1;
        break;
    case SYS_fchdir:
        cwd_gen++;
        t->cwd_changes = 1;
        return 0;
    case SYS_getcwd: cls = C_GETCWD; break;
    case SYS_statfs: cls = C_STATFS; break;
    case SYS_getxattr: cls = C_XATTR_GET; break;
    case SYS_lgetxattr: cls = C_XATTR_GET; flags = F_NOFOLLOW; break;
    case SYS_listxattr: cls = C_XATTR_LIST; break;
    case SYS_llistxattr: cls = C_XATTR_LIST; flags = F_NOFOLLOW; break;
    case 464:
    case 465:
        cls = nr == 464 ? C_XATTR_GET : C_XATTR_LIST; dirfd = (long)(int)r->rdi; path_arg = 1;
        allow_empty = 1;
        if (r->rdx & AT_SYMLINK_NOFOLLOW) flags = F_NOFOLLOW;
        break;
    default: cls = C_WRITE; break;
    }

    if (cls == C_GETCWD) {
        char cwd[MAXPATH], out[MAXPATH];
        if (cur_notif.active)
            fo_patch(tid, nr, cur_notif.ip); /* later calls there in-process (do_getcwd) */
        ssize_t n = tracee_cwd(tid, t, cwd, sizeof cwd);
        if (n < 0 || !has_prefix(cwd, (size_t)n, shadow_p, shadow_n)) {
            n_pass++;
            return 0;
        }
        size_t on = mount_n + ((size_t)n - shadow_n);
        if (on >= sizeof out)
            return 0;
        memcpy(out, mount_p, mount_n);
        memcpy(out + mount_n, cwd + shadow_n, (size_t)n - shadow_n + 1);
        if (on + 1 > r->rsi)
            skip_with(r, -ERANGE);
        else if (write_mem(tid, r->rdi, out, on + 1) < 0)
            skip_with(r, -EFAULT);
        else
            skip_with(r, (long long)on + 1);
        return 1;
    }

    if (cls == C_WRITE) {
        /* every path argument of the call; any one under the mount -> EROFS */
        int pa[2] = {-1, -1}, da[2] = {-1, -1};
        switch (nr) {
        case SYS_open: case SYS_creat: case SYS_truncate: case SYS_mkdir: case SYS_rmdir:
        case SYS_unlink: case SYS_chmod: case SYS_chown: case SYS_lchown: case SYS_utime:
        case SYS_utimes: case SYS_mknod: case SYS_setxattr: case SYS_lsetxattr:
        case SYS_removexattr: case SYS_lremovexattr:
            pa[0] = 0; break;
        case SYS_rename: case SYS_link: pa[0] = 0; pa[1] = 1; break;
        case SYS_fchmod: case SYS_fchown: case SYS_fsetxattr: case SYS_fremovexattr:
            da[0] = 0; break; /* the fd itself */
        case SYS_symlink: pa[0] = 1; break;
        case SYS_symlinkat: da[0] = 1; pa[0] = 2; break;
        case SYS_renameat: case 316: case SYS_linkat:
            da[0] = 0; pa[0] = 1; da[1] = 2; pa[1] = 3; break;
        default: da[0] = 0; pa[0] = 1; break; /* *at(dirfd, path, ...) */
        }
        for (int i = 0; i < 2; i++) {
            long d = da[i] >= 0 ? (long)(int)*argreg(r, da[i]) : AT_FDCWD;
            unsigned long addr = pa[i] >= 0 ? *argreg(r, pa[i]) : 0;
            char raw[MAXPATH];
            long n = addr ? read_string(tid, addr, raw, sizeof raw) : 0;
            if (da[i] >= 0 && d >= 0 && (!addr || n == 0)) {
                /* the fd itself: fchmod, fchown, f*xattr, utimensat(fd, NULL),
                 * fchmodat2/fchownat(fd, "", AT_EMPTY_PATH) */
                if (fd_is_ours(tid, d)) {
                    skip_with(r, -EROFS);
                    return 1;
                }
                continue;
            }
            if (pa[i] < 0 || !addr)
                continue;
            long kn = mount_key(tid, t, d, raw, n, key, 1);
            if (kn == 0) /* through a host symlink: does the last component follow? */
                kn = via_host_symlink(tid, t, d, raw, n, follows_last(nr, r), key);
            if (kn > 0) {
                skip_with(r, -EROFS);
                return 1;
            }
        }
        n_pass++;
        return 0;
    }

    char raw[MAXPATH];
    long n = read_string(tid, *argreg(r, path_arg), raw, sizeof raw);
    if (cls == C_READLINK && n > 0 && magic_readlink(tid, r, nr, raw, (size_t)n))
        return 1;
    long kn = mount_key(tid, t, dirfd, raw, n, key, allow_empty);
    if (kn == 0)
        kn = via_host_symlink(tid, t, dirfd, raw, n, !(flags & F_NOFOLLOW) && cls != C_READLINK,
                              key);
    if (kn < 0) {
        if (kn == -EFAULT || kn == -ENOENT) {
            n_pass++;
            return 0; /* the kernel reports it */
        }
        skip_with(r, kn);
        return 1;
    }
    if (kn == 0 && cls == C_READLINK) {
        /* /proc/<pid>/exe of a program exec'd from the mount names the file the kernel ran
         * (a RAM file); ld.so's $ORIGIN and relocatable programs need the /cvmfs path. */
        if (n > 10 && strncmp(raw, "/proc/", 6) == 0 && strcmp(raw + n - 4, "/exe") == 0) {
            const char *who = raw + 6;
            size_t wl = (size_t)n - 10;
            int ok = (wl == 4 && !strncmp(who, "self", 4)) ||
                     (wl == 11 && !strncmp(who, "thread-self", 11));
            if (ok) {
                kn = snprintf(key, MAXPATH, "/proc/%d/exe", (int)tid);
            } else {
                ok = wl > 0 && wl < 12;
                for (size_t i = 0; ok && i < wl; i++)
                    ok = who[i] >= '0' && who[i] <= '9';
                if (ok) {
                    memcpy(key, raw, (size_t)n + 1);
                    kn = n;
                }
            }
            if (ok)
                flags |= F_PROCEXE;
        }
    }
    if (kn == 0 && cls == C_STAT && !(flags & F_NOFOLLOW) && ids_len) {
        /* stat -L /dev/stdin, /proc/self/fd/N ... of a file opened from the mount */
        char mapped[MAXPATH];
        if (n > 5 && (!strncmp(raw, "/proc/", 6) || !strncmp(raw, "/dev/", 5))) {
            unsigned long buf = nr == 332 ? r->r8 : nr == SYS_newfstatat ? r->rdx : r->rsi;
            return ram_file_stat(tid, r, nr, as_tracee(tid, raw, mapped, sizeof mapped), buf);
        }
    }
    if (kn == 0 && cls != C_EXEC) {
        n_pass++;
        return 0;
    }
    if (kn == 0) {
        /* exec of a host path: Python checks for a #! interpreter under the mount */
        char base[MAXPATH];
        if (n <= 0)
            return 0;
        if (raw[0] == '/') {
            memcpy(key, raw, (size_t)n + 1);
            kn = n;
        } else {
            ssize_t bn = dirfd == AT_FDCWD ? tracee_cwd(tid, t, base, sizeof base) : -1;
            if (bn < 0 || (size_t)bn + 1 + (size_t)n >= MAXPATH)
                return 0;
            memcpy(key, base, (size_t)bn);
            key[bn] = '/';
            memcpy(key + bn + 1, raw, (size_t)n + 1);
            kn = bn + 1 + n;
        }
    }

    action_t tmp;
    PyObject *prefix = NULL;
    int asked_again = 0;
again:
    memset(&tmp, 0, sizeof tmp);
    action_t *a = lookup(tid, cls, flags, key, (size_t)kn, &tmp, &prefix);
    int changed = 0;
    if (!cur_notif.active && cls == C_OPEN && a != &tmp && a->kind == A_REDIRECT &&
        !asked_again && named_ram_file(a->bval) && access(a->bval, F_OK) != 0 &&
        errno == ENOENT) { /* the kernel opens it: check first (see stale_open) */
        stale_open(cls, flags, key, (size_t)kn);
        asked_again = 1;
        goto again;
    }
    if (cur_notif.active &&
        (cls == C_OPEN || cls == C_STAT || cls == C_ACCESS || cls == C_READLINK ||
         cls == C_XATTR_GET || cls == C_XATTR_LIST) &&
        a != &tmp &&
        n == kn &&
        memcmp(raw, key, (size_t)kn) == 0 && fo_enabled())
        offer_answer(tid, nr, cls, flags, a, key, (size_t)kn);
    switch (a->kind) {
    case A_PASS:
        break;
    case A_RETURN:
        skip_with(r, a->ival);
        changed = 1;
        break;
    case A_REDIRECT: {
        if (cls == C_OPEN && a->st[0])
            note_open(a);
        if (cur_notif.active && cls == C_OPEN && flags == 0 && a != &tmp && n == kn &&
            memcmp(raw, key, (size_t)kn) == 0 && fo_enabled())
            offer_open(tid, nr, a, key, (size_t)kn);
        if (cur_notif.active) {
            long rc = notify_redirect(tid, nr, r, a->bval);
            if (rc == -ENOENT && !cur_notif.replied && cls == C_OPEN && a != &tmp &&
                !asked_again && named_ram_file(a->bval)) {
                stale_open(cls, flags, key, (size_t)kn);
                asked_again = 1;
                goto again;
            }
            skip_with(r, rc);
            changed = 1;
            break;
        }
        /* ival=1: the target is a regular file or a shadow directory, whose open/stat never
         * restarts, so the tracee cannot observe the pointer change except in the argument
         * register after return, which the C ABI and libc wrappers treat as clobbered (one
         * stop instead of two).  Otherwise, restore the register at syscall exit. */
        int rc = redirect_arg(tid, r, path_arg, a->bval, a->blen, t);
        int via_proc = a->blen > 6 && memcmp(a->bval, "/proc/", 6) == 0;
        int in_shadow = has_prefix(a->bval, a->blen, target_p, target_n);
        if (rc == 0 && cls == C_OPEN && via_proc && !in_shadow && (flags & F_NOFOLLOW) &&
            !(flags & F_OPATH))
            rc = allow_magic_link(tid, r, nr, t, 0);
        else if (rc == 0 && cls == C_OPEN && in_shadow && via_proc && nr == 437)
            rc = allow_magic_link(tid, r, nr, t, 1); /* the shadow tree's /proc/<pid>/fd link */
        if (a->ival == 1 && rc == 0)
            t->nrestore = 0;
        if (rc < 0) {
            t->nrestore = 0;
            skip_with(r, rc);
        }
        changed = 1;
        break;
    }
    case A_STAT: {
        int rc;
        if (nr == 332) {
            struct statx x;
            fill_statx(a->st, &x);
            rc = write_mem(tid, r->r8, &x, sizeof x);
        } else {
            struct stat s;
            fill_stat(a->st, &s);
            rc = write_mem(tid, nr == SYS_newfstatat ? r->rdx : r->rsi, &s, sizeof s);
        }
        skip_with(r, rc);
        changed = 1;
        break;
    }
    case A_READLINK: {
        unsigned long buf = nr == SYS_readlink ? r->rsi : r->rdx;
        long long sz = (long long)(nr == SYS_readlink ? r->rdx : r->r10);
        if (sz <= 0) {
            skip_with(r, -EINVAL);
        } else {
            size_t n = a->blen < (size_t)sz ? a->blen : (size_t)sz;
            skip_with(r, write_mem(tid, buf, a->bval, n) < 0 ? -EFAULT : (long long)n);
        }
        changed = 1;
        break;
    }
    case A_XATTRS:
        skip_with(r, xattr_answer(tid, r, nr, a));
        changed = 1;
        break;
    case A_EXEC: {
        int argv_arg = nr == SYS_execve ? 1 : 2;
        int rc;
        if (prefix && !cur_notif.active) { /* execve is always a ptrace stop */
            rc = exec_prepare(tid, r, path_arg, argv_arg, a, prefix);
            if (rc == 0) {
                changed = EXEC_SCRATCH; /* the caller runs it: exec_scratch */
                break;
            }
        } else if (prefix) {
            rc = -EIO;
        } else {
            /* exec of a /cvmfs binary: its RAM file's short name goes below the red zone,
             * as for the other redirected calls */
            rc = redirect_arg(tid, r, path_arg, a->bval, a->blen, t);
        }
        if (rc < 0) {
            t->nrestore = 0;
            skip_with(r, rc);
        }
        changed = 1;
        break;
    }
    }
    Py_XDECREF(prefix);
    free(tmp.bval);
    return changed;
}

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

/* ---------- the loop ---------- */

static int is_stop_signal(int sig)
{
    return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU;
}

static void kill_all(void)
{
    for (size_t i = 0; i < threads_cap; i++)
        if (threads[i].tid > 0)
            kill(threads[i].tid, SIGKILL);
}

static PyObject *stats_dict(size_t cached, const char *mode)
{
    PyObject *per = PyDict_New();
    if (!per)
        return NULL;
    for (size_t i = 0; i < sizeof trapped / sizeof trapped[0]; i++) {
        int nr = trapped[i];
        if (nr < 0 || nr >= NSYS || !n_trapped[nr])
            continue;
        PyObject *k = PyUnicode_FromString(trapped_names[i]);
        PyObject *v = PyLong_FromUnsignedLongLong(n_trapped[nr]);
        if (!k || !v || PyDict_SetItem(per, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(per);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    unsigned long long fh, fm, sh, sm, fp, fi, fho;
    fo_counts(&fh, &fm, &sh, &sm, &fp, &fi, &fho);
    return Py_BuildValue("{s:N,s:K,s:K,s:K,s:K,s:n,s:K,s:s,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}",
                         "trapped", per, "passed", n_pass, "hits", n_hits, "upcalls", n_upcalls,
                         "absent", n_absent, "cached",
                         (Py_ssize_t)cached, "notified", n_notified, "mode", mode,
                         "inproc_opens", fh, "inproc_misses", fm, "inproc_stats", sh,
                         "inproc_stat_misses", sm, "inproc_sites", fp, "inproc_images", fi,
                         "inproc_host", fho, "node_puts", n_node_puts, "node_dirs", n_node_dirs, "opens_put", n_opens_put);
}

static char **to_cstrings(PyObject *seq)
{
    Py_ssize_t n = PySequence_Size(seq);
    if (n < 0)
        return NULL;
    char **out = calloc((size_t)n + 1, sizeof *out);
    if (!out) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PySequence_GetItem(seq, i);
        char *s;
        if (!it || PyBytes_AsStringAndSize(it, &s, NULL) < 0) {
            Py_XDECREF(it);
            for (Py_ssize_t j = 0; j < i; j++)
                free(out[j]);
            free(out);
            return NULL;
        }
        out[i] = strdup(s);
        Py_DECREF(it);
    }
    return out;
}

static void free_cstrings(char **v)
{
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free(*p);
    free(v);
}

extern char **environ;

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
    pthread_mutex_lock(&big);
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
            if (c && !c->execd)
                c->origin = event == PTRACE_EVENT_VFORK  ? ORIGIN_VFORK
                            : event == PTRACE_EVENT_FORK ? ORIGIN_OWN
                                                         : ORIGIN_THREAD;
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
    (void)self;
    if (!PyArg_ParseTuple(args, "OOy#y#O|lippy#y#", &argv_o, &env_o, &mnt, &mn, &shd, &sn, &h,
                          &spin_us, &mode, &in_process, &io_uring, &rnd, &rn, &wr, &wrn))
        return NULL;
    if (!rnd) {
        rnd = shd;
        rn = sn;
    }
    refuse_io_uring = !io_uring;
    if (handler) {
        PyErr_SetString(PyExc_RuntimeError, "worker._trap.run is not re-entrant");
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
    my_uid = getuid();
    n_scratch = n_held = 0;
    if (getrandom(&scratch_cookie, sizeof scratch_cookie, 0) != sizeof scratch_cookie)
        scratch_cookie = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
    own_fd_prefix_n = (size_t)snprintf(own_fd_prefix, sizeof own_fd_prefix, "/proc/%d/fd/",
                                       (int)getpid());
    if (notify && in_process && fo_init(mount_p, mount_n, mirror_w) == 0) /* before fork */
        fo_set_shadow(shadow_p, shadow_n);

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
        execvp(cargv[0], cargv);
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
    if (write(go[1], "g", 1) != 1) {}
    close(go[1]);

    handler = h;
    Py_INCREF(handler);
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
            pthread_mutex_lock(&big); /* before the GIL: the lock order */
        Py_END_ALLOW_THREADS
        if (tid < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0 && !failure) {
                    PyErr_Fetch(&failure, &f_val, &f_tb);
                    pthread_mutex_lock(&big);
                    kill_all();
                    pthread_mutex_unlock(&big);
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
    Py_END_ALLOW_THREADS
    restore_signals(fwd_sigs, saved, forwarding);
    Py_CLEAR(handler);
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

/*
 * put([(cls, flags, key, answer), ...]) -> n: answers Python knows before anyone asks (every
 * entry of a directory it has just listed: ls -l and find stat and getxattr each of them).
 * Into the answer cache, so those calls never reach Python; lstat and statx answers also into
 * the in-process table, so patched call sites answer them with no trap at all (the table
 * holds 64k answers: a huge directory's later entries take the tracer's way).  Only during a
 * run, from the thread answering a call (it holds `big` and the GIL).
 */

/* One answer given ahead; takes a->bval.  1 if it was taken.  `dirfd`, `pre`: an open's
 * target is `pre` bytes of directory path, then a name in the directory open as dirfd (-1:
 * none), which is cheaper to stat than the path through /proc. */
typedef struct {
    uint64_t cache, fo; /* fnv(cls, flags, key); the in-process kind's key hash (0: none) */
} put_hashes_t;

static unsigned packed_fo_kind(int cls, int flags);

/* fo_publish, with the hash prefetch_packed worked out when it is for this kind */
static int publish(const put_hashes_t *ph, int cls, int flags, unsigned kind, const char *key,
                   size_t kn, const void *data, size_t dlen, int is_path, int err, uint64_t dev,
                   uint64_t ino)
{
    if (ph && ph->fo && kind == packed_fo_kind(cls, flags))
        return fo_publish_hashed(kind, key, kn, ph->fo, data, dlen, is_path, err, dev, ino);
    return fo_publish(kind, key, kn, data, dlen, is_path, err, dev, ino);
}

static int put_one(int cls, int flags, const char *key, size_t kn, action_t *a, int dirfd,
                   size_t pre, const put_hashes_t *ph)
{
    uint64_t h = ph ? ph->cache : fnv(cls, flags, key, kn);
    entry_t *e = NULL;
    char *k = NULL;
    if (cache_get(cls, flags, key, kn, h))
        goto skip;
    if (fo_enabled() && cls == C_STAT && a->kind == A_STAT && (flags == 0 || flags == F_NOFOLLOW)) {
        struct stat st;
        fill_stat(a->st, &st);
        if (publish(ph, cls, flags, flags ? FO_LSTAT : FO_STAT, key, kn, &st, sizeof st, 0, 0, 0,
                    0)) {
            fo_only++;
            free(a->bval);
            return 1;
        }
    } else if (fo_enabled() && cls == C_NAMED && !flags &&
               publish(ph, cls, flags, FO_NAMED, key, kn, NULL, 0, 0, 0, 0, 0)) {
        fo_only++;
        free(a->bval);
        return 1;
    }
    int pooled = 0;
    entry_t *pe = pool_alloc(sizeof *e + kn + 1); /* zeroed: never used before */
    if (pe) {
        e = pe;
        k = (char *)(pe + 1);
        pooled = 1;
    } else if (!(e = calloc(1, sizeof *e)) || !(k = malloc(kn + 1))) {
        if (cls == C_NAMED) /* a name not known here: no listing may deny it in-process */
            names_unpublished = 1;
        goto skip;
    }
    struct stat rs;
    if (cls == C_OPEN) {
        /* only a node cache service's objects by name, with the fstat answer: put
         * ahead of any open, so never pinned (see stale_open) */
        int got = -1;
        if (!flags && a->kind == A_REDIRECT && a->st[0] && a->bval && named_ram_file(a->bval))
            got = dirfd >= 0 && pre && a->blen > pre ? fstatat(dirfd, a->bval + pre, &rs, 0)
                                                     : stat(a->bval, &rs);
        if (got != 0 || !S_ISREG(rs.st_mode)) {
            if (!pooled) { /* (a pooled one is left unused) */
                free(e);
                free(k);
            }
            free(a->bval);
            return 0;
        }
        a->ram_dev = (uint64_t)rs.st_dev;
        a->ram_ino = (uint64_t)rs.st_ino;
    }
    memcpy(k, key, kn);
    k[kn] = 0;
    e->hash = h;
    e->cls = cls;
    e->flags = flags;
    e->key = k;
    e->klen = kn;
    e->act = *a;
    e->pooled = pooled;
    cache_put(e);
    a = &e->act;
    n_opens_put += cls == C_OPEN;
    if (!fo_enabled())
        return 1;
    if (cls == C_STAT && a->kind == A_STAT) {
        struct stat st;
        fill_stat(a->st, &st);
        int nofollow = flags & F_NOFOLLOW;
        publish(ph, cls, flags, nofollow ? FO_LSTAT : FO_STAT, key, kn, &st, sizeof st, 0, 0, 0, 0);
    } else if (cls == C_NAMED) {
        if (!publish(ph, cls, flags, FO_NAMED, key, kn, NULL, 0, 0, 0, 0, 0))
            names_unpublished = 1;
    } else if (cls == C_NOXATTR) {
        /* after its entries' answers: an entry with xattrs must be seen as such in-process
         * (below) before its directory says the others have none */
        if (!xattrs_unpublished)
            publish(ph, cls, flags, FO_NOXATTR, key, kn, NULL, 0, 0, 0, 0, 0);
        /* and after all its names: only then may a name missing there mean ENOENT */
        if (!names_unpublished && cache_get(C_LISTED, 0, key, kn, fnv(C_LISTED, 0, key, kn)))
            fo_publish(FO_LISTED, key, kn, NULL, 0, 0, 0, 0, 0);
    } else if ((cls == C_XATTR_GET || cls == C_XATTR_LIST) && a->kind == A_XATTRS) {
        /* present, with data: the handler hands these calls to us (and derives nothing) */
        unsigned kind = (cls == C_XATTR_GET ? FO_XATTR : FO_XATTR_LIST) +
                        (flags & F_NOFOLLOW ? 1 : 0);
        if (!a->blen || !fo_publish(kind, key, kn, a->bval, a->blen, 0, 0, 0, 0))
            xattrs_unpublished = 1;
    } else if ((cls == C_XATTR_GET && a->kind == A_RETURN && a->ival < 0) ||
               (cls == C_XATTR_LIST && a->kind == A_RETURN && a->ival == 0)) {
        unsigned kind = (cls == C_XATTR_GET ? FO_XATTR : FO_XATTR_LIST) +
                        (flags & F_NOFOLLOW ? 1 : 0);
        fo_publish(kind, key, kn, NULL, 0, 0, (int)-a->ival, 0, 0);
    } else if (cls == C_OPEN && ids_claim(a->ram_dev, a->ram_ino, a->st) == 0 &&
               publish(ph, cls, flags, FO_OPEN, key, kn, a->bval, a->blen + 1, 1, 0,
                       a->ram_dev, a->ram_ino)) {
        uint64_t id[2] = {a->ram_dev, a->ram_ino};
        struct stat st;
        fill_stat(a->st, &st);
        fo_publish(FO_IDENT, (const char *)id, sizeof id, &st, sizeof st, 0, 0, a->ram_dev,
                   a->ram_ino);
    }
    return 1;
skip:
    free(e);
    free(a->bval);
    return 0;
}

/* A growable byte buffer. */
typedef struct {
    char *b;
    size_t len, cap;
} buf_t;

static int buf_add(buf_t *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (b->len + n > cap)
            cap *= 2;
        char *g = realloc(b->b, cap);
        if (!g)
            return -1;
        b->b = g;
        b->cap = cap;
    }
    memcpy(b->b + b->len, p, n);
    b->len += n;
    return 0;
}

static void buf_free(buf_t *b)
{
    free(b->b);
    memset(b, 0, sizeof *b);
}

/* The next (cls, flags, key, answer) of put()'s items: 1 one to use, 0 one to skip (not
 * cacheable, or an exec's argv), -1 an error (set), 2 none left.  *item holds the key's bytes
 * until the caller drops it; a->bval is the caller's. */
static int next_answer(PyObject *it, PyObject **item, int *cls, int *flags, const char **key,
                       Py_ssize_t *kn, action_t *a)
{
    memset(a, 0, sizeof *a);
    *item = PyIter_Next(it);
    if (!*item)
        return PyErr_Occurred() ? -1 : 2;
    PyObject *res, *argv = NULL;
    int cacheable = 0;
    if (!PyArg_ParseTuple(*item, "iiy#O", cls, flags, key, kn, &res) ||
        parse_action(res, a, &cacheable, &argv) < 0) {
        free(a->bval);
        a->bval = NULL;
        Py_XDECREF(argv);
        Py_CLEAR(*item);
        return -1;
    }
    int use = cacheable && !argv;
    Py_XDECREF(argv);
    if (!use) {
        free(a->bval);
        a->bval = NULL;
    }
    return use;
}

static PyObject *trap_put(PyObject *self, PyObject *args)
{
    PyObject *items, *item;
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &items))
        return NULL;
    if (!handler) {
        PyErr_SetString(PyExc_RuntimeError, "worker._trap.put outside a run");
        return NULL;
    }
    PyObject *it = PyObject_GetIter(items);
    if (!it)
        return NULL;
    long n = 0;
    for (;;) {
        int cls, flags;
        const char *key;
        Py_ssize_t kn;
        action_t a;
        int got = next_answer(it, &item, &cls, &flags, &key, &kn, &a);
        if (got == 2 || got < 0)
            break;
        if (got == 1)
            n += put_one(cls, flags, key, (size_t)kn, &a, -1, 0, NULL);
        Py_DECREF(item);
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(n);
}

/*
 * Answers ahead that another job of this node can use (worker/node_answers.py): pack() turns
 * the items put() takes into bytes, put_table() puts them.  What differs between jobs is
 * written as a reference to the job's own value: the uid, gid and st_dev in stat answers, and
 * the directory through which the node cache service's objects are opened (`prefix`).  A
 * record: u8 cls, u8 kind, u16 flags, u8 bits, 3 bytes 0, u32 key length, u32 bval length,
 * i64 ival, [15 x i64 stat], key, bval.
 */
enum { PK_ST = 1, PK_BVAL = 2, PK_PREFIX = 4, PK_UID = 8, PK_GID = 16, PK_DEV = 32 };
#define PK_HEAD 24
#define PK_MAX_FIELD (1u << 20)

/* What answers ahead are made of; anything else in packed bytes is not taken. */
static int packed_answer_ok(int cls, int kind)
{
    switch (cls) {
    case C_STAT:
        return kind == A_STAT || kind == A_RETURN;
    case C_XATTR_GET:
    case C_XATTR_LIST:
        return kind == A_RETURN || kind == A_XATTRS;
    case C_OPEN:
        return kind == A_REDIRECT; /* put_one takes node cache objects by name only */
    case C_READLINK:
        return kind == A_READLINK;
    case C_LISTED:
    case C_NAMED:
    case C_NOXATTR:
        return kind == A_RETURN;
    default:
        return 0;
    }
}

static PyObject *trap_pack(PyObject *self, PyObject *args)
{
    PyObject *items, *item;
    const char *prefix;
    Py_ssize_t pn;
    long long uid, gid, dev;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oy#LLL", &items, &prefix, &pn, &uid, &gid, &dev))
        return NULL;
    PyObject *it = PyObject_GetIter(items);
    if (!it)
        return NULL;
    buf_t out = {NULL, 0, 0};
    int failed = 0;
    for (;;) {
        int cls, flags;
        const char *key;
        Py_ssize_t kn;
        action_t a;
        int got = next_answer(it, &item, &cls, &flags, &key, &kn, &a);
        if (got == 2 || got < 0) {
            failed = got < 0;
            break;
        }
        if (got == 0 || (size_t)kn > PK_MAX_FIELD || a.blen > PK_MAX_FIELD || cls < 0 ||
            cls > 255 || flags < 0 || flags > 0xffff || a.kind < 0 || a.kind > 255) {
            free(a.bval);
            Py_DECREF(item);
            continue;
        }
        unsigned bits = 0;
        const char *b = a.bval;
        size_t bn = a.blen;
        if (a.st[0]) {
            bits |= PK_ST;
            if (a.st[3] == uid)
                bits |= PK_UID;
            if (a.st[4] == gid)
                bits |= PK_GID;
            if (a.st[8] == dev)
                bits |= PK_DEV;
        }
        if (b) {
            bits |= PK_BVAL;
            if (cls == C_OPEN && pn && bn > (size_t)pn && memcmp(b, prefix, (size_t)pn) == 0) {
                bits |= PK_PREFIX;
                b += pn;
                bn -= (size_t)pn;
            }
        }
        char head[PK_HEAD];
        uint32_t k32 = (uint32_t)kn, b32 = (uint32_t)bn;
        uint16_t f16 = (uint16_t)flags;
        memset(head, 0, PK_HEAD);
        head[0] = (char)cls;
        head[1] = (char)a.kind;
        memcpy(head + 2, &f16, 2);
        head[4] = (char)bits;
        memcpy(head + 8, &k32, 4);
        memcpy(head + 12, &b32, 4);
        memcpy(head + 16, &a.ival, 8);
        failed = buf_add(&out, head, PK_HEAD) < 0 ||
                 ((bits & PK_ST) && buf_add(&out, a.st, 15 * 8) < 0) ||
                 buf_add(&out, key, (size_t)kn) < 0 || (bn && buf_add(&out, b, bn) < 0);
        free(a.bval);
        Py_DECREF(item);
        if (failed) {
            PyErr_NoMemory();
            break;
        }
    }
    Py_DECREF(it);
    PyObject *r = failed ? NULL : PyBytes_FromStringAndSize(out.b ? out.b : "", (Py_ssize_t)out.len);
    buf_free(&out);
    return r;
}

/* This job's values in packed answers (see pack), set by put_table. */
static struct {
    char *prefix;
    size_t pn;
    long long uid, gid, dev;
    int dirfd;
} job = {NULL, 0, 0, 0, 0, -1};
static buf_t put_notes;  /* "target\0path\0" of each open put, until Python takes them */
static buf_t put_listed; /* "dir\0" of each directory listed by the put going on */

static int set_job(const char *prefix, size_t pn, long long uid, long long gid, long long dev,
                   int dirfd)
{
    char *p = malloc(pn + 1);
    if (!p)
        return -1;
    memcpy(p, prefix, pn);
    p[pn] = 0;
    free(job.prefix);
    job.prefix = p;
    job.pn = pn;
    job.uid = uid;
    job.gid = gid;
    job.dev = dev;
    job.dirfd = dirfd;
    return 0;
}

/* Put pack()ed answers whose keys lie under `within` (one repository's mount path: a table
 * for one repository never answers for another), with this job's values (`job`).  Bytes that
 * do not parse end the walk (what came before stays).  -1: out of memory. */
/* The in-process kind a packed answer is published under (put_one), or 0. */
static unsigned packed_fo_kind(int cls, int flags)
{
    switch (cls) {
    case C_STAT:
        return flags & F_NOFOLLOW ? FO_LSTAT : FO_STAT;
    case C_NAMED:
        return FO_NAMED;
    case C_NOXATTR:
        return FO_NOXATTR;
    case C_OPEN:
        return FO_OPEN;
    default:
        return 0;
    }
}

/* Prefetch what putting the packed answer at `off` will probe first (the answer cache's slot
 * and the in-process table's): the next record's offset, or `end`. */
#define PUT_AHEAD 6

/* A directory's answers come together and their keys share its path: the hash states after
 * that path are kept, so only each name is hashed (FNV-1a is a byte-serial chain, most of the
 * cost of putting an answer once its slots are prefetched).  fnv()'s state depends on its
 * seed (cls, flags); the in-process hash's does not (its kind comes last). */
#define HASH_MEMO_SEEDS 8
static struct {
    char dir[MAXPATH];
    size_t dn; /* 0: none */
    uint64_t fo;
    unsigned nseeds;
    uint64_t seed[HASH_MEMO_SEEDS], state[HASH_MEMO_SEEDS];
} hash_memo;

/* fnv(cls, flags, key) into *cache; returns the in-process hash's state after the key (for
 * fo_hash_finish with a kind). */
static uint64_t packed_key_hashes(int cls, int flags, const char *key, size_t kn,
                                  uint64_t *cache)
{
    uint64_t seed = 1469598103934665603ULL ^ (uint64_t)(cls * 131 + flags);
    size_t dn = kn;
    while (dn > 0 && key[dn - 1] != '/')
        dn--;
    if (dn != hash_memo.dn || memcmp(key, hash_memo.dir, dn) != 0) {
        hash_memo.dn = 0;
        if (dn == 0 || dn > sizeof hash_memo.dir) {
            *cache = fnv(cls, flags, key, kn);
            uint64_t x = FO_HASH_INIT;
            for (size_t i = 0; i < kn; i++)
                x = fo_hash_step(x, (unsigned char)key[i]);
            return x;
        }
        memcpy(hash_memo.dir, key, dn);
        hash_memo.dn = dn;
        hash_memo.nseeds = 0;
        uint64_t x = FO_HASH_INIT;
        for (size_t i = 0; i < dn; i++)
            x = fo_hash_step(x, (unsigned char)key[i]);
        hash_memo.fo = x;
    }
    uint64_t c = 0;
    unsigned j = 0;
    for (; j < hash_memo.nseeds; j++)
        if (hash_memo.seed[j] == seed)
            break;
    if (j < hash_memo.nseeds) {
        c = hash_memo.state[j];
    } else {
        c = seed;
        for (size_t i = 0; i < dn; i++)
            c = (c ^ (unsigned char)key[i]) * 1099511628211ULL;
        if (hash_memo.nseeds < HASH_MEMO_SEEDS) {
            hash_memo.seed[hash_memo.nseeds] = seed;
            hash_memo.state[hash_memo.nseeds++] = c;
        }
    }
    uint64_t x = hash_memo.fo;
    for (size_t i = dn; i < kn; i++) { /* two independent chains: they overlap */
        unsigned char b = (unsigned char)key[i];
        c = (c ^ b) * 1099511628211ULL;
        x = fo_hash_step(x, b);
    }
    *cache = c ? c : 1;
    return x;
}
static size_t prefetch_packed(const char *data, size_t off, size_t end, put_hashes_t *ph)
{
    ph->cache = ph->fo = 0;
    if (end - off < PK_HEAD)
        return end;
    const char *p = data + off;
    uint32_t kn, bn;
    uint16_t f16;
    memcpy(&f16, p + 2, 2);
    memcpy(&kn, p + 8, 4);
    memcpy(&bn, p + 12, 4);
    size_t st = (unsigned char)p[4] & PK_ST ? 15 * 8 : 0;
    size_t need = PK_HEAD + st + (size_t)kn + bn;
    if (kn > PK_MAX_FIELD || bn > PK_MAX_FIELD || need > end - off)
        return end;
    const char *key = p + PK_HEAD + st;
    int cls = (unsigned char)p[0];
    unsigned kind = packed_fo_kind(cls, f16);
    uint64_t fo_partial = packed_key_hashes(cls, f16, key, kn, &ph->cache);
    if (table_cap)
        __builtin_prefetch(&table[ph->cache & (table_cap - 1)], 0, 3);
    if (kind)
        ph->fo = fo_prefetch_hash(fo_hash_finish(fo_partial, kind));
    return off + need;
}

static long put_packed_records(const char *data, size_t dn, const char *within, size_t wn,
                               buf_t *opens);

static long put_packed_bytes(const char *data, size_t dn, const char *within, size_t wn)
{
    return put_packed_records(data, dn, within, wn, NULL);
}

/* put_packed_bytes, but with `opens`, the open answers are not put: their records are added
 * there (for the caller to stage). */
static long put_packed_records(const char *data, size_t dn, const char *within, size_t wn,
                               buf_t *opens)
{
    long n = 0;
    size_t off = 0, end = dn, ahead = 0;
    if (dn >= (1 << 20)) {
        fo_reserve(dn * 2); /* what they take in the arena, roughly */
        cache_reserve(dn / 128); /* ~200 bytes a packed answer, half of them without a stat */
    }
    /* records prefetched and not yet put: their offsets and hashes (a ring) */
    size_t ring_off[PUT_AHEAD + 1];
    put_hashes_t ring[PUT_AHEAD + 1];
    unsigned head = 0, tail = 0;
    for (; tail < PUT_AHEAD && ahead < end; tail++) {
        ring_off[tail] = ahead;
        ahead = prefetch_packed(data, ahead, end, &ring[tail]);
    }
    while (end - off >= PK_HEAD) {
        if (ahead < end) {
            ring_off[tail % (PUT_AHEAD + 1)] = ahead;
            ahead = prefetch_packed(data, ahead, end, &ring[tail % (PUT_AHEAD + 1)]);
            tail++;
        }
        const put_hashes_t *ph = NULL;
        if (head != tail) { /* the same walk as ours: this record's hashes, unless not */
            unsigned r = head++ % (PUT_AHEAD + 1);
            ph = ring_off[r] == off && ring[r].cache ? &ring[r] : NULL;
        }
        const char *p = data + off;
        uint32_t kn, bn;
        action_t a;
        memset(&a, 0, sizeof a);
        uint16_t f16;
        memcpy(&f16, p + 2, 2);
        int cls = (unsigned char)p[0], flags = f16;
        unsigned bits = (unsigned char)p[4];
        a.kind = (unsigned char)p[1];
        memcpy(&kn, p + 8, 4);
        memcpy(&bn, p + 12, 4);
        memcpy(&a.ival, p + 16, 8);
        size_t need = PK_HEAD + (bits & PK_ST ? 15 * 8 : 0) + (size_t)kn + bn;
        if (kn > PK_MAX_FIELD || bn > PK_MAX_FIELD || need > end - off)
            break;
        p += PK_HEAD;
        if (bits & PK_ST) {
            memcpy(a.st, p, 15 * 8);
            p += 15 * 8;
            if (bits & PK_UID)
                a.st[3] = job.uid;
            if (bits & PK_GID)
                a.st[4] = job.gid;
            if (bits & PK_DEV)
                a.st[8] = job.dev;
        }
        const char *key = p;
        p += kn;
        off += need;
        if (kn < wn || memcmp(key, within, wn) != 0 || (kn > wn && key[wn] != '/') ||
            memchr(key, 0, kn) || !packed_answer_ok(cls, a.kind))
            continue;
        if (opens && cls == C_OPEN) {
            if (buf_add(opens, data + off - need, need) < 0)
                return -1;
            continue;
        }
        size_t pre = bits & PK_PREFIX ? job.pn : 0;
        if (bits & PK_BVAL) {
            a.bval = malloc(pre + bn + 1);
            if (!a.bval)
                return -1;
            memcpy(a.bval, job.prefix, pre);
            memcpy(a.bval + pre, p, bn);
            a.blen = pre + bn;
            a.bval[a.blen] = 0;
        }
        char *target = NULL;
        size_t tn = 0;
        if (cls == C_OPEN && a.bval) { /* put_one may free it: keep the name for the note */
            tn = a.blen;
            target = malloc(tn + 1);
            if (!target) {
                free(a.bval);
                return -1;
            }
            memcpy(target, a.bval, tn + 1);
        }
        int took = put_one(cls, flags, key, kn, &a, job.dirfd, pre, ph);
        n += took;
        int bad = 0;
        if (took && target)
            bad = buf_add(&put_notes, target, tn + 1) < 0 || buf_add(&put_notes, key, kn) < 0 ||
                  buf_add(&put_notes, "", 1) < 0;
        else if (took && cls == C_LISTED)
            bad = buf_add(&put_listed, key, kn) < 0 || buf_add(&put_listed, "", 1) < 0;
        free(target);
        if (bad)
            return -1;
    }
    n_node_puts += (unsigned long long)n;
    return n;
}

/* The NUL-separated strings of a buffer as a list of bytes (pairs: a list of 2-tuples). */
static PyObject *strings_of(const buf_t *b, int pairs)
{
    PyObject *out = PyList_New(0);
    const char *p = b->b, *e = b->b + b->len;
    while (out && p < e) {
        const char *a = p, *a_end = memchr(p, 0, (size_t)(e - p));
        if (!a_end)
            break;
        p = a_end + 1;
        PyObject *item;
        if (pairs) {
            const char *b_end = memchr(p, 0, (size_t)(e - p));
            if (!b_end)
                break;
            item = Py_BuildValue("(y#y#)", a, (Py_ssize_t)(a_end - a), p,
                                 (Py_ssize_t)(b_end - p));
            p = b_end + 1;
        } else {
            item = PyBytes_FromStringAndSize(a, a_end - a);
        }
        if (!item || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

/* (n, directories listed by this put, (object file, path) of every open put since Python
 * last asked) */
static PyObject *put_result(long n)
{
    PyObject *listed = strings_of(&put_listed, 0), *opens = strings_of(&put_notes, 1);
    put_listed.len = 0;
    put_notes.len = 0;
    if (!listed || !opens) {
        Py_XDECREF(listed);
        Py_XDECREF(opens);
        return NULL;
    }
    return Py_BuildValue("lNN", n, listed, opens);
}

/*
 * Answers from the node staged per directory: put when a call first misses in the directory
 * or below it (lookup), or when Python comes to the directory (put_staged), so a job's start
 * never costs the whole table and its first touch of a directory the node knows needs no
 * Python.  Keyed by the directory's path (FNV-1a).
 */
typedef struct {
    uint64_t h; /* 0: free */
    char *dir, *within;
    size_t dn, wn;
    const char *data; /* NULL once put */
    size_t len;
    size_t order; /* its place in stg_order */
    int owned;    /* data is ours to free (else it is in a table we hold: see put_table) */
} staged_t;
static staged_t *stg;
static size_t stg_cap, stg_used, stg_pending;
/* The staged directories in the order the node's jobs came to them: a job that misses in one
 * will most likely come to the next ones too, so those are put with it (stage_ahead). */
typedef struct {
    const char *dir; /* the staged_t's own copy: stays until stage_clear */
    size_t dn;
    uint64_t h;
} stg_ref_t;
static stg_ref_t *stg_order;
static size_t stg_norder, stg_order_cap;
#define STAGE_AHEAD_DIRS 8
#define STAGE_AHEAD_BYTES (64u << 10)

static staged_t *stg_find(const char *d, size_t n, uint64_t h, int create)
{
    if (!stg_cap) {
        if (!create)
            return NULL;
        stg = calloc(1024, sizeof *stg);
        if (!stg)
            return NULL;
        stg_cap = 1024;
    }
    if (create && (stg_used + 1) * 2 > stg_cap) {
        size_t ncap = stg_cap * 2;
        staged_t *nt = calloc(ncap, sizeof *nt);
        if (!nt)
            return NULL;
        OA_MOVE(nt, ncap, stg, stg_cap, h)
        free(stg);
        stg = nt;
        stg_cap = ncap;
    }
    for (size_t i = h & (stg_cap - 1);; i = (i + 1) & (stg_cap - 1)) {
        staged_t *s = &stg[i];
        if (!s->h) {
            if (!create)
                return NULL;
            s->h = h;
            stg_used++;
            return s;
        }
        if (s->h == h && s->dn == n && memcmp(s->dir, d, n) == 0)
            return s;
    }
}

static uint64_t dir_hash(const char *d, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)d[i]) * 1099511628211ull;
    return h ? h : 1;
}

/* Put a staged directory's answers (once); -1: out of memory. */
static long stage_put(staged_t *s)
{
    if (!s->data)
        return 0;
    long n = put_packed_bytes(s->data, s->len, s->within, s->wn);
    if (s->owned)
        free((char *)s->data);
    s->data = NULL;
    stg_pending--;
    return n;
}

/* Put what the node knows of the directories above `key` (from the top, so a directory's
 * own stat comes before its entries'); the deepest one put, or NULL. */
static staged_t *put_staged_prefixes(const char *key, size_t kn)
{
    staged_t *deepest = NULL;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < kn && stg_pending; i++) {
        if (key[i] == '/' && i > 0) {
            staged_t *s = stg_find(key, i, h ? h : 1, 0);
            if (s && s->data && stage_put(s) > 0)
                deepest = s;
        }
        h = (h ^ (unsigned char)key[i]) * 1099511628211ull;
    }
    return deepest;
}

/* A call missed the cache: put what the node knows of the directories on its path, and of
 * the few that came next for the node's earlier jobs (at most STAGE_AHEAD_DIRS of them, up
 * to STAGE_AHEAD_BYTES), each after its own ancestors.  1 if anything was put. */
static int put_staged_ancestors(const char *key, size_t kn)
{
    if (!stg_pending)
        return 0;
    staged_t *missed = put_staged_prefixes(key, kn);
    if (!missed)
        return 0;
    size_t bytes = 0, dirs = 0;
    for (size_t i = missed->order + 1; i < stg_norder && stg_pending &&
                                       dirs < STAGE_AHEAD_DIRS && bytes < STAGE_AHEAD_BYTES;
         i++) {
        staged_t *s = stg_find(stg_order[i].dir, stg_order[i].dn, stg_order[i].h, 0);
        if (!s || !s->data)
            continue;
        bytes += s->len;
        dirs++;
        char path[MAXPATH];
        if (s->dn + 1 < sizeof path) { /* its ancestors first, then itself */
            memcpy(path, s->dir, s->dn);
            path[s->dn] = '/';
            put_staged_prefixes(path, s->dn + 1);
        }
    }
    return 1;
}

static void stage_clear(void)
{
    for (size_t i = 0; i < stg_cap; i++) {
        free(stg[i].dir);
        free(stg[i].within);
        if (stg[i].owned)
            free((char *)stg[i].data);
    }
    free(stg);
    stg = NULL;
    stg_cap = stg_used = stg_pending = 0;
    free(stg_order);
    stg_order = NULL;
    stg_norder = stg_order_cap = 0;
    dirs_clear();
    buf_free(&put_notes);
    buf_free(&put_listed);
    free(job.prefix);
    job.prefix = NULL;
    job.pn = 0;
    job.dirfd = -1;
}

/*
 * Directory opens answered from the node's listings (worker/node_answers.py, LISTING): a
 * job's first open of a directory that an earlier job of the node listed is answered here,
 * its mirror in the shadow tree (and its ancestors') made from those listings, with no
 * upcall.  A listing is kept only for a directory named by itself (no symlink on the way,
 * nothing that depends on the process), so the path is the directory's own; its lstat answer
 * (put from the node's answers of its parent) is what fstat of the fd says, as Python's
 * answer would.  The mount itself is Python's (its listing is the repositories').
 */
typedef struct {
    uint64_t h; /* 0: free */
    char *dir;
    size_t dn;
    const char *data; /* a listing, in a table we hold (the other sets: NULL) */
    size_t len;
    size_t ahead; /* its place in ahead_mirrors + 1 (0: not made ahead) */
} dirmap_slot_t;
typedef struct {
    dirmap_slot_t *t;
    size_t cap, used;
} dirmap_t;
static dirmap_t node_listings, mirrored, opens_looked; /* (opens looked: see put_table) */
/* the open answers of directories put at once, each put when the job first opens a file
 * there (put_deferred_opens): data is ours */
static dirmap_t opens_deferred;
/* ...in the order the node's jobs came to them: a job that opens files in one most likely
 * opens files in the next few too (a Python import: each package's __pycache__), which are
 * put with it, as staged directories are (put_staged_ancestors) */
static struct {
    const char *dir; /* the slot's own copy: stays until dirs_clear */
    size_t dn;
} *od_order;
static size_t od_n, od_cap;
#define OPENS_AHEAD_DIRS 4
static buf_t mirror_notes; /* "dir\0" of each directory mirrored here, until Python takes them */

/* The slot of directory `d` (with `create`: a new one, its path copied; NULL if out of
 * memory), or NULL. */
static dirmap_slot_t *dirmap_find(dirmap_t *m, const char *d, size_t n, int create)
{
    if (create && (m->used + 1) * 2 > m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 256;
        dirmap_slot_t *t = calloc(cap, sizeof *t);
        if (!t)
            return NULL;
        OA_MOVE(t, cap, m->t, m->cap, h)
        free(m->t);
        m->t = t;
        m->cap = cap;
    }
    if (!m->cap)
        return NULL;
    uint64_t h = dir_hash(d, n);
    for (size_t i = h & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        dirmap_slot_t *s = &m->t[i];
        if (!s->h) {
            if (!create || !(s->dir = malloc(n ? n : 1)))
                return NULL;
            memcpy(s->dir, d, n);
            s->dn = n;
            s->h = h;
            m->used++;
            return s;
        }
        if (s->h == h && s->dn == n && memcmp(s->dir, d, n) == 0)
            return s;
    }
}

static void dirmap_clear(dirmap_t *m)
{
    for (size_t i = 0; i < m->cap; i++)
        free(m->t[i].dir);
    free(m->t);
    memset(m, 0, sizeof *m);
}

static void release_tables(void);
static int stage_dir(const char *d, size_t dn, const char *within, size_t wn, const char *data,
                     size_t len, int owned);

static void dirs_clear(void)
{
    release_tables();
    dirmap_clear(&node_listings);
    dirmap_clear(&mirrored);
    dirmap_clear(&opens_looked);
    for (size_t i = 0; i < opens_deferred.cap; i++)
        free((char *)opens_deferred.t[i].data);
    dirmap_clear(&opens_deferred);
    ahead_clear();
    free(od_order);
    od_order = NULL;
    od_n = od_cap = 0;
    buf_free(&mirror_notes);
    free(mirror_w);
    mirror_w = NULL;
    mirror_wn = 0;
}

/* The first open of a file in a directory whose answers were put at once: its opens now (see
 * put_table).  1 if any were put. */
static long put_opens_of(dirmap_slot_t *o)
{
    char *data = (char *)o->data;
    o->data = NULL;
    long n = put_packed_bytes(data, o->len, mount_p, mount_n); /* (all below the mount) */
    free(data);
    return n;
}

static int put_deferred_opens(const char *key, size_t kn)
{
    const char *slash = opens_deferred.used ? memrchr(key, '/', kn) : NULL;
    dirmap_slot_t *o = slash ? dirmap_find(&opens_deferred, key, (size_t)(slash - key), 0) : NULL;
    if (!o || !o->data)
        return 0;
    size_t at = 0; /* where it is in od_order (its slot does not say: a linear search, rare) */
    while (at < od_n && od_order[at].dir != o->dir)
        at++;
    long n = put_opens_of(o);
    for (size_t i = at + 1, ahead = 0; i < od_n && ahead < OPENS_AHEAD_DIRS; i++) {
        dirmap_slot_t *next = dirmap_find(&opens_deferred, od_order[i].dir, od_order[i].dn, 0);
        if (next && next->data) {
            put_opens_of(next);
            ahead++;
        }
    }
    return n > 0;
}

/*
 * The mirrors of the node's listings made ahead, by a thread of their own, in the order the
 * node's jobs came to the directories, while the program starts: its first open of a
 * directory then finds the mirror made (a hundred files' worth of mknod each, ~120 us, was
 * the program's wait).  A mirror is made once, by whoever claims it first (this thread or the
 * one answering a call, which waits if the other is at it).  Stopped and joined before run
 * returns: nothing writes into the shadow tree after its fds are closed.
 */
enum { AM_TODO, AM_MAKING, AM_MADE, AM_FAILED };
typedef struct {
    const char *dir, *data; /* a listing's directory (its slot's own copy) and bytes */
    size_t dn, len;
    int state;
} ahead_mirror_t;
static ahead_mirror_t *ahead_mirrors;
static size_t n_ahead_mirrors;
static pthread_t ahead_thread;
static int ahead_running, ahead_stop;

/* Make one (its parent made); 0 or an errno. */
static int make_mirror(const char *dir, size_t dn, const char *data, size_t len)
{
    char target[MAXPATH];
    if (dn <= mount_n || mirror_wn + (dn - mount_n) >= sizeof target)
        return ENAMETOOLONG;
    memcpy(target, mirror_w, mirror_wn);
    memcpy(target + mirror_wn, dir + mount_n, dn - mount_n);
    target[mirror_wn + dn - mount_n] = 0;
    return mirror_dir(target, (const unsigned char *)data, len);
}

/* Claim and make ahead_mirrors[i]; its state after. */
static int ahead_make(ahead_mirror_t *m)
{
    int todo = AM_TODO;
    if (!__atomic_compare_exchange_n(&m->state, &todo, AM_MAKING, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
        return todo;
    int e = make_mirror(m->dir, m->dn, m->data, m->len);
    /* a parent not made yet (ENOENT): left for the call that needs it, which makes parents
     * first; anything else the listing's fault (Python rebuilds it from the catalog) */
    int st = !e ? AM_MADE : e == ENOENT ? AM_TODO : AM_FAILED;
    __atomic_store_n(&m->state, st, __ATOMIC_RELEASE);
    return st;
}

static void *ahead_main(void *arg)
{
    (void)arg;
    for (size_t i = 0; i < n_ahead_mirrors && !__atomic_load_n(&ahead_stop, __ATOMIC_ACQUIRE);
         i++)
        ahead_make(&ahead_mirrors[i]);
    return NULL;
}

/* Start making the listings of node_listings ahead (once a run). */
static void ahead_start(void)
{
    if (ahead_running || ahead_mirrors || !mirror_w || !node_listings.used)
        return;
    ahead_mirrors = calloc(node_listings.used, sizeof *ahead_mirrors);
    if (!ahead_mirrors)
        return;
    /* parents before children: by path length (a parent's path is a prefix of its child's) */
    size_t n = 0;
    for (size_t i = 0; i < node_listings.cap; i++) {
        dirmap_slot_t *l = &node_listings.t[i];
        if (l->h && l->data)
            ahead_mirrors[n++] = (ahead_mirror_t){l->dir, l->data, l->dn, l->len, AM_TODO};
    }
    for (size_t i = 1; i < n; i++) { /* insertion sort by depth: a few hundred */
        ahead_mirror_t m = ahead_mirrors[i];
        size_t j = i;
        while (j > 0 && ahead_mirrors[j - 1].dn > m.dn)
            ahead_mirrors[j] = ahead_mirrors[j - 1], j--;
        ahead_mirrors[j] = m;
    }
    for (size_t i = 0; i < n; i++) {
        dirmap_slot_t *l = dirmap_find(&node_listings, ahead_mirrors[i].dir,
                                       ahead_mirrors[i].dn, 0);
        if (l)
            l->ahead = i + 1;
    }
    n_ahead_mirrors = n;
    ahead_stop = 0;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay the main thread's */
    ahead_running = pthread_create(&ahead_thread, NULL, ahead_main, NULL) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* Before the shadow tree's fds may close (end of a run). */
static void ahead_join(void)
{
    if (ahead_running) {
        __atomic_store_n(&ahead_stop, 1, __ATOMIC_RELEASE);
        pthread_join(ahead_thread, NULL);
        ahead_running = 0;
    }
}

static void ahead_clear(void)
{
    ahead_join();
    free(ahead_mirrors);
    ahead_mirrors = NULL;
    n_ahead_mirrors = 0;
}

/* Mirror `key`'s first `n` bytes (a directory below the mount) from the node's listing, once;
 * 0 if it cannot be (no listing: Python's). */
static int mirror_from_node(const char *key, size_t n)
{
    if (dirmap_find(&mirrored, key, n, 0))
        return 1;
    dirmap_slot_t *l = dirmap_find(&node_listings, key, n, 0);
    if (!l || !l->data)
        return 0;
    if (l->ahead && l->ahead <= n_ahead_mirrors) {
        ahead_mirror_t *m = &ahead_mirrors[l->ahead - 1];
        int st;
        while ((st = ahead_make(m)) == AM_MAKING) /* the other thread is at it: not for long */
            sched_yield();
        if (st != AM_MADE)
            return 0; /* (its parents are made: AM_TODO means a listing that does not work) */
    } else if (make_mirror(key, n, l->data, l->len) != 0) {
        return 0; /* a listing that does not parse: Python rebuilds it from the catalog */
    }
    if (!dirmap_find(&mirrored, key, n, 1) || buf_add(&mirror_notes, key, n) < 0 ||
        buf_add(&mirror_notes, "", 1) < 0)
        return 0;
    return 1;
}

static int dir_open_from_node(const char *key, size_t kn, action_t *out)
{
    if (!node_listings.used || !mirror_w || kn <= mount_n + 1 || key[mount_n] != '/' ||
        memcmp(key, mount_p, mount_n) != 0 || !dirmap_find(&node_listings, key, kn, 0) ||
        !dirmap_find(&mirrored, mount_p, mount_n, 0))
        return 0;
    const action_t *st = known_stat(key, kn, F_NOFOLLOW);
    if (!st || st->kind != A_STAT || !S_ISDIR((mode_t)st->st[0]))
        return 0;
    for (size_t i = mount_n + 1; i <= kn; i++) /* from the top: each directory's parent first */
        if ((i == kn || key[i] == '/') && !mirror_from_node(key, i))
            return 0;
    memset(out, 0, sizeof *out);
    out->blen = target_n + (kn - mount_n);
    if (!(out->bval = malloc(out->blen + 1)))
        return 0;
    memcpy(out->bval, target_p, target_n);
    memcpy(out->bval + target_n, key + mount_n, kn - mount_n);
    out->bval[out->blen] = 0;
    out->kind = A_REDIRECT;
    out->ival = 1; /* SAFE: opening a directory never blocks */
    memcpy(out->st, st->st, sizeof out->st);
    return 1;
}

/*
 * A revision's table of answers from the node (worker/node_answers.py: frames of u32 part
 * length, u32 data length, part, data; a part is a directory, NUL, and which of its answers
 * the data holds), read where the service's memfd is mapped: nothing is copied.  Its first
 * directories in the order the node's jobs came to them (up to `eager` bytes) are put at
 * once and the others staged, each put when the job first comes to it; the listings are kept
 * for the mirrors (dir_open_from_node) and Python, and so are the directories whose opens an
 * earlier job looked for (Python does not look again).  Only frames of the repository
 * mounted at `within`: a table never answers for another.
 */
#define NT_MAX_PART (4096 + 16) /* as worker/node_answers.py MAX_PART, MAX_FRAME_DATA */
#define NT_MAX_DATA (64u << 20)
#define NT_BODIES 8 /* a directory's answers: one per kind of first touch, and its opens */

typedef struct {
    const char *dir, *body[NT_BODIES];
    size_t dn, len[NT_BODIES], bytes;
    unsigned nb;
} nt_dir_t;

typedef struct {
    const char *dir, *body;
    size_t dn, len;
} nt_span_t;

typedef struct {
    nt_dir_t *dirs; /* in the order first met */
    size_t ndirs;
    nt_span_t *listings, *looked;
    size_t nlistings, nlooked;
    uint32_t *index; /* directory -> dirs index + 1 */
    size_t icap;
} nt_t;

static void nt_free(nt_t *t)
{
    free(t->dirs);
    free(t->listings);
    free(t->looked);
    free(t->index);
    memset(t, 0, sizeof *t);
}

/* 0: read into *t (nt_free it); -1: bytes that are not frames (nothing is to be taken);
 * -2: out of memory. */
static int nt_read(const char *data, size_t n, const char *within, size_t wn, nt_t *t)
{
    memset(t, 0, sizeof *t);
    size_t frames = 0;
    for (size_t off = 0; off < n; frames++) {
        uint32_t pn, dn;
        if (n - off < 8)
            return -1;
        memcpy(&pn, data + off, 4);
        memcpy(&dn, data + off + 4, 4);
        off += 8;
        if (pn == 0 || pn > NT_MAX_PART || dn > NT_MAX_DATA || n - off < (size_t)pn + dn)
            return -1;
        off += (size_t)pn + dn;
    }
    t->icap = 16;
    while (t->icap < frames * 2)
        t->icap *= 2;
    t->dirs = calloc(frames + 1, sizeof *t->dirs);
    t->listings = calloc(frames + 1, sizeof *t->listings);
    t->looked = calloc(frames + 1, sizeof *t->looked);
    t->index = calloc(t->icap, sizeof *t->index);
    if (!t->dirs || !t->listings || !t->looked || !t->index) {
        nt_free(t);
        return -2;
    }
    for (size_t off = 0; off < n;) {
        uint32_t pn, dn;
        memcpy(&pn, data + off, 4);
        memcpy(&dn, data + off + 4, 4);
        const char *part = data + off + 8, *body = part + pn;
        off += 8 + (size_t)pn + dn;
        const char *nul = memchr(part, 0, pn);
        size_t dl = nul ? (size_t)(nul - part) : pn, wl = nul ? pn - dl - 1 : 0;
        if (dl < wn || memcmp(part, within, wn) != 0 || (dl > wn && part[wn] != '/'))
            continue; /* another repository's */
        if (wl == 7 && memcmp(nul + 1, "listing", 7) == 0) {
            t->listings[t->nlistings++] = (nt_span_t){part, body, dl, dn};
            continue;
        }
        if (wl == 12 && memcmp(nul + 1, "opens-looked", 12) == 0) {
            t->looked[t->nlooked++] = (nt_span_t){part, body, dl, dn};
            continue;
        }
        nt_dir_t *d = NULL;
        for (size_t i = dir_hash(part, dl) & (t->icap - 1);; i = (i + 1) & (t->icap - 1)) {
            uint32_t v = t->index[i];
            if (!v) {
                t->index[i] = (uint32_t)++t->ndirs;
                d = &t->dirs[t->ndirs - 1];
                d->dir = part;
                d->dn = dl;
                break;
            }
            if (t->dirs[v - 1].dn == dl && memcmp(t->dirs[v - 1].dir, part, dl) == 0) {
                d = &t->dirs[v - 1];
                break;
            }
        }
        if (dn && d->nb < NT_BODIES) {
            d->body[d->nb] = body;
            d->len[d->nb++] = dn;
            d->bytes += dn;
        }
    }
    return 0;
}

/* Which of a table's directories put_table puts at once (the first, up to `eager` bytes). */
static int nt_eager(const nt_dir_t *d, size_t eager, size_t *size)
{
    if (*size + d->bytes > eager)
        return 0;
    *size += d->bytes;
    return 1;
}

/* The tables put_table took answers from: their memory stays until the run's answers go. */
static Py_buffer *held_tables;
static size_t nheld_tables;

static void release_tables(void)
{
    for (size_t i = 0; i < nheld_tables; i++)
        PyBuffer_Release(&held_tables[i]);
    free(held_tables);
    held_tables = NULL;
    nheld_tables = 0;
}

static PyObject *trap_put_table(PyObject *self, PyObject *args)
{
    Py_buffer view;
    const char *within, *prefix;
    Py_ssize_t wn, pn, eager;
    long long uid, gid, dev;
    int dirfd;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y#ny#LLLi", &view, &within, &wn, &eager, &prefix, &pn, &uid,
                          &gid, &dev, &dirfd))
        return NULL;
    if (!handler) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_RuntimeError, "worker._trap.put_table outside a run");
        return NULL;
    }
    nt_t t;
    int r = nt_read(view.buf, (size_t)view.len, within, (size_t)wn, &t);
    Py_buffer *more = r ? NULL : realloc(held_tables, (nheld_tables + 1) * sizeof *more);
    if (!more || set_job(prefix, (size_t)pn, uid, gid, dev, dirfd) < 0) {
        if (more)
            held_tables = more;
        nt_free(&t);
        PyBuffer_Release(&view);
        if (r == -1)
            Py_RETURN_NONE; /* not frames: Python says so */
        return PyErr_NoMemory();
    }
    held_tables = more;
    held_tables[nheld_tables++] = view; /* released with the run's answers */
    long n = 0;
    int oom = 0;
    for (size_t i = 0; i < t.nlistings && !oom; i++) { /* (a later one replaces) */
        dirmap_slot_t *l = dirmap_find(&node_listings, t.listings[i].dir, t.listings[i].dn, 1);
        oom = !l;
        if (l) {
            l->data = t.listings[i].body;
            l->len = t.listings[i].len;
        }
    }
    for (size_t i = 0; i < t.nlooked && !oom; i++)
        oom = !dirmap_find(&opens_looked, t.looked[i].dir, t.looked[i].dn, 1);
    if (!oom)
        ahead_start(); /* (the first revision mounted: the others' as their calls come) */
    size_t size = 0;
    for (size_t i = 0; i < t.ndirs && !oom; i++) {
        const nt_dir_t *d = &t.dirs[i];
        if (nt_eager(d, (size_t)eager, &size)) {
            /* its opens when the job first opens a file there (one trap, and the put of a
             * few hundred opens, which a stat of a file there does not need): an open answer
             * costs ~15 times a stat's to put (the object's inode, its fstat answer), and a
             * node's answers hold the opens of every job */
            buf_t opens = {NULL, 0, 0};
            for (unsigned b = 0; b < d->nb && !oom; b++) {
                long k = put_packed_records(d->body[b], d->len[b], within, (size_t)wn, &opens);
                oom = k < 0;
                n += k > 0 ? k : 0;
            }
            dirmap_slot_t *o = opens.len ? dirmap_find(&opens_deferred, d->dir, d->dn, 1) : NULL;
            if (o && !o->data && od_n == od_cap) {
                size_t cap = od_cap ? od_cap * 2 : 256;
                void *g = realloc(od_order, cap * sizeof *od_order);
                if (g) {
                    od_order = g;
                    od_cap = cap;
                }
            }
            if (o && !o->data && od_n < od_cap) {
                o->data = opens.b;
                o->len = opens.len;
                od_order[od_n].dir = o->dir;
                od_order[od_n++].dn = o->dn;
            } else {
                oom = oom || (opens.len && !o);
                free(opens.b);
            }
        } else if (d->nb == 1) {
            oom = stage_dir(d->dir, d->dn, within, (size_t)wn, d->body[0], d->len[0], 0) < 0;
        } else if (d->nb > 1) { /* its answers and its opens: one piece to put */
            char *joined = malloc(d->bytes);
            oom = !joined;
            for (size_t b = 0, at = 0; joined && b < d->nb; at += d->len[b++])
                memcpy(joined + at, d->body[b], d->len[b]);
            oom = oom || stage_dir(d->dir, d->dn, within, (size_t)wn, joined, d->bytes, 1) < 0;
        }
    }
    nt_free(&t);
    if (oom)
        return PyErr_NoMemory();
    return put_result(n);
}

static PyObject *trap_read_table(PyObject *self, PyObject *args)
{
    Py_buffer view;
    const char *within;
    Py_ssize_t wn, eager;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y#n", &view, &within, &wn, &eager))
        return NULL;
    nt_t t;
    int r = nt_read(view.buf, (size_t)view.len, within, (size_t)wn, &t);
    PyObject *now = NULL, *later = NULL, *listings = NULL, *looked = NULL, *out = NULL;
    if (r == -2 || !(now = PyList_New(0)) || !(later = PyList_New(0)) ||
        !(listings = PyDict_New()) || !(looked = PyList_New(0)))
        goto done;
    if (r == -1) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    size_t size = 0;
    for (size_t i = 0; i < t.ndirs; i++) {
        PyObject *d = PyBytes_FromStringAndSize(t.dirs[i].dir, (Py_ssize_t)t.dirs[i].dn);
        int bad = !d || PyList_Append(nt_eager(&t.dirs[i], (size_t)eager, &size) ? now : later,
                                      d) < 0;
        Py_XDECREF(d);
        if (bad)
            goto done;
    }
    for (size_t i = 0; i < t.nlistings; i++) {
        PyObject *d = PyBytes_FromStringAndSize(t.listings[i].dir, (Py_ssize_t)t.listings[i].dn);
        PyObject *b = PyBytes_FromStringAndSize(t.listings[i].body, (Py_ssize_t)t.listings[i].len);
        int bad = !d || !b || PyDict_SetItem(listings, d, b) < 0;
        Py_XDECREF(d);
        Py_XDECREF(b);
        if (bad)
            goto done;
    }
    for (size_t i = 0; i < t.nlooked; i++) {
        PyObject *d = PyBytes_FromStringAndSize(t.looked[i].dir, (Py_ssize_t)t.looked[i].dn);
        int bad = !d || PyList_Append(looked, d) < 0;
        Py_XDECREF(d);
        if (bad)
            goto done;
    }
    out = Py_BuildValue("OOOO", now, later, listings, looked);
done:
    if (r == -2)
        PyErr_NoMemory();
    nt_free(&t);
    PyBuffer_Release(&view);
    Py_XDECREF(now);
    Py_XDECREF(later);
    Py_XDECREF(listings);
    Py_XDECREF(looked);
    return out;
}

/* node_listing(directory) -> its listing from the node's table, or None */
static PyObject *trap_node_listing(PyObject *self, PyObject *args)
{
    const char *d;
    Py_ssize_t dn;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#", &d, &dn))
        return NULL;
    dirmap_slot_t *l = dn > 0 ? dirmap_find(&node_listings, d, (size_t)dn, 0) : NULL;
    if (!l || !l->data)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(l->data, (Py_ssize_t)l->len);
}

/* opens_looked(directory) -> did an earlier job of the node look for its opens ahead? */
static PyObject *trap_opens_looked(PyObject *self, PyObject *args)
{
    const char *d;
    Py_ssize_t dn;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#", &d, &dn))
        return NULL;
    return PyBool_FromLong(dn > 0 && dirmap_find(&opens_looked, d, (size_t)dn, 0) != NULL);
}

/* mirrored(directory): Python made its mirror. */
static PyObject *trap_mirrored(PyObject *self, PyObject *args)
{
    const char *d;
    Py_ssize_t dn;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#", &d, &dn))
        return NULL;
    if (handler && dn > 0 && !dirmap_find(&mirrored, d, (size_t)dn, 1))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* take_mirrored() -> [directory, ...]: those mirrored here since Python last asked. */
static PyObject *trap_take_mirrored(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    PyObject *out = strings_of(&mirror_notes, 0);
    mirror_notes.len = 0;
    return out;
}

/* Stage a directory's answers (`data`: `owned`, or in a table we hold); -1: out of memory
 * (`data` freed if owned). */
static int stage_dir(const char *d, size_t dn, const char *within, size_t wn, const char *data,
                     size_t len, int owned)
{
    staged_t *s = dn && len ? stg_find(d, dn, dir_hash(d, dn), 1) : NULL;
    if (s && !s->dir) {
        s->dir = malloc(dn);
        s->within = malloc(wn ? wn : 1);
        if (!s->dir || !s->within) { /* left with dn 0: never found */
            free(s->dir);
            free(s->within);
            s->dir = s->within = NULL;
            s = NULL;
        } else {
            memcpy(s->dir, d, dn);
            memcpy(s->within, within, wn);
            s->dn = dn;
            s->wn = wn;
            if (stg_norder == stg_order_cap) {
                size_t cap = stg_order_cap ? stg_order_cap * 2 : 1024;
                stg_ref_t *o = realloc(stg_order, cap * sizeof *o);
                if (!o)
                    s = NULL;
                else {
                    stg_order = o;
                    stg_order_cap = cap;
                }
            }
            if (s) {
                s->order = stg_norder;
                stg_order[stg_norder++] = (stg_ref_t){s->dir, s->dn, s->h};
            }
        }
    }
    if (!s) {
        if (owned)
            free((char *)data);
        return dn && len ? -1 : 0;
    }
    if (!s->data)
        stg_pending++;
    else if (s->owned)
        free((char *)s->data);
    s->data = data;
    s->len = len;
    s->owned = owned;
    return 0;
}

/* put_staged(directory) -> (n, listed directories, opens put), or None if the node had nothing
 * staged for it: its answers, and its opens if they were deferred (see put_table); a
 * directory put earlier gives (0, [directory], opens). */
static PyObject *trap_put_staged(PyObject *self, PyObject *args)
{
    const char *d;
    Py_ssize_t dn;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#", &d, &dn))
        return NULL;
    if (!handler) {
        PyErr_SetString(PyExc_RuntimeError, "worker._trap.put_staged outside a run");
        return NULL;
    }
    staged_t *s = stg_find(d, (size_t)dn, dir_hash(d, (size_t)dn), 0);
    dirmap_slot_t *o = dn > 0 ? dirmap_find(&opens_deferred, d, (size_t)dn, 0) : NULL;
    long n = o && o->data ? put_opens_of(o) : 0; /* (Python is about to open a file there) */
    if (!s && !o)
        Py_RETURN_NONE;
    if (s && !s->data) { /* put by a call that missed: its listing marker is in the cache */
        int listed = cache_get(C_LISTED, 0, d, (size_t)dn, fnv(C_LISTED, 0, d, (size_t)dn)) != 0;
        if (listed && (buf_add(&put_listed, d, (size_t)dn) < 0 || buf_add(&put_listed, "", 1) < 0))
            return PyErr_NoMemory();
    } else if (s) {
        long k = stage_put(s);
        if (k < 0)
            return PyErr_NoMemory();
        n += k;
    }
    if (n < 0)
        return PyErr_NoMemory();
    return put_result(n);
}

/* take_notes() -> [(object file, path), ...]: the opens put since Python last asked */
/* prefault(nbytes): a repository is being mounted and the node has answers for it: fault in
 * the in-process table and `nbytes` of its arena by a thread of their own, while the mount
 * reads the manifest and catalogs, so that putting the answers finds the memory ready. */
static PyObject *trap_prefault(PyObject *self, PyObject *args)
{
    Py_ssize_t n;
    (void)self;
    if (!PyArg_ParseTuple(args, "n", &n))
        return NULL;
    if (n > 0 && handler) /* during a run */
        fo_reserve_async((size_t)n * 2); /* what answers take in the arena, roughly */
    Py_RETURN_NONE;
}

static PyObject *trap_take_notes(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    PyObject *out = strings_of(&put_notes, 1);
    put_notes.len = 0;
    return out;
}

static PyObject *trap_forget(PyObject *self, PyObject *args)
{
    const char *k;
    Py_ssize_t n;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#", &k, &n))
        return NULL;
    int removed = 0;
    static const int variants[] = {0, F_NOFOLLOW, F_OPATH, F_NOFOLLOW | F_OPATH};
    for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++)
        removed += cache_del(C_OPEN, variants[i], k, (size_t)n);
    fo_withdraw(FO_OPEN, k, (size_t)n);
    return PyLong_FromLong(removed);
}

/* set_cmdline(title): what ps shows for this process (its argv area rewritten in place, as
 * setproctitle does); a forked node cache service is not the job that started it. */
static PyObject *trap_set_cmdline(PyObject *self, PyObject *args) {
    (void)self;
    const char *title;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y#", &title, &n)) return NULL;
    char buf[4096];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0) Py_RETURN_FALSE;
    ssize_t got = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (got <= 0) Py_RETURN_FALSE;
    buf[got] = 0;
    char *p = strrchr(buf, ')');
    if (!p) Py_RETURN_FALSE;
    p++;
    unsigned long long start = 0, end = 0;
    /* fields after "(comm)": the 3rd is the state; arg_start is the 48th, arg_end the 49th */
    for (int field = 3; field <= 49 && *p; field++) {
        while (*p == ' ') p++;
        char *next;
        unsigned long long v = strtoull(p, &next, 10);
        if (field == 48) start = v;
        if (field == 49) end = v;
        p = next;
        while (*p && *p != ' ') p++;
    }
    if (!start || end <= start + 1) Py_RETURN_FALSE;
    size_t room = (size_t)(end - start);
    size_t k = (size_t)n < room - 1 ? (size_t)n : room - 1;
    memcpy((void *)(uintptr_t)start, title, k);
    memset((void *)(uintptr_t)(start + k), 0, room - k);
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"put", trap_put, METH_VARARGS,
     "put([(cls, flags, key, answer), ...]) -> n: answers given before they are asked for"},
    {"pack", trap_pack, METH_VARARGS,
     "pack(items, prefix, uid, gid, dev) -> bytes: put()'s items for another job (put_table)"},
    {"put_table", trap_put_table, METH_VARARGS,
     "put_table(table, within, eager, prefix, uid, gid, dev, dirfd) -> (n, "
     "listed directories, opens) or None: a revision's answers from the node"},
    {"read_table", trap_read_table, METH_VARARGS,
     "read_table(table, within, eager) -> (put at once, staged, {directory: listing}, opens "
     "looked) or None: what put_table does with a table"},
    {"node_listing", trap_node_listing, METH_VARARGS,
     "node_listing(directory) -> bytes or None: the node's listing of a directory"},
    {"opens_looked", trap_opens_looked, METH_VARARGS,
     "opens_looked(directory) -> bool: did an earlier job look for its opens ahead?"},
    {"mirrored", trap_mirrored, METH_VARARGS, "mirrored(directory): Python made its mirror"},
    {"take_mirrored", trap_take_mirrored, METH_NOARGS,
     "take_mirrored() -> [directory, ...]: those mirrored in C since the last call"},
    {"put_staged", trap_put_staged, METH_VARARGS,
     "put_staged(directory) -> (n, listed directories, opens) or None"},
    {"prefault", trap_prefault, METH_VARARGS,
     "prefault(nbytes): fault in the in-process table for nbytes of answers, in a thread"},
    {"take_notes", trap_take_notes, METH_NOARGS,
     "take_notes() -> [(object file, path), ...] of the opens put since last asked"},
    {"forget", trap_forget, METH_VARARGS,
     "forget(path) -> n: drop the cached open answers for a /cvmfs path (tracer thread only)"},
    {"set_cmdline", trap_set_cmdline, METH_VARARGS,
     "set_cmdline(title: bytes) -> bool: what ps shows for this process"},
    {"run", trap_run, METH_VARARGS,
     "run(argv, env, mount, shadow, handler, spin_us=0, mode=2, in_process=1, io_uring=0,\n"
     "    rendered=shadow)\n"
     "  -> (status, exec_errno, stats)\n"
     "mode: 0 ptrace only, 1 seccomp user notification for hot calls, 2 1 where it is fast.\n"
     "Run argv under ptrace+seccomp; handler(tid, cls, flags, path) answers cache misses."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "worker._trap", "ptrace + seccomp trap loop for hep-exec", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__trap(void)
{
    return PyModule_Create(&module);
}
