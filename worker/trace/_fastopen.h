/*
 * In-process answers: the layout shared by the code that runs inside tracees
 * (worker/trace/_fastopen_tracee.c, copied into each of them) and the tracer
 * (worker/trace/_fastopen.c).
 *
 * Why: in notify mode every open or stat of a /cvmfs path costs two context switches (and
 * an ADDFD for opens): 10-12 µs on a VM, against 38 µs to read 1 MiB.  Once the tracer has
 * answered a path, the answer (a RAM file by name or a shadow directory to open, a struct
 * stat, an errno) is published in a table that every tracee maps read-only, and the libc
 * call site that trapped is patched to call a small handler in the tracee instead: the next
 * open of that path is one openat of the RAM file in the tracee itself, the next stat a
 * copy, with no stop and no signal.
 *
 * One memfd, mapped at the same offsets in the tracer (read-write) and in each tracee:
 *   [code: the handler blob, r-x] [header, r--] [counters, shared files: rw-] [slots, r--]
 *   [arena, r--]
 * followed, in tracees only, by a private anonymous area for per-site trampolines (r-x,
 * written by the tracer through /proc/<pid>/mem).
 */
#ifndef HEP_FASTOPEN_H
#define HEP_FASTOPEN_H

#include <stdint.h>

#define FO_PAGE 4096ul
#define FO_CODE_MAX (6 * FO_PAGE) /* the blob: 19.9 KiB (2026-12-07), room to grow */
#define FO_HDR_OFF FO_CODE_MAX
#define FO_CNT_OFF (FO_HDR_OFF + FO_PAGE)
#define FO_SHARED_OFF (FO_CNT_OFF + FO_PAGE) /* fo_shared_t[FO_NSHARED] */
#define FO_NSHARED 1024ul
#define FO_RW_SIZE (FO_PAGE + 6 * FO_PAGE) /* what tracees map writable: counters, shared */
#define FO_SLOTS_OFF (FO_CNT_OFF + FO_RW_SIZE)
/* The answers' table: 1 << hdr->slot_bits slots (linear probing, at most half of them used),
 * FO_MIN_BITS to FO_MAX_BITS.  When it fills up, the next size up takes its live answers and
 * the header then names it; each size has a place of its own, one after the other, so a
 * lookup already in a smaller one still reads what it read (sparse: only the sizes a run
 * uses take memory, where one table of the biggest size cost every job 20 MiB of fresh
 * pages, ~40-80 ms of a CPU on a VM). */
#define FO_MIN_BITS 10 /* 40 KiB: a job that learns a few answers grows it in steps */
#define FO_MAX_BITS 19
#define FO_TABLE_OFF(bits) \
    (FO_SLOTS_OFF + ((1ul << (bits)) - (1ul << FO_MIN_BITS)) * sizeof(fo_slot_t))
#define FO_ARENA_OFF FO_TABLE_OFF(FO_MAX_BITS + 1)
#define FO_ARENA_SIZE (128ul << 20) /* sparse: pages are used as answers come */
#define FO_SIZE (FO_ARENA_OFF + FO_ARENA_SIZE)
#define FO_TRAMP_SIZE (64 * 1024ul)
#define FO_DIRS 2
#define FO_PLAIN_DEVS 8
#define FO_NEAR_DIRS 8
#define FO_MAGIC 0x6e65706f74736166ull /* "fastopen" */

/* What a slot answers.  Keys are mount paths in normal form, or for FO_IDENT the 16 bytes
 * (st_dev, st_ino) of a RAM file; the kind is hashed in. */
