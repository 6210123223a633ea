/*
 * Exec of a #! script whose interpreter is under the mount: the rewritten call's image (pend,
 * scratch_cookie), the caller's argv read (read_argv) and the image built (exec_prepare).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and answers.c, memory.c define.
 */

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

/* A prefix string: `given` where it is the script's path as Python was asked (`key`, made
 * absolute and normal), which the kernel hands the interpreter as the caller named it. */
static const char *as_given(PyObject *o, const char *key, const char *given, size_t *len)
{
    const char *sv = PyBytes_AS_STRING(o);
    *len = (size_t)PyBytes_GET_SIZE(o);
    if (given && *len == strlen(key) && memcmp(sv, key, *len) == 0) {
        *len = strlen(given);
        return given;
    }
    return sv;
}

/* Build pend for exec of a.bval with argv prefix + the caller's argv[1:]; the script's path
 * in the prefix (`key`) as the caller gave it (`given`, or NULL: as it is). */
static int exec_prepare(pid_t tid, struct user_regs_struct *r, int path_arg, int argv_arg,
                        const action_t *a, PyObject *prefix, const char *key, const char *given)
{
    Py_ssize_t np = PyList_Size(prefix);
    if (np < 0 || np > 64) {
        PyErr_Clear();
        return -EIO;
    }
    size_t strs = a->blen + 1, sl;
    for (Py_ssize_t i = 0; i < np; i++) {
        PyObject *o = PyList_GET_ITEM(prefix, i);
        if (!PyBytes_Check(o))
            return -EIO;
        as_given(o, key, given, &sl);
        strs += sl + 1;
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
        const char *sv = as_given(PyList_GET_ITEM(prefix, i), key, given, &sl);
        ptrs[i] = off; /* made an address once the mapping's is known */
        memcpy(pend.img + off, sv, sl);
        pend.img[off + sl] = 0;
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
