/*
 * getdents64 of a /cvmfs directory: its entries with the inode numbers stat says (dir_entries).
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and answers.c, config.c, memory.c, paths.c, upcall.c and apply.c define.
 */

/*
 * An open /cvmfs directory is its mirror in the shadow tree (empty entries made from its
 * listing), and the kernel lists the mirror's entries with the mirror's inode numbers: find
 * -printf %i, find -inum, Python's DirEntry.inode() saw numbers that stat of the same paths
 * never says (the real client's agree).  So the tracer reads the entries itself, through a
 * copy of the program's fd (pidfd_getfd: the same open directory, its position moves as the
 * program's call would move it), and writes them into the program's buffer with each
 * entry's d_ino replaced by the st_ino of its lstat answer ("." and "..": of the directory
 * and its parent); an entry whose answer is not at hand asks Python, which answers the
 * whole directory ahead.  A directory that is not a mirror is the kernel's (0).
 */
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL /* Linux 6.9: a pidfd of a thread, whose fd table it reaches */
#endif
#define DENTS_MAX (1u << 20) /* bytes of entries read at once for a program (it asks again) */

/* The inode stat says of the /cvmfs path key[0, kn) (lstat: the entry itself), or 0. */
static uint64_t entry_inode(pid_t tid, char *key, size_t kn)
{
    const action_t *known = known_stat(key, kn, F_NOFOLLOW);
    if (known)
        return (uint64_t)known->st[1];
    int64_t st[15];
    long err;
    char keep = key[kn];
    key[kn] = 0;
    uint64_t ino = answer_stat(tid, F_NOFOLLOW, key, kn, st, &err) ? (uint64_t)st[1] : 0;
    key[kn] = keep;
    return ino;
}

/* The inode of the mount's parent, a host directory ("/" for /cvmfs), or 0. */
static uint64_t host_parent_inode(void)
{
    char up[MAXPATH];
    const char *slash = memrchr(mount_p, '/', mount_n);
    size_t un = slash && slash > mount_p ? (size_t)(slash - mount_p) : 1;
    memcpy(up, mount_p, un);
    up[un] = 0;
    struct stat st;
    return lstat(up, &st) == 0 ? (uint64_t)st.st_ino : 0;
}

/* The entries data[0, n) of the directory whose /cvmfs path is dir[0, dn): each d_ino
 * the path's (where its answer says one). */
static void entries_with_inodes(pid_t tid, char *data, long n, const char *dir, size_t dn)
{
    char key[MAXPATH];
    memcpy(key, dir, dn);
    for (long off = 0; off + 19 < n;) {
        unsigned short reclen;
        memcpy(&reclen, data + off + 16, 2);
        if (reclen < 20 || off + reclen > n)
            break;
        const char *name = data + off + 19;
        size_t nn = strnlen(name, (size_t)reclen - 19), kn = dn;
        uint64_t ino = 0;
        if (nn == 1 && name[0] == '.') {
            ino = entry_inode(tid, key, kn);
        } else if (nn == 2 && name[0] == '.' && name[1] == '.') {
            const char *slash = memrchr(key, '/', dn);
            ino = dn > mount_n && slash ? entry_inode(tid, key, (size_t)(slash - key))
                                        : host_parent_inode();
        } else if (dn + 1 + nn < sizeof key) {
            key[dn] = '/';
            memcpy(key + dn + 1, name, nn);
            kn = dn + 1 + nn;
            ino = entry_inode(tid, key, kn);
        }
        if (ino)
            memcpy(data + off, &ino, 8);
        off += reclen;
    }
}

/* getdents64(fd, buf, count) of thread tid: 1 when answered here (a mirror's entries). */
static int dir_entries(pid_t tid, struct user_regs_struct *r)
{
    char what[32], dir[MAXPATH];
    if (cur_notif.active && fo_enabled())
        fo_patch(tid, SYS_getdents64, cur_notif.ip); /* later ones in-process (getdents of
                                                     * worker/trace/_fastopen_tracee_dents.c) */
    snprintf(what, sizeof what, "fd/%d", (int)r->rdi);
    ssize_t n = proc_link(tid, what, dir, sizeof dir);
    if (n <= 0 || !has_prefix(dir, (size_t)n, shadow_p, shadow_n) ||
        mount_n + ((size_t)n - shadow_n) >= MAXPATH)
        return 0;
    int pfd = (int)syscall(SYS_pidfd_open, tid, PIDFD_THREAD);
    if (pfd < 0)
        pfd = (int)syscall(SYS_pidfd_open, tid, 0); /* (before 6.9: a process's first thread) */
    int fd = pfd < 0 ? -1 : (int)syscall(SYS_pidfd_getfd, pfd, (int)r->rdi, 0);
    if (pfd >= 0)
        close(pfd);
    if (fd < 0)
        return 0; /* (the kernel's entries, as before) */
    size_t count = (size_t)(unsigned int)r->rdx, size = count < DENTS_MAX ? count : DENTS_MAX;
    char *data = malloc(size ? size : 1);
    long got = -ENOMEM;
    if (data && (got = syscall(SYS_getdents64, fd, data, size)) < 0)
        got = -errno;
    close(fd);
    if (got > 0) {
        char path[MAXPATH]; /* the directory's /cvmfs path */
        memcpy(path, mount_p, mount_n);
        memcpy(path + mount_n, dir + shadow_n, (size_t)n - shadow_n);
        entries_with_inodes(tid, data, got, path, mount_n + (size_t)n - shadow_n);
        if (write_mem(tid, r->rsi, data, (size_t)got) < 0)
            got = -EFAULT;
    }
    free(data);
    skip_with(r, got);
    return 1;
}
