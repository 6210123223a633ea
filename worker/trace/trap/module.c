/*
 * The last module functions (expect, take_notes, forget, set_cmdline), the method table and
 * PyInit__trap.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and answers.c, config.c, run.c, put.c, pack.c, tables.c define.
 */

/* take_notes() -> [(object file, path), ...]: the opens put since Python last asked */
/* expect(nbytes): a repository is being mounted and the node had `nbytes` of answers for it
 * (0: none; the service said at connect): the in-process table grows now, while it is empty,
 * to hold them (150-210 bytes an answer, packed), instead of moving them as they are put.
 * Faulting its pages in ahead, by a thread of its own, was tried and undone: on a VM whose
 * idle pages go back to the host that contended with the mount for the mmap lock and the CPU
 * (a warm job's start 114 -> 139 ms), and gained nothing otherwise. */
static PyObject *trap_expect(PyObject *self, PyObject *args)
{
    Py_ssize_t n;
    (void)self;
    if (!PyArg_ParseTuple(args, "n", &n))
        return NULL;
    if (n > 0 && handler) /* during a run */
        fo_expect((size_t)n / 170);
    Py_RETURN_NONE;
}

/* make_table(directory or None, answers, arena bytes) -> fd: a table file for a later job,
 * its pages faulted in now (fo_make_table: the node's service, while idle). */
static PyObject *trap_make_table(PyObject *self, PyObject *args)
{
    const char *dir;
    Py_ssize_t answers, arena;
    (void)self;
    if (!PyArg_ParseTuple(args, "znn", &dir, &answers, &arena))
        return NULL;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = fo_make_table(dir, answers > 0 ? (size_t)answers : 0, arena > 0 ? (size_t)arena : 0);
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        errno = -fd;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(fd);
}

/* give_table(fd): the next run's in-process table is this file (make_table's), which the run
 * closes, taken or not; -1: none. */
static PyObject *trap_give_table(PyObject *self, PyObject *args)
{
    int fd;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    fo_give_table(fd);
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

static PyObject *trap_filter_program(PyObject *self, PyObject *args)
{
    int notify;
    unsigned long long cookie;
    PyObject *with;
    (void)self;
    if (!PyArg_ParseTuple(args, "pO", &notify, &with))
        return NULL;
    cookie = with == Py_None ? 0 : PyLong_AsUnsignedLongLong(with);
    if (PyErr_Occurred())
        return NULL;
    struct sock_filter prog[FILTER_MAX];
    int k = build_filter(notify, with != Py_None, (uint64_t)cookie, prog);
    return PyBytes_FromStringAndSize((const char *)prog, (Py_ssize_t)(k * sizeof prog[0]));
}

static PyMethodDef methods[] = {
    {"filter_program", trap_filter_program, METH_VARARGS,
     "filter_program(notify, cookie) -> bytes: the seccomp filter a run installs (struct "
     "sock_filter[]), for the in-process handler's cookie (None: no handler)"},
    {"put", trap_put, METH_VARARGS,
     "put([(cls, flags, key, answer), ...]) -> n: answers given before they are asked for"},
    {"pack", trap_pack, METH_VARARGS,
     "pack(items, prefix, uid, gid, dev) -> bytes: put()'s items for another job (put_table)"},
    {"put_table", trap_put_table, METH_VARARGS,
     "put_table(table, within, eager, prefix, uid, gid, dev, dirfd) -> (n, "
     "listed directories, opens) or None: a revision's answers from the node"},
    {"holding", trap_holding, METH_O,
     "holding(fn) -> fn() or None (no run): fn called holding the lock of the threads "
     "answering calls"},
    {"running", trap_running, METH_NOARGS, "running() -> bool: is a run on?"},
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
    {"expect", trap_expect, METH_VARARGS,
     "expect(nbytes): size the in-process table for nbytes of the node's answers"},
    {"make_table", trap_make_table, METH_VARARGS,
     "make_table(directory, answers, arena) -> fd: a table file faulted in for a later run"},
    {"give_table", trap_give_table, METH_VARARGS,
     "give_table(fd): the next run's in-process table (closed by the run, taken or not)"},
    {"take_notes", trap_take_notes, METH_NOARGS,
     "take_notes() -> [(object file, path), ...] of the opens put since last asked"},
    {"forget", trap_forget, METH_VARARGS,
     "forget(path) -> n: drop the cached open answers for a /cvmfs path (tracer thread only)"},
    {"set_cmdline", trap_set_cmdline, METH_VARARGS,
     "set_cmdline(title: bytes) -> bool: what ps shows for this process"},
    {"run", trap_run, METH_VARARGS,
     "run(argv, env, mount, shadow, handler, spin_us=0, mode=2, in_process=1, io_uring=0,\n"
     "    rendered=shadow, write=b'', object_dirs=[])\n"
     "  -> (status, exec_errno, stats)\n"
     "mode: 0 ptrace only, 1 seccomp user notification for hot calls, 2 1 where it is fast.\n"
     "Run argv under ptrace+seccomp; handler(tid, cls, flags, path) answers cache misses."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "worker.trace._trap", "ptrace + seccomp trap loop for hep-exec", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__trap(void)
{
    return PyModule_Create(&module);
}
