/*
 * /proc files whose answers are the tracer's though they are host paths: readlink of a
 * process's exe and fd links and of magic links into the shadow tree (magic_readlink,
 * proc_key), fds of ours (fd_is_ours), and the mount tables (proc_key).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and everything from answers.c to readonly.c define.
 */

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

/* Is `p` (from /proc/) "<who>/<file>" with <who> self, thread-self, <pid> or
 * <pid>/task/<tid>?  The process it names (*pid) and where <file> starts; NULL if not. */
static const char *proc_who(pid_t tid, const char *p, pid_t *pid)
{
    char *end;
    *pid = -1;
    if (!strncmp(p, "self/", 5) || !strncmp(p, "thread-self/", 12)) {
        *pid = tid;
        p += p[0] == 's' ? 5 : 12;
    } else if (p[0] >= '1' && p[0] <= '9') {
        *pid = (pid_t)strtol(p, &end, 10);
        if (*end != '/')
            return NULL;
        p = end + 1;
    } else {
        return NULL;
    }
    if (!strncmp(p, "task/", 5) && p[5] >= '1' && p[5] <= '9') {
        *pid = (pid_t)strtol(p + 5, &end, 10);
        if (*end != '/')
            return NULL;
        p = end + 1;
    }
    return p;
}

/*
 * The key Python answers a host path under, where the answer is the tracer's (0: the
 * kernel's): readlink of /proc/<pid>/exe of a program exec'd from the mount (the kernel names
 * the RAM file it ran; ld.so's $ORIGIN and relocatable programs need the /cvmfs path) and of
 * /proc/<pid>/fd/<n> of a /cvmfs file (the kernel names its RAM file); a plain open of
 * /proc/<pid>/mountinfo or mounts, /proc/mounts or /etc/mtab (F_MOUNTS: the host's table with
 * /cvmfs and the repositories in it, worker/trace/mount_table.py); a plain open of
 * /proc/<pid>/maps or smaps (F_MAPS: the /cvmfs files mapped named by their /cvmfs paths,
 * worker/trace/proc_maps.py).  Never cached (F_PROCEXE).
 */
static long proc_key(pid_t tid, int cls, const char *raw, long n, char *key, int *flags)
{
    pid_t pid;
    const char *file;
    if (cls == C_OPEN) {
        if (*flags & (F_OPATH | F_WRITE))
            return 0;
        if (!strcmp(raw, "/etc/mtab") || !strcmp(raw, "/proc/mounts"))
            pid = tid, file = "mounts";
        else if (strncmp(raw, "/proc/", 6) || !(file = proc_who(tid, raw + 6, &pid)))
            return 0;
        if (!strcmp(file, "maps") || !strcmp(file, "smaps"))
            *flags |= F_PROCEXE | F_MAPS; /* the /cvmfs files mapped named by their paths */
        else if (!strcmp(file, "mountinfo") || !strcmp(file, "mounts"))
            *flags |= F_PROCEXE | F_MOUNTS;
        else
            return 0;
        return snprintf(key, MAXPATH, "/proc/%d/%s", (int)pid, file);
    }
    if (n <= 10 || strncmp(raw, "/proc/", 6) || !(file = proc_who(tid, raw + 6, &pid)))
        return 0;
    if (!strcmp(file, "exe")) {
        *flags |= F_PROCEXE;
        return snprintf(key, MAXPATH, "/proc/%d/exe", (int)pid);
    }
    char *end = NULL;
    long fd = !strncmp(file, "fd/", 3) && file[3] >= '0' && file[3] <= '9'
                  ? strtol(file + 3, &end, 10)
                  : -1;
    if (fd < 0 || *end || !fd_is_ours(pid, fd))
        return 0;
    *flags |= F_PROCEXE;
    return snprintf(key, MAXPATH, "/proc/%d/fd/%ld", (int)pid, fd);
}

/* Could a path ending so be one proc_key answers (a mount table, maps, exe, an fd link)? */
static int proc_key_name(const char *raw, long n)
{
    const char *last = raw + n;
    while (last > raw && last[-1] != '/')
        last--;
    static const char *const names[] = {"mtab", "mounts", "mountinfo", "maps", "smaps", "exe"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!strcmp(last, names[i]))
            return 1;
    return *last >= '0' && *last <= '9' && last - raw >= 3 && !strncmp(last - 3, "fd/", 3);
}

/* proc_key of a path relative to dirfd (or the cwd) too: "etc/mtab" from "/", "mounts" from
 * an fd on /proc/self, as the kernel would resolve them (a program's own tables must list
 * the mount however it names them, as under the real client). */
static long proc_key_at(pid_t tid, tstate_t *t, long dirfd, int cls, const char *raw, long n,
                        char *key, int *flags)
{
    if (n <= 0 || raw[0] == '/')
        return n > 8 ? proc_key(tid, cls, raw, n, key, flags) : 0;
    char base[MAXPATH], joined[2 * MAXPATH + 2], col[2 * MAXPATH + 4];
    if (!proc_key_name(raw, n))
        return 0;
    ssize_t bn = dirfd_path(tid, t, dirfd, base, sizeof base);
    if (bn <= 0 || base[0] != '/' || (size_t)bn + 1 + (size_t)n >= MAXPATH)
        return 0;
    memcpy(joined, base, (size_t)bn);
    joined[bn] = '/';
    memcpy(joined + bn + 1, raw, (size_t)n + 1);
    size_t cn = collapse(joined, (size_t)bn + 1 + (size_t)n, col);
    if (strstr(col, "/.."))
        cn = lexnorm(col, cn);
    return cn > 8 && cn < MAXPATH ? proc_key(tid, cls, col, (long)cn, key, flags) : 0;
}
