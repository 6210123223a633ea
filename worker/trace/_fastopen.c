/*
 * In-process answers, the tracer's side (see _fastopen.h for why and the layout).
 *
 * - fo_init: one memfd holding the handler blob (setup.py embeds it), the header, the
 *   counters, the slot table and the arena; mapped read-write here.
 * - fo_publish / fo_withdraw* (_fastopen_table.c, the table that grows): the answers tracees
 *   may use by themselves: a /cvmfs path in normal form -> a path to open instead (a RAM file
 *   by name, a shadow directory), its stat/lstat answer, and a RAM file's (device, inode) ->
 *   what fstat of it says.
 * - fo_exec: at each exec stop, fo_setup (part of the blob) runs over the image's entry
 *   point and maps the memfd and a trampoline area into it (fork children inherit both).
 * - fo_patch: when a notified open or stat was answered from a published entry, its call
 *   site `mov $imm32,%r32; syscall` (glibc's wrappers) becomes a jump to a trampoline that
 *   calls the handler; fo_sigtrap covers threads that run into a site being patched.
 *
 * Everything here runs under the tracer's `big` lock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#include "_fastopen.h"
#include "_fastopen_blob.h"
#include "_fastopen_sup.h"

_Static_assert(sizeof(fo_blob) <= FO_CODE_MAX, "handler blob too large");
/* the layouts the handler reads and writes by offset (_fastopen_tracee.c, statx_of) */
_Static_assert(sizeof(struct stat) == 144 && offsetof(struct stat, st_ino) == 8 &&
                   offsetof(struct stat, st_nlink) == 16 && offsetof(struct stat, st_mode) == 24 &&
                   offsetof(struct stat, st_uid) == 28 && offsetof(struct stat, st_gid) == 32 &&
                   offsetof(struct stat, st_rdev) == 40 && offsetof(struct stat, st_size) == 48 &&
                   offsetof(struct stat, st_blocks) == 64 && offsetof(struct stat, st_atim) == 72 &&
                   offsetof(struct stat, st_mtim) == 88 && offsetof(struct stat, st_ctim) == 104,
               "struct stat is not the x86-64 layout the handler reads");
_Static_assert(sizeof(struct statx) == 256 && offsetof(struct statx, stx_blksize) == 4 &&
                   offsetof(struct statx, stx_nlink) == 16 && offsetof(struct statx, stx_uid) == 20 &&
                   offsetof(struct statx, stx_gid) == 24 && offsetof(struct statx, stx_mode) == 28 &&
                   offsetof(struct statx, stx_ino) == 32 && offsetof(struct statx, stx_size) == 40 &&
                   offsetof(struct statx, stx_blocks) == 48 &&
                   offsetof(struct statx, stx_attributes) == 8 &&
                   offsetof(struct statx, stx_attributes_mask) == 56 &&
                   offsetof(struct statx, stx_atime) == 64 &&
                   offsetof(struct statx, stx_ctime) == 96 &&
                   offsetof(struct statx, stx_mtime) == 112 &&
                   offsetof(struct statx, stx_rdev_major) == 128 &&
                   offsetof(struct statx, stx_dev_major) == 136,
               "struct statx is not the layout the handler writes");
_Static_assert(sizeof(fo_hdr_t) <= FO_PAGE, "header too large");
_Static_assert(FO_NSHARED * sizeof(fo_shared_t) <= FO_RW_SIZE - FO_PAGE &&
                   (FO_NSHARED & (FO_NSHARED - 1)) == 0,
               "shared files do not fit");

static int memfd = -1;
static char *shm; /* our read-write mapping */
static fo_hdr_t *hdr;
static fo_slot_t *slots; /* the table answers go to (_fastopen_table.c) */
static unsigned slot_bits, first_bits; /* its size; the smallest one a live answer was in */
static size_t nused, arena_used;
static unsigned long long n_patched, n_injected;
/* Tests only (HEP_EXEC_TEST_PATCH_PAUSE_US): a pause after the int3 of a site patched in a
 * parent is written, so that the parent, which runs meanwhile, forks a child that copies it
 * half-made (site_whole). */
static long patch_pause_us;
static int patching_parent;
/* ours only, one per slot that names a RAM file, in the order published (appended: a
 * table indexed by slot, 12 MiB touched at random, cost a page fault every few answers put):
 * the file's identity, to withdraw by file, its slot, and the next of these (+1; 0: none)
 * naming the same file */
