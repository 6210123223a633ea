/*
 * Applying answers to a stopped call: skip_with, the stat and statx layouts filled from an
 * answer, opens noted for fstat, RAM-file stats, a redirected path argument.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and answers.c, fstat.c, threads.c, config.c, memory.c define.
 */

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

/* fill_stat's fields back from a struct stat */
static void stat_fields(const struct stat *s, int64_t *f)
{
    f[0] = s->st_mode;
    f[1] = (int64_t)s->st_ino;
    f[2] = (int64_t)s->st_nlink;
    f[3] = s->st_uid;
    f[4] = s->st_gid;
    f[5] = s->st_size;
    f[6] = s->st_blocks;
    f[7] = (int64_t)s->st_rdev;
    f[8] = (int64_t)s->st_dev;
    f[9] = s->st_atim.tv_sec;
    f[10] = s->st_atim.tv_nsec;
    f[11] = s->st_mtim.tv_sec;
    f[12] = s->st_mtim.tv_nsec;
    f[13] = s->st_ctim.tv_sec;
    f[14] = s->st_ctim.tv_nsec;
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
    /* as FUSE says them; a repository's root (the real client's inode 256) is a mount's */
    x->stx_attributes_mask = STATX_ATTR_AUTOMOUNT | STATX_ATTR_MOUNT_ROOT | STATX_ATTR_DAX;
    if (f[1] == 256 && S_ISDIR((mode_t)f[0]))
        x->stx_attributes = STATX_ATTR_MOUNT_ROOT;
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

/* What fstat of an fd on (dev, ino) says in-process: the stat answer st of the /cvmfs path an
 * open of it was served for (a RAM file, a directory's mirror); a mirror's answer has the
 * directory's own /cvmfs path after it, the one its place in the shadow tree (the open's
 * target[0, tn)) says: no symlink on the way, whatever path the open named, so that ".." from
 * there is the kernel's.  The handler finds a directory fd's path there, with no readlink of
 * /proc (worker/trace/_fastopen_tracee_paths.c, mirror_dir_path; its getdents64 names a
 * listing's inodes by it).  0 if the table took nothing. */
static int publish_ident(uint64_t dev, uint64_t ino, const int64_t *st, const char *target,
                         size_t tn)
{
    uint64_t id[2] = {dev, ino};
    struct {
        struct stat st;
        char path[MAXPATH];
    } data;
    fill_stat(st, &data.st);
    size_t n = sizeof data.st, rest = tn - target_n;
    if (S_ISDIR(data.st.st_mode) && target && tn >= target_n &&
        memcmp(target, target_p, target_n) == 0 && (rest == 0 || target[target_n] == '/') &&
        mount_n + rest < sizeof data.path) {
        memcpy(data.path, mount_p, mount_n);
        memcpy(data.path + mount_n, target + target_n, rest);
        data.path[mount_n + rest] = 0;
        n += mount_n + rest + 1;
    }
    return fo_publish(FO_IDENT, (const char *)id, sizeof id, &data, n, 0, 0, dev, ino);
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
    const int64_t *f = id->st;
    int64_t last[15];
    struct stat ls;
    if (id->shared && fo_shared_last(id->dev, id->ino, &ls)) { /* maybe opened in-process */
        stat_fields(&ls, last);
        f = last;
    }
    if (nr == 332) {
        struct statx x;
        fill_statx(f, &x);
        rc = write_mem(tid, buf, &x, sizeof x);
    } else {
        struct stat o;
        fill_stat(f, &o);
        rc = write_mem(tid, buf, &o, sizeof o);
    }
    n_hits++;
    skip_with(r, rc);
    if (cur_notif.active && !id->shared && (nr == SYS_fstat || nr == SYS_newfstatat))
        fo_patch(tid, nr, cur_notif.ip); /* later ones in-process (worker/trace/_fastopen.c) */
    return 1;
}

/* fstat of a tracee fd */
static int fd_stat(pid_t tid, struct user_regs_struct *r, long nr, long fd, unsigned long buf)
{
    char p[48];
    if (cur_notif.active && fo_enabled())
        fo_patch(tid, nr, cur_notif.ip); /* as a host path's (handle_syscall): the handler
                                          * makes fstat of anything but a RAM file itself */
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
