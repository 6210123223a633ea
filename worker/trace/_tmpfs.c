/*
 * A private tmpfs for the RAM cache, mounted without privileges.
 *
 * memfds live on the kernel's internal shmem mount, which follows the node's
 * transparent_hugepage/shmem_enabled setting (usually "never"): every memfd page is 4 KiB
 * and a 1 MiB read copies 256 of them, at ~0.6 of a read from ext4's page cache (which uses
 * large folios).  A tmpfs mounted with huge=within_size gets large folios sized to the file
 * whatever that setting says, and an unprivileged user may mount one inside a user + mount
 * namespace of its own.  So a short-lived child makes those namespaces, mounts the tmpfs,
 * makes a read-only view of it, and sends us a directory fd of each view; then it exits and
 * the views live on through the fds alone (nothing to unmount, nothing left behind if we are
 * killed).  We create each object under the read-write view and hand tracees fds opened
 * through the read-only one: a tracee cannot write, reopen for writing or chmod them (EROFS),
 * as with sealed memfds.
 *
 * Where the kernel has the new mount API (Linux 5.12), each view is a clone (open_tree) that
 * lives in an anonymous mount namespace of its own for as long as its fd is open.  The classic
 * way (mount, bind, remount read-only in the child's namespace) is kept for older kernels:
 * its mounts lose their namespace when the child exits, and the kernel releases every file
 * of a mount without one under its global mount lock (mntput_no_expire's slow path), which
 * also makes the path walks of every other CPU retry.  Measured here, two processes opening
 * and closing one file each: 1.82 us per open+close on such a mount, 1.50 us on a clone.
 *
 * The tracer's shadow tree lives on such a tmpfs too; mirror() makes one of its directories
 * (an empty entry per catalog entry, for getdents of a /cvmfs directory) in one call without
 * the GIL: a Python loop spent three times the kernel's own time on it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <stdint.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "_mirror.h"
#include "_spawn.h"

enum { STEP_UNSHARE = 1, STEP_MAP, STEP_MOUNT, STEP_BIND, STEP_RDONLY, STEP_OPEN, STEP_SEND };

static const char *const step_names[] = {
    "?", "unshare(CLONE_NEWUSER|CLONE_NEWNS)", "writing the uid/gid map",
    "mount -t tmpfs", "bind mount", "read-only remount", "open of the mount", "sending fds",
};

/* The new mount API, spelt here (x86_64 numbers): glibc 2.36 declares some of these names in
 * <sys/mount.h>, older ones none, and <linux/mount.h> clashes with the former. */
enum {
    NR_OPEN_TREE = 428, NR_MOVE_MOUNT = 429, NR_FSOPEN = 430, NR_FSCONFIG = 431,
    NR_FSMOUNT = 432, NR_MOUNT_SETATTR = 442,
    FSCONFIG_FLAG = 0, FSCONFIG_STRING = 1, FSCONFIG_CREATE = 6,
    MOUNT_RDONLY = 1, MOUNT_NOSUID = 2, MOUNT_NODEV = 4,
    MOVE_FROM_EMPTY_PATH = 4, TREE_CLONE = 1, EMPTY_PATH = 0x1000,
};

struct hep_mount_attr {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};

/* fsconfig() of "key=value,key,...": one call per option, as mount(2) would parse them. */
static int configure(int fs, const char *options)
{
    char buf[512];
    size_t n = strlen(options);
    if (n >= sizeof buf) {
        errno = EINVAL;
        return -1;
    }
    memcpy(buf, options, n + 1);
    for (char *key = buf; *key;) {
        char *end = strchr(key, ','), *value;
        if (end)
            *end = 0;
        if ((value = strchr(key, '=')))
            *value++ = 0;
        if (*key && syscall(NR_FSCONFIG, fs, value ? FSCONFIG_STRING : FSCONFIG_FLAG, key,
                            value, 0) != 0)
            return -1;
        if (!end)
            break;
        key = end + 1;
    }
    return 0;
}