static struct fo_file {
    uint64_t dev, ino;
    uint32_t slot, next;
} *files;
static size_t nfiles, cap_files;
/* (dev, ino) -> the last of `files` (+1) naming that file, open addressing: withdrawing one
 * file's answers follows its chain, not every slot that names a file (a tree with hundreds
 * of identical files withdraws often while answers are put) */
static uint32_t *file_heads;
static size_t nfile_heads, cap_file_heads;

/* Processes we injected into (key: thread-group id): where the mapping is, how much of the
 * trampoline area is used, the call sites patched (an int3 is briefly among their bytes:
 * see fo_sigtrap) and those found unpatchable (not tried again).  Sites of host calls are
 * patched too (seccomp_stop.c): a Python image patches ~10, so 64 leaves room for the
 * /cvmfs calls of programs with many wrappers of their own. */
#define FO_SITES 64
typedef struct {
    pid_t pid; /* 0 free, -1 tombstone */
    uint32_t tramp_used;
    uint64_t base;
    int nsites, nrefused;
    uint64_t sites[FO_SITES], refused[FO_SITES];
    uint32_t tramp_at[FO_SITES]; /* each site's trampoline, from base (site_whole) */
    uint64_t entry; /* the image's entry point (ld.so's, in a dynamic program) */
    int learn;      /* the learnt[] its entry's bytes match, or -1 */
} fo_proc_t;

/* Call sites near the entry point (ld.so's own: access, openat, fstat of each library), by
 * their offset from it, for images whose entry starts with the same bytes: patched at the
 * exec stop itself (learnt_patch), where each new process took a stop for each of them
 * before its first line of main (and a patch after it).  Each where the code around it is
 * still byte for byte what it was around the call that trapped (FO_LEARN_WIN bytes, the
 * site in the middle): the same function at the same place (static programs of one libc
 * share their entry's bytes, not the rest). */
#define FO_LEARN_SITES 16
#define FO_LEARN_NEAR (256 * 1024) /* ld.so's code around its entry */
#define FO_LEARN_WIN 64
static struct {
    int used, n;
    unsigned char sig[FO_SETUP_LEN];
    int64_t off[FO_LEARN_SITES];
    unsigned char win[FO_LEARN_SITES][FO_LEARN_WIN]; /* from site - FO_LEARN_WIN / 2 */
} learnt[2];
#define FO_PROCS (1u << 12)
static fo_proc_t *procs;

static fo_proc_t *proc_find(pid_t pid, int create)
{
    if (!procs)
        return NULL;
    fo_proc_t *tomb = NULL;
    for (uint32_t i = (uint32_t)pid * 2654435761u & (FO_PROCS - 1), k = 0; k < FO_PROCS;
         i = (i + 1) & (FO_PROCS - 1), k++) {
        if (procs[i].pid == pid)
            return &procs[i];
        if (procs[i].pid == -1 && !tomb)
            tomb = &procs[i];
        if (procs[i].pid == 0) {
            if (!create)
                return NULL;
            fo_proc_t *p = tomb ? tomb : &procs[i];
            memset(p, 0, sizeof *p);
            p->pid = pid;
            return p;
        }
    }
    if (create && tomb) {
        memset(tomb, 0, sizeof *tomb);
        tomb->pid = pid;
        return tomb;
    }
    return NULL;
}

/* The thread group of a thread (notifications and ptrace name threads): a small cache in
 * front of /proc/<tid>/status, entries dropped when the thread is gone. */
#define FO_TIDS 4096
static struct { pid_t tid, tgid; } tids[FO_TIDS];