enum {
    FO_OPEN = 1,       /* open: the target path to open instead, or an errno */
    FO_STAT = 2,       /* stat following symlinks: a struct stat, an errno, or a path to stat */
    FO_LSTAT = 3,      /* the same, not following the last component */
    FO_IDENT = 4,      /* fstat of an fd on this RAM file: a struct stat (a directory's
                        * mirror: then its /cvmfs path, NUL-terminated, for getdents64) */
    /* 5, 6: none (statx is answered from FO_STAT, FO_LSTAT: one answer for both calls) */
    FO_READLINK = 7,   /* readlink: the link's bytes (data_len of them), or an errno */
    FO_XATTR = 8,      /* getxattr of any name (+1: lgetxattr): an errno (no attributes) */
    FO_XATTR_LIST = 10, /* listxattr (+1: llistxattr): 0 (none), or an errno */
    FO_NOXATTR = 12,   /* a directory whose entries have no xattrs but those published:
                        * present or not (xattr calls on entries with a published lstat) */
    FO_LISTED = 13,    /* a directory each of whose names is published (FO_NAMED): any other
                        * name in it does not exist (published after its names) */
    FO_NAMED = 14,     /* a name a listed directory has */
    FO_ACCESS = 16,    /* + mode (0-7) + 8 for AT_SYMLINK_NOFOLLOW: an errno (0: allowed) or a
                        * path to ask instead */
};

/* A published answer: key and data in the arena (8-byte aligned).  data_len 0: the answer is
 * -err; is_path: a NUL-terminated path to make the call on instead; else a struct stat
 * (144 bytes) or a symlink's target.  A slot is filled before its hash is stored (release) and never reused;
 * it is live while `epoch` equals the header's (withdrawing one answer zeroes it,
 * withdrawing all bumps the header's).  stat_at: for an open of a shared file (fo_shared_t),
 * where in the data (after the path) the path's struct stat is; 0: none. */
typedef struct {
    uint64_t hash; /* 0 = empty */
    uint32_t key_off, key_len, data_off, epoch;
    uint16_t kind, is_path;
    int32_t err;
    uint32_t data_len, stat_at;
} fo_slot_t;

/* A RAM file that serves several paths with different stat answers (an empty file, a licence
 * in many packages): fstat of an fd on it says the stat of the path opened last, by the
 * tracer or in-process, wherever that was.  The tracer adds an entry (dev, ino: written
 * once, ino last, release) before it publishes opens of the file, each with its path's stat
 * (stat_at); whoever opens it then stores `last`: the header's epoch << 32 | the arena
 * offset of that struct stat (0: none).  Open addressing by fo_file_hash; an entry is never
 * removed (a stale `last` has another epoch). */
typedef struct {
    uint64_t dev, ino, last;
} fo_shared_t;

/* A RAM file's (device, inode), hashed: the shared files here, the tracer's tables of files
 * (worker/trace/_fastopen.c file_heads, worker/trace/trap/fstat.c ids). */
static inline uint64_t fo_file_hash(uint64_t dev, uint64_t ino)
{
    return ((ino ^ dev << 40) * 0x9E3779B97F4A7C15ull) >> 20;
}

typedef struct {
    uint64_t magic;
    uint64_t cookie; /* openat with this in its 6th argument passes the filter */
    uint32_t epoch;
    uint32_t slot_bits; /* the table's size (FO_TABLE_OFF): read it (acquire) before a lookup */
    uint32_t mount_len;
    char mount[256]; /* "/cvmfs" */
    /* st_dev of every file system holding files the tracer answers fstat for (our RAM
     * files; 0: unused).  fstat of anything else is the kernel's answer. */
    uint64_t ram_devs[4];
    uint32_t ram_devs_full; /* more than that: every fstat goes to the tracer */
    uint32_t uid;           /* the tracer's (access(2) answers from a published stat) */
    /* the shadow tree as /proc/<pid>/cwd spells it (0: getcwd is the tracer's): a cwd there
     * stands for the same place under `mount` */
    uint32_t shadow_len;
    char shadow[1024];
    uint64_t shadow_dev; /* its st_dev (0: unknown): getdents64 of a directory there */
    /* directories of RAM files as open answers name them ("/proc/<tracer>/fd/<n>", no
     * trailing slash; dir_len 0: unused): each tracee holds an O_PATH fd of its own on each
     * (fo_priv_t) and opens "<dir>/<name>" with openat(fd, name), ~2 µs less than the
     * kernel's walk through /proc */
    uint32_t dir_len[FO_DIRS];
    char dirs[FO_DIRS][64];
    /* 1: the mount does not exist on the host (fo_init), so no host path can reach it and
     * the handler makes writes on host paths itself (_fastopen_tracee_writes.c) */
    uint32_t host_writes;
    /* a relative call from a host directory on one of these file systems (st_dev; 0: unused),
     * other than near_dirs (st_dev, st_ino), is made as the program gave it, with no readlink
     * of the directory (_fastopen_host_dirs.c) */
    uint64_t plain_devs[FO_PLAIN_DEVS];
    uint64_t near_dirs[FO_NEAR_DIRS][2];
} fo_hdr_t;

