/*
 * worker.trace._trap: the ptrace + seccomp trap loop of hep-exec (x86_64 Linux).
 *
 * Why C: every trapped syscall costs a waitpid, a register read and a memory read; doing
 * that in Python caps a tracer near Parrot's rates.  So this loop keeps the hot path in C:
 * paths outside the mount prefix are let through without any Python call, and answers
 * for paths inside it are cached in a hash table (answers are immutable during a run).
 * Python (worker/trace/tracer.py) is called only on a cache miss, with (tid, class, flags,
 * path), and returns an action tuple that this file applies and, if cacheable, remembers.
 *
 * The seccomp filter traps only path-taking syscalls, so read, write, mmap, fstat ... never
 * stop.  Where the kernel allows (notify mode), the hot ones go to a seccomp user-notification
 * fd answered by a second thread instead of a ptrace stop; see worker/trace/README.md.
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
#include <sys/inotify.h>
#include <sys/xattr.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include "_fastopen_sup.h"
#include "_mirror.h"
#include "_spawn.h"

#ifndef __x86_64__
#error "worker.trace._trap supports x86_64 only"
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

/* Syscall classes; must match worker/trace/tracer.py (Cls). */
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
    C_WRITE = 10,  /* answered in C as on a read-only mount (trap/readonly.c) */
    C_GETCWD = 11, /* answered in C from the shadow mapping */
    C_WATCH = 12,  /* inotify_add_watch: the path's place in the shadow tree */
    /* markers Python puts (trap_put), never asked: a directory whose every entry is known
     * (C_LISTED), and each of those entries (C_NAMED).  A path in a listed directory that is
     * not named there does not exist: ENOENT without asking Python. */
    C_LISTED = 30,
    C_NAMED = 31,
    /* a listed directory whose entries have no extended attributes but those answered
     * (A_XATTRS): getxattr/listxattr of the others are answered in C (see derived) */
    C_NOXATTR = 32,
};
/* Action kinds; must match worker/trace/tracer.py (Act). */
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
#define F_USERXATTR 0x1000 /* getxattr of a user.* name: CernVM-FS's magic ones among them */
#define F_MOUNTS 0x2000 /* an open of a mount table (trap/proc_files.c proc_key) */
#define F_MAPS 0x4000   /* an open of a process's maps or smaps (trap/proc_files.c proc_key) */

#define NSYS 512
#define MAXPATH 4096

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* calloc for a hash table: its pages faulted in for writing at once.  calloc's big blocks are
 * fresh mappings, and a probe that reads a slot before anything was written on its page maps
 * the shared zero page there; the write that follows must then replace it, and flush that
 * page from the TLB of every CPU one of our threads runs on: an interrupt to each (on a VM a
 * trip through the hypervisor).  Rehashing a table probes every page so.  Populating costs
 * nothing more at half load (every page is written anyway); older kernels ignore it. */
static void *table_calloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    size_t bytes = n * size, page = 4096;
    if (p && bytes >= (16u << 10)) {
        uintptr_t from = ((uintptr_t)p + page - 1) & ~(uintptr_t)(page - 1);
        uintptr_t to = ((uintptr_t)p + bytes) & ~(uintptr_t)(page - 1);
        if (to > from)
            madvise((void *)from, to - from, MADV_POPULATE_WRITE);
    }
    return p;
}

/* The sections, in order: one translation unit, so that the hot path's static functions
 * inline across them (see trap/README.md). */
#include "trap/filter.c"
#include "trap/answers.c"
#include "trap/fstat.c"
#include "trap/threads.c"
#include "trap/config.c"
#include "trap/memory.c"
#include "trap/paths.c"
#include "trap/upcall.c"
#include "trap/redirect.c"
#include "trap/apply.c"
#include "trap/readonly.c"
#include "trap/proc_files.c"
#include "trap/dents.c"
#include "trap/resolve_flags.c"
#include "trap/debuggers.c"
#include "trap/exec.c"
#include "trap/seccomp_stop.c"
#include "trap/scratch.c"
#include "trap/loop.c"
#include "trap/notify_loop.c"
#include "trap/ptrace_loop.c"
#include "trap/run.c"
#include "trap/object_inodes.c"
#include "trap/put.c"
#include "trap/pack.c"
#include "trap/staged.c"
#include "trap/node_dirs.c"
#include "trap/mirror_ahead.c"
#include "trap/tables.c"
#include "trap/module.c"