static pid_t tgid_of(pid_t tid)
{
    unsigned i = (unsigned)tid & (FO_TIDS - 1);
    if (tids[i].tid == tid)
        return tids[i].tgid;
    char path[40], buf[512];
    snprintf(path, sizeof path, "/proc/%d/status", (int)tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    char *t = strstr(buf, "\nTgid:");
    if (!t)
        return -1;
    pid_t g = (pid_t)strtol(t + 6, NULL, 10);
    tids[i].tid = tid;
    tids[i].tgid = g;
    return g;
}

static fo_proc_t *proc_of_thread(pid_t tid)
{
    fo_proc_t *p = proc_find(tid, 0);
    if (p)
        return p;
    pid_t g = tgid_of(tid);
    return g > 0 && g != tid ? proc_find(g, 0) : NULL;
}

int fo_enabled(void)
{
    return shm != NULL;
}

uint64_t fo_cookie(void)
{
    return hdr ? hdr->cookie : 0;
}

static int given_fd = -1; /* a table file made ahead (fo_give_table): the next fo_init's */
static int table_given;   /* this run's table was one */

/* A table file for a later job, made and faulted in now, by the node's service while it is
 * idle: the pages the job's answers will need are allocated here, not when the job starts,
 * where after a few idle seconds on a VM each fresh page costs the host a fault too (a warm
 * job's put of the node's 9 MiB of answers: 3.8 ms back to back, 24 ms after 3 s idle).
 * `answers`: how many the job will likely put (the table's size), `arena`: their bytes.  On
 * the tmpfs of `dir` (huge pages), else a memfd; never written here, so all zeros.  The fd,
 * or -errno. */
int fo_make_table(const char *dir, size_t answers, size_t arena)
{
    int fd = dir ? open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600) : -1;
    if (fd < 0)
        fd = (int)syscall(SYS_memfd_create, "hep-exec-fastopen", MFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    char *m = MAP_FAILED;
    if (ftruncate(fd, (off_t)FO_SIZE) == 0)
        m = mmap(NULL, FO_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
        int e = errno;
        close(fd);
        return -e;
    }
    unsigned bits = FO_MIN_BITS;
    while (bits < FO_MAX_BITS && answers * 2 > (1ul << bits))
        bits++;
    if (arena > FO_ARENA_SIZE)
        arena = FO_ARENA_SIZE;
    madvise(m, FO_TABLE_OFF(FO_MIN_BITS + 1), MADV_POPULATE_WRITE); /* header, first table */
    if (bits > FO_MIN_BITS)
        madvise(m + FO_TABLE_OFF(bits), sizeof(fo_slot_t) << bits, MADV_POPULATE_WRITE);
    madvise(m + FO_ARENA_OFF, (arena + FO_PAGE - 1) & ~(FO_PAGE - 1), MADV_POPULATE_WRITE);
    munmap(m, FO_SIZE);
    return fd;
}

/* The next fo_init uses this table file (-1: none), and closes it; unused, the next
 * fo_give_table or the end of the run does. */
void fo_give_table(int fd)
{
    if (given_fd >= 0)
        close(given_fd);
    given_fd = fd;
}

int fo_table_given(void)
{
    return table_given;
}

static void note_host_dirs(void);

int fo_init(const char *mount, size_t mount_n, const char *table_dir)
{
    const char *pause = getenv("HEP_EXEC_TEST_PATCH_PAUSE_US");
    patch_pause_us = pause ? atol(pause) : 0;
    if (shm)
        return 0;
    if (mount_n >= sizeof hdr->mount)
        return -ENAMETOOLONG;
    /* one made ahead by the node's service (fo_make_table): its pages are there already */
    int fd = given_fd;
    struct stat gst;
    given_fd = -1;
    if (fd >= 0 && (fstat(fd, &gst) != 0 || !S_ISREG(gst.st_mode) ||
                    gst.st_size != (off_t)FO_SIZE || gst.st_blocks == 0)) {
        close(fd);
        fd = -1;
    }
    table_given = fd >= 0;
    /* an unnamed file on the shadow tree's tmpfs, which has huge pages where a memfd gets
     * 4 KiB ones: putting a node's 20,000 answers into a fresh table faulted in ~6,000 pages
     * (20 ms); a dozen huge pages, and fewer TLB misses for every lookup in the tracees */
    if (fd < 0 && table_dir) { /* named, then unlinked: /proc/<pid>/maps says whose it is (and no tracee
                      * runs yet that could list the directory meanwhile) */
        int dfd = open(table_dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            fd = openat(dfd, "hep-exec-fastopen", O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
            if (fd >= 0 && unlinkat(dfd, "hep-exec-fastopen", 0) != 0) {
                close(fd);
                fd = -1;
            }
            close(dfd);
        }
    }
    if (fd < 0)
        fd = (int)syscall(SYS_memfd_create, "hep-exec-fastopen", MFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    memfd = fd;
    char *m = MAP_FAILED;
    if (ftruncate(fd, (off_t)FO_SIZE) == 0)
        m = mmap(NULL, FO_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    shm = m == MAP_FAILED ? NULL : m;
    procs = calloc(FO_PROCS, sizeof *procs);
    uint64_t cookie = 0;
    if (!shm || !procs || getrandom(&cookie, sizeof cookie, 0) != sizeof cookie ||
        !cookie) {
        int e = !shm ? errno : ENOMEM;
        fo_fini();
        return -e;
    }
    memcpy(shm, fo_blob, sizeof fo_blob);
    hdr = (fo_hdr_t *)(shm + FO_HDR_OFF);
    slot_bits = first_bits = hdr->slot_bits = FO_MIN_BITS;
    slots = (fo_slot_t *)(shm + FO_TABLE_OFF(slot_bits));
    hdr->magic = FO_MAGIC;
    hdr->cookie = cookie;
    hdr->epoch = 1;
    hdr->mount_len = (uint32_t)mount_n;
    hdr->uid = (uint32_t)getuid();
    memcpy(hdr->mount, mount, mount_n);
    struct stat mst;
    hdr->host_writes = lstat(hdr->mount, &mst) != 0 && errno == ENOENT;
    note_host_dirs();
    nused = arena_used = 0;
    n_patched = n_injected = 0;
    return 0;
}

#include "_fastopen_table.c"
#include "_fastopen_host_dirs.c"

/* Where the shadow tree is, for getcwd in-process (a path too long for the header: the
 * tracer's).  After fo_init, before any tracee maps the table. */
void fo_set_shadow(const char *shadow, size_t n, uint64_t dev)
{
    if (!shm || n >= sizeof hdr->shadow)
        return;
    hdr->shadow_dev = dev;
    memcpy(hdr->shadow, shadow, n);
    hdr->shadow[n] = 0;
    hdr->shadow_len = (uint32_t)n;
}

/* Directories of RAM files that open answers name ("/proc/<us>/fd/<n>/<name>"): tracees
 * exec'd from now on open their files with openat on an fd of their own (fo_priv_t).  After
 * fo_init; a directory that does not fit, or one too many, keeps the walk through /proc. */
void fo_add_object_dir(const char *dir, size_t n)
{
    while (n && dir[n - 1] == '/')
        n--;
    if (!shm || !n || n >= sizeof hdr->dirs[0])
        return;
    for (int i = 0; i < FO_DIRS; i++) {
        if (hdr->dir_len[i] == n && memcmp(hdr->dirs[i], dir, n) == 0)
            return;
        if (!hdr->dir_len[i]) {
            memcpy(hdr->dirs[i], dir, n);
            hdr->dirs[i][n] = 0;
            __atomic_store_n(&hdr->dir_len[i], (uint32_t)n, __ATOMIC_RELEASE);
            return;
        }
    }
}

void fo_fini(void)
{
    memset(learnt, 0, sizeof learnt);
    populated_bits = 0;
    n_moves = 0;
    if (shm)
        munmap(shm, FO_SIZE);
    if (memfd >= 0)
        close(memfd);
    free(procs);
    free(files);
    nfiles = cap_files = 0;
    free(file_heads);
    file_heads = NULL;
    nfile_heads = cap_file_heads = 0;
    shm = NULL;
    hdr = NULL;
    slots = NULL;
    procs = NULL;
    files = NULL;
    memfd = -1;
}

int fo_host_writes(void)
{
    return shm && hdr->host_writes;
}

void fo_add_ram_dev(uint64_t dev)
{
    if (!shm)
        return;
    for (int i = 0; i < 4; i++) {
        if (hdr->ram_devs[i] == dev)
            return;
        if (!hdr->ram_devs[i]) {
            __atomic_store_n(&hdr->ram_devs[i], dev, __ATOMIC_RELEASE);
            return;
        }
    }
    __atomic_store_n(&hdr->ram_devs_full, 1, __ATOMIC_RELEASE);
}


/* ---------- files that serve paths with different answers ---------- */

#include "_fastopen_shared.c"

void fo_counts(unsigned long long *hits, unsigned long long *misses,
               unsigned long long *stat_hits, unsigned long long *stat_misses,
               unsigned long long *patched, unsigned long long *injected,
               unsigned long long *host)
{
    fo_counters_t *c = shm ? (fo_counters_t *)(shm + FO_CNT_OFF) : NULL;
    *host = c ? __atomic_load_n(&c->host, __ATOMIC_RELAXED) : 0;
    *hits = c ? __atomic_load_n(&c->hits, __ATOMIC_RELAXED) : 0;
    *misses = c ? __atomic_load_n(&c->misses, __ATOMIC_RELAXED) : 0;
    *stat_hits = c ? __atomic_load_n(&c->stat_hits, __ATOMIC_RELAXED) : 0;
    *stat_misses = c ? __atomic_load_n(&c->stat_misses, __ATOMIC_RELAXED) : 0;
    *patched = n_patched;
    *injected = n_injected;
}

/* ---------- injection at exec ---------- */

static void learnt_patch(int fd, fo_proc_t *p, const unsigned char *sig);

/*
 * At an exec stop: copy fo_setup (from the blob) over the new image's entry point, run it
 * with its arguments below the stack pointer, and put everything back at its int3.  Execve's
 * return value lands in rax when the tracee resumes, which fo_setup does not read.  Returns 1
 * when the tracee stopped for something else meanwhile (or died): its waitpid status is in
 * *other for the caller to handle; the process then goes on without the handler.
 */
int fo_exec(pid_t pid, int *other)
{
    fo_proc_t *p = proc_find(pid, 0);
    if (p)
        p->pid = -1; /* the old image's mapping is gone */
    tids[(unsigned)pid & (FO_TIDS - 1)].tid = 0;
    *other = -1;
    if (!shm)
        return 0;
    struct user_regs_struct saved, r;
    if (ptrace(PTRACE_GETREGS, pid, 0, &saved) != 0 || saved.cs != 0x33)
        return 0; /* a 32-bit program (cs 0x23): no `syscall` there, and no /cvmfs */
    saved.rax = 0; /* what execve returns: the registers put back are the image's first */
    char mem[40], path[64];
    snprintf(mem, sizeof mem, "/proc/%d/mem", (int)pid);
    int pn = snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)getpid(), memfd) + 1;
    unsigned char orig[FO_SETUP_LEN];
    unsigned long entry = (unsigned long)saved.rip;
    int mfd = open(mem, O_RDWR | O_CLOEXEC);
    if (mfd < 0)
        return 0;
    if (pread(mfd, orig, sizeof orig, (off_t)entry) != (ssize_t)sizeof orig ||
        pwrite(mfd, fo_blob + FO_SETUP_OFF, sizeof orig, (off_t)entry) != (ssize_t)sizeof orig) {
        pwrite(mfd, orig, sizeof orig, (off_t)entry); /* a partial write, if any */
        close(mfd);
        return 0;
    }
    /* below the red zone: the path, then the arguments; rsp as after a call */
    unsigned long at = ((unsigned long)saved.rsp - 256 - (unsigned long)pn) & ~15UL;
    unsigned long args = (at - sizeof(fo_setup_t)) & ~15UL;
    fo_setup_t a = {.path = at, .cookie = hdr->cookie, .fd = -1, .base = -1, .tramp = -1,
                    .prot = -1, .counters = -1, .tprot = -1};
    struct iovec l[2] = {{path, (size_t)pn}, {&a, sizeof a}};
    struct iovec rv[2] = {{(void *)at, (size_t)pn}, {(void *)args, sizeof a}};
    r = saved;
    r.rip = entry;
    r.rdi = args;
    r.rsp = args - 64 - 8;
    r.orig_rax = (unsigned long long)-1;
    int st = 0, ok = process_vm_writev(pid, l, 2, rv, 2, 0) == (ssize_t)(pn + sizeof a) &&
                     ptrace(PTRACE_SETREGS, pid, 0, &r) == 0 && ptrace(PTRACE_CONT, pid, 0, 0) == 0;
    if (ok) {
        pid_t w;
        while ((w = waitpid(pid, &st, __WALL)) < 0 && errno == EINTR) {}
        if (w != pid) {
            ok = 0;
        } else if (!WIFSTOPPED(st) || WSTOPSIG(st) != SIGTRAP || (st >> 16) != 0) {
            *other = st; /* a signal, a group-stop, its death: the caller's to handle */
            ok = 0;
        }
    }
    if (*other >= 0 && !WIFSTOPPED(*other)) {
        close(mfd);
        return 1; /* gone: nothing to restore */
    }
    struct iovec back = {&a, sizeof a}, from = {(void *)args, sizeof a};
    ok = ok && process_vm_readv(pid, &back, 1, &from, 1, 0) == (ssize_t)sizeof a && a.fd >= 0 &&
         (unsigned long)a.base < -4096UL && a.tramp == a.base + (long)FO_SIZE && a.prot == 0 &&
         a.counters == a.base + (long)FO_CNT_OFF && a.tprot == 0;
    pwrite(mfd, orig, sizeof orig, (off_t)entry);
    ptrace(PTRACE_SETREGS, pid, 0, &saved);
    if (ok) {
        p = proc_find(pid, 1);
        if (p) {
            p->base = (uint64_t)a.base;
            p->entry = entry;
            p->learn = -1;
            n_injected++;
            if (*other < 0)
                learnt_patch(mfd, p, orig);
        }
    }
    close(mfd);
    return *other >= 0;
}

void fo_fork(pid_t parent, pid_t child)
{
    fo_proc_t *p = proc_of_thread(parent);
    if (!p)
        return;
    fo_proc_t copy = *p;
    fo_proc_t *c = proc_find(child, 1);
    if (c) {
        *c = copy;
        c->pid = child;
    }
}

void fo_gone(pid_t tid)
{
    fo_proc_t *p = proc_find(tid, 0);
    if (p)
        p->pid = -1;
    unsigned i = (unsigned)tid & (FO_TIDS - 1);
    if (tids[i].tid == tid)
        tids[i].tid = 0;
}

/* ---------- patching call sites ---------- */

static int listed(const uint64_t *v, int n, uint64_t x)
{
    for (int i = 0; i < n; i++)
        if (v[i] == x)
            return 1;
    return 0;
}

/* Do these 7 bytes before a trapped call's return address make call nr, patchably?  A
 * `mov $imm32,%r32; syscall`: to eax naming nr itself, or to edx, esi or edi (no stack, no
 * RIP; the number set before, as the trap says). */
static int site_code_ok(const unsigned char *code, long nr)
{
    if (code[5] != 0x0f || code[6] != 0x05)
        return 0;
    if (code[0] == 0xb8) {
        int32_t imm;
        memcpy(&imm, code + 1, 4);
        return imm == nr;
    }
    return code[0] == 0xba || code[0] == 0xbe || code[0] == 0xbf;
}

/*
 * The site's trampoline and jump, written through fd (the process's /proc/<pid>/mem).  The
 * 5-byte `mov $imm32,%r32` before the syscall instruction becomes `jmp trampoline`; the
 * syscall instruction stays, so a thread stopped between the two (the mov done) still makes
 * its call the old way.  Other threads may run the site meanwhile (unless `alone`), so the
 * bytes change as the kernel's text_poke_bp does: int3 first, then the jump's offset, then
 * its opcode; a thread hitting the int3 stops in the tracer, which sends it back to the site
 * (fo_sigtrap) once the jump is complete.  0: not patched (no room, too far).
 */
enum { TLEN = 5 + 5 + 10 + 3 + 8 + 5 }; /* a trampoline (write_site), its last 5: jmp back */

/* Over the int3 at a site: the jump's offset, then its opcode (a thread meeting the int3
 * meanwhile waits in the tracer: fo_sigtrap). */
static int finish_jump(int fd, uint64_t site, const unsigned char *jmp)
{
    return pwrite(fd, jmp + 1, 4, (off_t)site + 1) == 4 && pwrite(fd, jmp, 1, (off_t)site) == 1;
}

/* (HEP_EXEC_TEST_PATCH_PAUSE_US, for a parent's site) */
static int paused(void)
{
    if (patch_pause_us > 0 && patching_parent)
        usleep((useconds_t)patch_pause_us);
    return 1;
}

static int write_site(int fd, fo_proc_t *p, uint64_t site, const unsigned char *code, int alone)
{
    uint64_t t = p->base + FO_SIZE + FO_PRIV_SIZE + p->tramp_used; /* after the fo_priv_t */
    int64_t to_t = (int64_t)(t - (site + 5)), back = (int64_t)((site + 7) - (t + TLEN));
    if (FO_PRIV_SIZE + p->tramp_used + TLEN > FO_TRAMP_SIZE || to_t != (int32_t)to_t ||
        back != (int32_t)back || p->nsites >= FO_SITES)
        return 0;
    unsigned char tr[TLEN], *q = tr;
    memcpy(q, code, 5); /* the mov it displaces */
    q += 5;
    memcpy(q, "\x48\x8d\x64\x24\x80", 5); /* lea -128(%rsp),%rsp: keep off the red zone */
    q += 5;
    q[0] = 0x49; /* movabs $fo_entry,%r11 (syscalls clobber r11 anyway) */
    q[1] = 0xbb;
    memcpy(q + 2, &p->base, 8);
    q += 10;
    memcpy(q, "\x41\xff\xd3", 3); /* call *%r11 */
    q += 3;
    memcpy(q, "\x48\x8d\xa4\x24\x80\x00\x00\x00", 8); /* lea 128(%rsp),%rsp */
    q += 8;
    int32_t rel = (int32_t)back;
    q[0] = 0xe9; /* jmp back, past the syscall instruction */
    memcpy(q + 1, &rel, 4);
    if (pwrite(fd, tr, TLEN, (off_t)t) != TLEN)
        return 0;
    p->tramp_used += (TLEN + 15) & ~15u;
    p->tramp_at[p->nsites] = (uint32_t)(t - p->base);
    p->sites[p->nsites++] = site; /* from the int3 on, fo_sigtrap knows it */
    unsigned char jmp[5] = {0xe9};
    rel = (int32_t)to_t;
    memcpy(jmp + 1, &rel, 4);
    if (alone ? pwrite(fd, jmp, 5, (off_t)site) == 5
              : pwrite(fd, "\xcc", 1, (off_t)site) == 1 && paused() && finish_jump(fd, site, jmp))
        return 1;
    pwrite(fd, code, 5, (off_t)site); /* put the mov back */
    return 0;
}

/* Is this site one to learn: near the entry of a process whose entry matched learnt[k]? */
static int learnable(const fo_proc_t *p, uint64_t site)
{
    int64_t off = (int64_t)(site - p->entry);
    return p->learn >= 0 && off > -FO_LEARN_NEAR && off < FO_LEARN_NEAR;
}

/* A learnable site, patched: remembered by its offset, with the code around it (win). */
static void learn_site(const fo_proc_t *p, uint64_t site, const unsigned char *win)
{
    int64_t off = (int64_t)(site - p->entry);
    __typeof__(learnt[0]) *l = &learnt[p->learn];
    for (int i = 0; i < l->n; i++)
        if (l->off[i] == off)
            return;
    if (l->n < FO_LEARN_SITES) {
        l->off[l->n] = off;
        memcpy(l->win[l->n++], win, FO_LEARN_WIN);
    }
}

/* At the exec stop (the process alone, stopped): the learnt sites of its entry's kind
 * patched now, each where the code around it is still what it was. */
static void learnt_patch(int fd, fo_proc_t *p, const unsigned char *sig)
{
    p->learn = -1;
    for (int k = 0; k < 2 && p->learn < 0; k++) {
        if (!learnt[k].used) {
            learnt[k].used = 1;
            memcpy(learnt[k].sig, sig, FO_SETUP_LEN);
        }
        if (!memcmp(learnt[k].sig, sig, FO_SETUP_LEN))
            p->learn = k;
    }
    if (p->learn < 0)
        return;
    __typeof__(learnt[0]) *l = &learnt[p->learn];
    for (int i = 0; i < l->n; i++) {
        uint64_t site = p->entry + (uint64_t)l->off[i];
        unsigned char win[FO_LEARN_WIN];
        if (pread(fd, win, sizeof win, (off_t)(site - FO_LEARN_WIN / 2)) == sizeof win &&
            !memcmp(win, l->win[i], sizeof win) &&
            write_site(fd, p, site, win + FO_LEARN_WIN / 2, 1))
            n_patched++;
    }
}

/* A trapped call's site (ip: after its syscall instruction) patched to call the handler, in
 * the process of thread tid, if the handler answers nr there. */
void fo_patch(pid_t tid, long nr, uint64_t ip)
{
    switch (nr) { /* what the handler answers */
    case 2: case 257: case 4: case 5: case 6: case 262: case 332: case 21: case 269: case 439:
    case 89: case 267: case 191: case 192: case 194: case 195: case 79 /* getcwd */:
    case 217 /* getdents64 */:
        break;
    case 85: case 76: case 83: case 84: case 87: case 90: case 92: case 94: case 132:
    case 235: case 133: case 188: case 189: case 197: case 198: case 82: case 86: case 91:
    case 93: case 190: case 199: case 88: case 266: case 264: case 316: case 265: case 258:
    case 263: case 268: case 452: case 260: case 261: case 280: case 259: case 59 /* execve */:
        if (hdr && hdr->host_writes)
            break; /* writes on host paths (_fastopen_tracee_writes.c write_args) */
        return;
    default:
        return;
    }
    fo_proc_t *p = proc_of_thread(tid);
    if (!p || ip < 7 || (ip >= p->base && ip < p->base + FO_SIZE + FO_TRAMP_SIZE))
        return;
    uint64_t site = ip - 7;
    if (listed(p->sites, p->nsites, site) || listed(p->refused, p->nrefused, site))
        return;
    unsigned char code[7];
    struct iovec l = {code, 7}, rv = {(void *)site, 7};
    int ok = process_vm_readv(tid, &l, 1, &rv, 1, 0) == 7 && site_code_ok(code, nr);
    char mem[40];
    snprintf(mem, sizeof mem, "/proc/%d/mem", (int)tid);
    int fd = ok ? open(mem, O_RDWR | O_CLOEXEC) : -1;
    unsigned char win[FO_LEARN_WIN]; /* the code around it, before the patch */
    int learn = fd >= 0 && learnable(p, site) &&
                pread(fd, win, sizeof win, (off_t)(site - FO_LEARN_WIN / 2)) == sizeof win;
    if (fd >= 0 && write_site(fd, p, site, code, 0)) {
        n_patched++;
        if (learn)
            learn_site(p, site, win);
    } else if (p->nrefused < FO_SITES) {
        p->refused[p->nrefused++] = site;
    }
    if (fd >= 0)
        close(fd);
}

/*
 * Is the jump at p's k-th site whole in the memory of thread tid's process?  Made so if it is
 * not: the process is a fork child of one whose site was being patched when it forked (the
 * execve site is patched in the parent of the child that trapped there, while that parent
 * runs: a shell starting a pipeline forks again meanwhile), so its copy of the code has the
 * int3, maybe the jump's offset, and its parent finished the jump in its own memory only; the
 * child's threads met the int3 again after each fo_sigtrap, for ever.  Under `big`, so no
 * patch is under way meanwhile: an int3 seen here was left half-made.  The trampoline was
 * written before the int3, so the copy holds it.
 */
static int site_whole(pid_t tid, const fo_proc_t *p, int k)
{
    uint64_t site = p->sites[k];
    unsigned char op = 0;
    struct iovec l = {&op, 1}, rv = {(void *)site, 1};
    if (process_vm_readv(tid, &l, 1, &rv, 1, 0) != 1 || op != 0xcc)
        return 1;
    unsigned char jmp[5] = {0xe9};
    int32_t rel = (int32_t)(int64_t)(p->base + p->tramp_at[k] - (site + 5));
    memcpy(jmp + 1, &rel, 4);
    char mem[40];
    snprintf(mem, sizeof mem, "/proc/%d/mem", (int)tid);
    int fd = open(mem, O_RDWR | O_CLOEXEC);
    int ok = fd >= 0 && finish_jump(fd, site, jmp);
    if (fd >= 0)
        close(fd);
    return ok;
}

void fo_patch_parent(pid_t parent, long nr, uint64_t ip)
{
    patching_parent = 1;
    fo_patch(parent, nr, ip);
    patching_parent = 0;
}

/* Does thread tid's memory hold p's k-th trampoline, the one that jumps back past that site? */
static int tramp_of_site(pid_t tid, const fo_proc_t *p, int k)
{
    uint64_t t = p->base + p->tramp_at[k], site = p->sites[k];
    unsigned char back[5];
    struct iovec l = {back, 5}, rv = {(void *)(t + TLEN - 5), 5};
    if (process_vm_readv(tid, &l, 1, &rv, 1, 0) != 5 || back[0] != 0xe9)
        return 0;
    int32_t rel;
    memcpy(&rel, back + 1, 4);
    return (int64_t)rel == (int64_t)((site + 7) - (t + TLEN));
}

/* A SIGTRAP stop of thread tid: one of our int3s, met while its site was being patched?
 * Then the thread goes back to the site (now the jump) and the signal is dropped. */
int fo_sigtrap(pid_t tid)
{
    if (!procs)
        return 0;
    fo_proc_t *p = proc_of_thread(tid);
    siginfo_t si;
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETSIGINFO, tid, 0, &si) != 0 || si.si_code != SI_KERNEL ||
        ptrace(PTRACE_GETREGS, tid, 0, &r) != 0)
        return 0;
    uint64_t site = r.rip - 1;
    int ours = 0;
    for (int k = 0; p && k < p->nsites && !ours; k++)
        ours = p->sites[k] == site && site_whole(tid, p, k);
    if (!ours && !p) {
        /* a task sharing the memory of a process we patch without being one of its threads
         * (a vfork child, clone with CLONE_VM alone): any process's site, if our jump is there
         * now, or its half-made copy (site_whole) where this memory holds the trampoline for
         * it: a vfork child of a process that copied the int3 from its parent met it first */
        unsigned char op = 0;
        struct iovec l = {&op, 1}, rv = {(void *)site, 1};
        for (uint32_t i = 0; i < FO_PROCS && !ours; i++)
            for (int k = 0; procs[i].pid > 0 && k < procs[i].nsites && !ours; k++)
                ours = procs[i].sites[k] == site && tramp_of_site(tid, &procs[i], k) &&
                       site_whole(tid, &procs[i], k);
        ours = ours && process_vm_readv(tid, &l, 1, &rv, 1, 0) == 1 && op == 0xe9;
    }
    if (!ours)
        return 0;
    r.rip = site;
    return ptrace(PTRACE_SETREGS, tid, 0, &r) == 0;
}