/* A tracee's own: the first FO_PRIV_SIZE bytes of its (private) trampoline area, written by
 * fo_setup.  fork children inherit it with the fds it names. */
typedef struct {
    int32_t dir_fd[FO_DIRS]; /* -1: none (the open goes through /proc) */
} fo_priv_t;
#define FO_PRIV_SIZE 64

typedef struct {
    uint64_t hits;   /* opens done in-process */
    uint64_t misses; /* opens from patched sites handed on to the tracer */
    uint64_t stat_hits, stat_misses; /* the same for stat, lstat, fstat */
    uint64_t host;   /* calls on host paths made here, which the tracer would let through */
} fo_counters_t;

/* fo_setup's arguments and results (in the tracee's stack, below its red zone). */
typedef struct {
    uint64_t path, cookie;          /* "/proc/<tracer>/fd/<memfd>", the filter's cookie */
    int64_t fd, base, tramp, prot, counters, tprot; /* each call's result */
    int64_t dir_fd[FO_DIRS];                         /* fo_priv_t's, or the error */
} fo_setup_t;

/* FNV-1a; 0 is kept for empty slots. */
static inline uint64_t fo_hash_step(uint64_t h, unsigned char c)
{
    return (h ^ c) * 1099511628211ull;
}
#define FO_HASH_INIT 1469598103934665603ull

static inline uint64_t fo_hash_finish(uint64_t h, unsigned kind)
{
    h = fo_hash_step(h, (unsigned char)kind);
    return h ? h : 1;
}

/* Is p[0, n) a relative path of plain names (no "//", ".", "..", nor a trailing "/")?  The
 * relative paths the handler joins to a host directory (worker/trace/_fastopen_tracee_paths.c
 * absolute_of; the rest it hands back).  The tracer publishes answers under the joined key for
 * these and for those that are plain once their "." and empty components are out (asked_as in
 * worker/trace/trap/seccomp_stop.c), which a /cvmfs directory's relative calls normalize to. */
static inline int fo_plain_relative(const char *p, unsigned long n)
{
    if (!n || p[0] == '/' || p[n - 1] == '/')
        return 0;
    for (unsigned long i = 0; i < n; i++)
        if ((i == 0 || p[i - 1] == '/') &&
            (p[i] == '/' || (p[i] == '.' && (i + 1 == n || p[i + 1] == '/' ||
                                             (p[i + 1] == '.' && (i + 2 == n || p[i + 2] == '/'))))))
            return 0;
    return 1;
}

/* Flags that never take the in-process path to the mount: writes and creates (EROFS is the
 * tracer's answer), O_PATH, O_NOFOLLOW (the tracer answers those for symlinks), __O_TMPFILE.
 * On host paths only __O_TMPFILE (FO_REFUSE_HOST) stays the tracer's; the others are made
 * as writes are (_fastopen_tracee_writes.c). */
#define FO_REFUSE (03 | 0100 | 01000 | 010000000 | 020000000 | 0400000)
#define FO_REFUSE_HOST 020000000

#endif