/* The two views as clones (above); 0, or -1 with nothing left open or mounted. */
static int clone_views(const char *dir, const char *options, int fds[2])
{
    int fs = (int)syscall(NR_FSOPEN, "tmpfs", 1 /* FSOPEN_CLOEXEC */), mnt = -1, moved = 0;
    if (fs < 0)
        return -1;
    if (configure(fs, options) == 0 && syscall(NR_FSCONFIG, fs, FSCONFIG_CREATE, 0, 0, 0) == 0)
        mnt = (int)syscall(NR_FSMOUNT, fs, 1 /* FSMOUNT_CLOEXEC */, MOUNT_NOSUID | MOUNT_NODEV);
    close(fs);
    /* a clone is made of a mount of the caller's namespace: attach it there first */
    if (mnt >= 0)
        moved = syscall(NR_MOVE_MOUNT, mnt, "", AT_FDCWD, dir, MOVE_FROM_EMPTY_PATH) == 0;
    if (mnt >= 0)
        close(mnt);
    struct hep_mount_attr ro = {MOUNT_RDONLY, 0, 0, 0};
    if (moved &&
        (fds[0] = (int)syscall(NR_OPEN_TREE, AT_FDCWD, dir, TREE_CLONE | O_CLOEXEC)) >= 0 &&
        (fds[1] = (int)syscall(NR_OPEN_TREE, AT_FDCWD, dir, TREE_CLONE | O_CLOEXEC)) >= 0 &&
        syscall(NR_MOUNT_SETATTR, fds[1], "", EMPTY_PATH, &ro, sizeof ro) == 0)
        return 0;
    for (int i = 0; i < 2; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    fds[0] = fds[1] = -1;
    if (moved)
        umount2(dir, MNT_DETACH);
    return -1;
}

static int write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : -1; /* setgroups: absent before Linux 3.19 */
    ssize_t n = write(fd, text, strlen(text));
    int e = errno;
    close(fd);
    errno = e;
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

/* In the child: only system calls from here to _exit (it runs in our memory, and the parent
 * may have threads). */
static void child(int sock, const char *dir, const char *options, const char *uid_map,
                  const char *gid_map, int classic)
{
    int step = 0, fds[2] = {-1, -1}, cloned = 0;
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0) {
        step = STEP_UNSHARE;
    } else if (write_file("/proc/self/setgroups", "deny") != 0 ||
               write_file("/proc/self/uid_map", uid_map) != 0 ||
               write_file("/proc/self/gid_map", gid_map) != 0) {
        step = STEP_MAP;
    } else if (!classic && clone_views(dir, options, fds) == 0) {
        cloned = 1; /* (the classic way below where the kernel lacks the new API) */
    } else if (mount("hep-exec", dir, "tmpfs", MS_NOSUID | MS_NODEV, options) != 0) {
        step = STEP_MOUNT;
    } else if ((fds[0] = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0) {
        step = STEP_OPEN;
    } else if (mount(dir, dir, NULL, MS_BIND, NULL) != 0) {
        step = STEP_BIND;
    } else if (mount(NULL, dir, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV,
                     NULL) != 0) {
        step = STEP_RDONLY;
    } else if ((fds[1] = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0) {
        step = STEP_OPEN;
    }
    int report[3] = {step, step ? errno : 0, cloned};
    struct iovec io = {report, sizeof report};
    union {
        struct cmsghdr h;
        char b[CMSG_SPACE(sizeof fds)];
    } u;
    struct msghdr m;
    memset(&m, 0, sizeof m);
    memset(&u, 0, sizeof u);
    m.msg_iov = &io;
    m.msg_iovlen = 1;
    if (!step) {
        m.msg_control = u.b;
        m.msg_controllen = sizeof u.b;
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(sizeof fds);
        memcpy(CMSG_DATA(h), fds, sizeof fds);
    }
    _exit(sendmsg(sock, &m, 0) == (ssize_t)sizeof report ? 0 : 1);
}

struct child_args {
    int sock, classic;
    const char *dir, *options, *uid_map, *gid_map;
};

static int child_main(void *arg)
{
    const struct child_args *a = arg;
    child(a->sock, a->dir, a->options, a->uid_map, a->gid_map, a->classic);
    return 1; /* (child() ends in _exit) */
}

static PyObject *tmpfs_mount(PyObject *self, PyObject *args)
{
    const char *dir, *options;
    int classic = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "yy|p", &dir, &options, &classic))
        return NULL;
    char uid_map[64], gid_map[64];
    snprintf(uid_map, sizeof uid_map, "%u %u 1", (unsigned)getuid(), (unsigned)getuid());
    snprintf(gid_map, sizeof gid_map, "%u %u 1", (unsigned)getgid(), (unsigned)getgid());
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    /* unshare(CLONE_NEWUSER) asks only that the child be alone in its thread group */
    struct child_args a = {sv[1], classic, dir, options, uid_map, gid_map};
    pid_t pid = spawn_in_our_memory(child_main, &a);
    int fork_errno = errno;
    close(sv[1]);
    if (pid < 0) {
        close(sv[0]);
        errno = fork_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int report[3] = {STEP_SEND, EPIPE, 0}, fds[2] = {-1, -1};
    union {
        struct cmsghdr h;
        char b[CMSG_SPACE(sizeof fds)];
    } u;
    struct iovec io = {report, sizeof report};
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &io;
    m.msg_iovlen = 1;
    m.msg_control = u.b;
    m.msg_controllen = sizeof u.b;
    ssize_t got;
    Py_BEGIN_ALLOW_THREADS
    do
        got = recvmsg(sv[0], &m, MSG_CMSG_CLOEXEC);
    while (got < 0 && errno == EINTR);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        ;
    Py_END_ALLOW_THREADS
    close(sv[0]);
    struct cmsghdr *h = got == (ssize_t)sizeof report ? CMSG_FIRSTHDR(&m) : NULL;
    if (h && h->cmsg_type == SCM_RIGHTS && h->cmsg_len == CMSG_LEN(sizeof fds))
        memcpy(fds, CMSG_DATA(h), sizeof fds);
    if (report[0] == 0 && fds[0] >= 0 && fds[1] >= 0)
        return Py_BuildValue("iis", fds[0], fds[1], report[2] ? "clones" : "mounts");
    for (int i = 0; i < 2; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    int step = report[0] > 0 && report[0] <= STEP_SEND ? report[0] : STEP_SEND;
    int e = report[1] ? report[1] : EIO;
    PyObject *err = Py_BuildValue("iss", e, strerror(e), step_names[step]);
    if (err) {
        PyErr_SetObject(PyExc_OSError, err);
        Py_DECREF(err);
    }
    return NULL;
}

static PyObject *tmpfs_mirror(PyObject *self, PyObject *args)
{
    const char *target;
    Py_buffer listing;
    (void)self;
    if (!PyArg_ParseTuple(args, "yy*", &target, &listing))
        return NULL;
    int e;
    Py_BEGIN_ALLOW_THREADS
    e = mirror_dir(target, listing.buf, (size_t)listing.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&listing);
    if (e) {
        errno = e;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, target);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"mirror", tmpfs_mirror, METH_VARARGS,
     "mirror(dir, listing) -> None: make dir (its parent exists) hold an empty entry of each "
     "entry of an encode_listing() listing, with its mode and mtime; OSError if it cannot"},
    {"mount", tmpfs_mount, METH_VARARGS,
     "mount(dir, options, classic=False) -> (rw_dirfd, ro_dirfd, way): a tmpfs mounted with "
     "`options` on `dir` in a private user + mount namespace, as O_PATH fds of a read-write "
     "and a read-only view; way is 'clones' (the new mount API) or 'mounts' (the classic "
     "way, the only one tried with classic=True); OSError(errno, strerror, step) if the "
     "kernel refuses."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "worker.trace._tmpfs", "a private tmpfs without privileges", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tmpfs(void)
{
    return PyModule_Create(&module);
}
