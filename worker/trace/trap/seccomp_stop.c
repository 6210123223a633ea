/*
 * One seccomp stop handled (handle_syscall) and its helpers: RAM files by name, opens and
 * answers offered to the in-process table.  (Still in the section "exec of a #! script" of
 * the old _trap.c.)
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and everything from answers.c to exec.c define (readonly.c among them).
 */

/*
 * Handle one seccomp stop.  Returns 1 if the registers were changed (SETREGS needed),
 * 0 to continue untouched, EXEC_SCRATCH when pend holds a rewritten exec for exec_scratch.
 * t->nrestore > 0 means "stop at syscall exit".
 */
#define EXEC_SCRATCH 2
/* exec of the host path `path` (absolute): does Python need to look, because its #! line names
 * something under the mount (Session._exec)?  A plain binary or a host script for a host
 * interpreter runs as the kernel runs it, with no upcall (a job's shells and tools exec
 * hundreds of them, and execvp tries each PATH entry).  A path that is not there or cannot be
 * read is the kernel's to refuse, as Python would leave it (host symlinks into the mount were
 * followed before: mount_key, via_host_symlink).  Only a regular file is opened (O_NONBLOCK:
 * never a FIFO's wait). */
/* F_USERXATTR when the name getxattr asks for is a user.* one: CernVM-FS's magic attributes
 * (user.revision, user.hash ...) are answered by Python, never derived from "no xattrs here"
 * (upcall.c derived) nor published for the handler, which leaves those names to us too. */
static int user_xattr(pid_t tid, unsigned long name)
{
    char head[5];
    struct iovec l = {head, sizeof head}, rv = {(void *)name, sizeof head};
    return name && process_vm_readv(tid, &l, 1, &rv, 1, 0) == (ssize_t)sizeof head &&
                   !memcmp(head, "user.", 5)
               ? F_USERXATTR
               : 0;
}

/* Does the ELF program open at fd (its first n bytes in head) name an interpreter under the
 * mount (EESSI's, Gentoo Prefix's)?  The kernel would open it itself, where /cvmfs is not:
 * Python execs a copy that names the interpreter's file (worker/trace/exec_files.py).  Only
 * what the kernel loads: ELF64 or ELF32, little-endian, its phdr table up to 64 KiB. */
static int elf_interp_in_mount(int fd, const unsigned char *head, ssize_t n)
{
    if (n < 52 || memcmp(head, "\x7f" "ELF", 4) != 0 || head[5] != 1 || (head[4] != 1 && head[4] != 2))
        return 0;
    int is64 = head[4] == 2;
    uint64_t phoff = 0;
    uint16_t entsize, phnum;
    if (is64 && n < 64)
        return 0;
    memcpy(&phoff, head + (is64 ? 0x20 : 0x1c), is64 ? 8 : 4);
    memcpy(&entsize, head + (is64 ? 0x36 : 0x2a), 2);
    memcpy(&phnum, head + (is64 ? 0x38 : 0x2c), 2);
    size_t size = (size_t)entsize * phnum;
    if (entsize != (is64 ? 56 : 32) || size == 0 || size > 65536)
        return 0;
    unsigned char *table = malloc(size);
    if (!table)
        return 0;
    int found = 0;
    if (pread(fd, table, size, (off_t)phoff) == (ssize_t)size) {
        for (size_t i = 0; i < phnum; i++) {
            const unsigned char *ph = table + i * entsize;
            uint32_t type;
            memcpy(&type, ph, 4);
            if (type != 3) /* PT_INTERP: the first one, as the kernel takes it */
                continue;
            uint64_t off = 0, filesz = 0;
            memcpy(&off, ph + (is64 ? 8 : 4), is64 ? 8 : 4);
            memcpy(&filesz, ph + (is64 ? 32 : 16), is64 ? 8 : 4);
            char interp[MAXPATH];
            found = filesz > mount_n + 1 && filesz <= sizeof interp &&
                    pread(fd, interp, filesz, (off_t)off) == (ssize_t)filesz &&
                    memcmp(interp, mount_p, mount_n) == 0 && interp[mount_n] == '/';
            break;
        }
    }
    free(table);
    return found;
}

static int host_exec_needs_python(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode))
        return 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0)
        return 0;
    char head[256]; /* what binfmt_script reads (BINPRM_BUF_SIZE) */
    ssize_t n = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) ? pread(fd, head, sizeof head, 0) : -1;
    int elf = elf_interp_in_mount(fd, (const unsigned char *)head, n);
    close(fd);
    if (elf)
        return 1;
    if (n < 2 || head[0] != '#' || head[1] != '!')
        return 0;
    const char *end = memchr(head, '\n', (size_t)n);
    size_t line = end ? (size_t)(end - head) : (size_t)n;
    for (size_t i = 2; i + mount_n <= line; i++) /* the mount anywhere in it: Python parses */
        if (memcmp(head + i, mount_p, mount_n) == 0)
            return 1;
    return 0;
}

/* "/proc/<pid>/fd/<n>/<name>": a RAM file by name (worker/ram/ramfiles.py named_path), ours
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

/* An open's answer (a redirect) in-process, with what fstat of an fd on its target (dev, ino;
 * 0: none) says: the path's answer (see note_open).  0 if the table took nothing. */
static int publish_open(const action_t *a, const char *key, size_t kn, uint64_t dev,
                        uint64_t ino)
{
    if (!fo_publish(FO_OPEN, key, kn, a->bval, a->blen + 1, 1, 0, dev, ino))
        return 0;
    if (ino)
        publish_ident(dev, ino, a->st, a->bval, a->blen);
    return 1;
}

/* A notified open of `key` (the caller's own path, in normal form) was answered by a
 * cached redirect: let tracees open the target themselves from now on
 * (worker/trace/_fastopen.c), and patch the call site.  Not for RAM files opened under other
 * paths with other answers (fstat follows the last open: see note_open), memfds by number
 * (numbers are reused), or host targets. */
static void offer_open(pid_t tid, long nr, const action_t *a, const char *key, size_t kn)
{
    uint64_t dev = 0, ino = 0;
    if (has_prefix(a->bval, a->blen, target_p, target_n)) {
        /* a directory's mirror, noted by note_open: fstat says its stat (asked before the
         * RAM files: the shadow tree is reached through an fd of ours too) */
        fdid_t *f = a->ram_ino ? ids_find(a->ram_dev, a->ram_ino) : NULL;
        if (!f || f->ino != a->ram_ino || f->shared)
            return;
        dev = a->ram_dev;
        ino = a->ram_ino;
    } else if (strncmp(a->bval, own_fd_prefix, own_fd_prefix_n) == 0 ||
               named_ram_file(a->bval)) {
        /* a RAM file by name: ours (own_dir_name) or a node cache service's object (tmpfs:
         * inode numbers are not reused while the file system lives); one that turns out to
         * serve paths with different stat answers is published as a shared file's (fstat
         * follows the last open) */
        const char *leaf;
        fdid_t *f = a->ram_ino ? ids_find(a->ram_dev, a->ram_ino) : NULL;
        if (!f || f->ino != a->ram_ino ||
            (!named_ram_file(a->bval) && own_dir_name(a->bval, &leaf) < 0))
            return;
        if (f->shared) {
            struct stat st;
            fill_stat(a->st, &st);
            if (fo_publish_shared_open(key, kn, a->bval, a->blen, &st, a->ram_dev, a->ram_ino))
                fo_patch(tid, nr, cur_notif.ip);
            return;
        }
        dev = a->ram_dev;
        ino = a->ram_ino;
    } else {
        return;
    }
    if (publish_open(a, key, kn, dev, ino))
        fo_patch(tid, nr, cur_notif.ip);
}

/* A relative path without its "." and empty components ("./x.py", "a//b"), as mount_key
 * collapsed it into the key, into out (n + 1 bytes); 0 for a ".." component, a trailing "/"
 * or "." (ENOTDIR on a file, a symlink followed), and nothing left. */
static long collapse_relative(const char *p, long n, char *out)
{
    if (n <= 0 || p[0] == '/' || p[n - 1] == '/' || (p[n - 1] == '.' && (n == 1 || p[n - 2] == '/')))
        return 0;
    long o = 0;
    for (long i = 0; i < n;) {
        long s = i;
        while (i < n && p[i] != '/')
            i++;
        long len = i - s;
        i += i < n; /* the '/' */
        if (len == 0 || (len == 1 && p[s] == '.'))
            continue;
        if (len == 2 && p[s] == '.' && p[s + 1] == '.')
            return 0;
        if (o)
            out[o++] = '/';
        memcpy(out + o, p + s, (size_t)len);
        o += len;
    }
    out[o] = 0;
    return o;
}

/* Is `key` what the in-process handler looks up for the path the program gave (`raw`)?  The
 * path itself, or a relative one that `key` ends with after a "/", once its "." and empty
 * components are out ("./x.py", as from cat, xargs or make): the handler joins it to its
 * directory's /cvmfs path (absolute_of in worker/trace/_fastopen_tracee_paths.c) and takes
 * those out the same way; from a host directory it takes plain names only, and hands back the
 * rest.  Answers are published, and the call site patched, only for those: any other form
 * (with "..") traps as before. */
static int asked_as(const char *raw, long n, const char *key, long kn)
{
    if (n == kn)
        return memcmp(raw, key, (size_t)kn) == 0;
    char plain[MAXPATH];
    long pn = n < MAXPATH ? collapse_relative(raw, n, plain) : 0;
    return pn > 0 && pn < kn && key[kn - pn - 1] == '/' &&
           memcmp(plain, key + kn - pn, (size_t)pn) == 0;
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
    } else if ((cls == C_XATTR_GET && !(flags & F_USERXATTR) &&
                (nr == SYS_getxattr || nr == SYS_lgetxattr)) ||
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

static int handle_syscall(pid_t tid, struct user_regs_struct *r, tstate_t *t)
{
    long nr = (long)r->orig_rax;
    int cls = C_NONE, flags = 0, path_arg = 0, allow_empty = 0;
    long dirfd = AT_FDCWD, open_fl = O_CREAT | O_WRONLY | O_TRUNC; /* creat's */
    long forced = 0; /* the key openat2's RESOLVE_* flags lead to (trap/resolve_flags.c) */
    unsigned long long resolve = 0;
    char key[MAXPATH];
    if (nr >= 0 && nr < NSYS)
        n_trapped[nr]++;
    switch (nr) {
    case SYS_ptrace:
        return ptrace_call(tid, r);
    case SYS_open:
    case SYS_openat:
    case 437: {
        unsigned long long fl = 0;
        if (nr == SYS_open) {
            path_arg = 0;
            fl = r->rsi;
        } else {
            dirfd = (long)(int)r->rdi;
            path_arg = 1;
            fl = r->rdx;
            if (nr == 437) { /* struct open_how: flags, mode, resolve */
                unsigned long long how[3];
                struct iovec l = {how, sizeof how}, rv = {(void *)r->rdx, sizeof how};
                if (r->r10 < sizeof how || process_vm_readv(tid, &l, 1, &rv, 1, 0) != sizeof how)
                    return 0;
                fl = how[0];
                resolve = how[2];
            }
        }
        cls = C_OPEN;
        open_fl = (long)fl;
        if ((fl & (O_CREAT | O_TRUNC)) || (fl & O_TMPFILE) == O_TMPFILE ||
            ((fl & O_DIRECTORY) && (fl & (O_WRONLY | O_RDWR))))
            cls = C_WRITE; /* trap/readonly.c: what the kernel says first */
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
    case SYS_getdents64:
        return dir_entries(tid, r); /* trap/dents.c */
    case SYS_statfs: cls = C_STATFS; break;
    case SYS_inotify_add_watch:
        cls = C_WATCH; path_arg = 1;
        if (r->rdx & IN_DONT_FOLLOW) flags = F_NOFOLLOW;
        break;
    case SYS_getxattr: cls = C_XATTR_GET; flags = user_xattr(tid, r->rsi); break;
    case SYS_lgetxattr: cls = C_XATTR_GET; flags = F_NOFOLLOW | user_xattr(tid, r->rsi); break;
    case SYS_listxattr: cls = C_XATTR_LIST; break;
    case SYS_llistxattr: cls = C_XATTR_LIST; flags = F_NOFOLLOW; break;
    case 464:
    case 465:
        cls = nr == 464 ? C_XATTR_GET : C_XATTR_LIST; dirfd = (long)(int)r->rdi; path_arg = 1;
        allow_empty = 1;
        if (r->rdx & AT_SYMLINK_NOFOLLOW) flags = F_NOFOLLOW;
        if (nr == 464) flags |= user_xattr(tid, r->r10);
        break;
    default: cls = C_WRITE; break;
    }

    if (resolve) {
        char rraw[MAXPATH];
        long rn = read_string(tid, *argreg(r, path_arg), rraw, sizeof rraw);
        forced = resolve_key(tid, t, dirfd, rraw, rn, resolve, !(open_fl & O_NOFOLLOW), key);
        if (forced < 0) {
            skip_with(r, forced);
            return 1;
        }
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
        /* which errno the kernel says first (trap/readonly.c): the states of each path */
        long ro_flags = 0;
        int follow = 0, call = ro_call(nr, r, open_fl, &ro_flags, &follow), mounted = 0;
        int need_node = call != RO_RENAME && call != RO_UNLINK && call != RO_RMDIR;
        ro_path_t rp[2];
        int host_i = -1;
        long host_d = AT_FDCWD, host_n = 0;
        char host_raw[MAXPATH];
        memset(rp, 0, sizeof rp);
        rp[0].node = rp[1].node = rp[0].target = rp[1].target = RO_UNKNOWN;
        for (int i = 0; i < 2; i++) {
            long d = da[i] >= 0 ? (long)(int)*argreg(r, da[i]) : AT_FDCWD;
            unsigned long addr = pa[i] >= 0 ? *argreg(r, pa[i]) : 0;
            char raw[MAXPATH];
            long n = addr ? read_string(tid, addr, raw, sizeof raw) : 0;
            if (da[i] >= 0 && d >= 0 && (!addr || n == 0)) {
                /* the fd itself: fchmod, fchown, f*xattr, utimensat(fd, NULL),
                 * fchmodat2/fchownat(fd, "", AT_EMPTY_PATH) */
                if (fd_is_ours(tid, d)) {
                    if (call == RO_LINK && i == 0) {
                        ro_file_of_ours(&rp[0]);
                        mounted++;
                        continue;
                    }
                    skip_with(r, -EROFS);
                    return 1;
                }
                continue;
            }
            if (pa[i] < 0 || !addr)
                continue;
            if (n > 5 && ids_len && (!strncmp(raw, "/proc/", 6) || !strncmp(raw, "/dev/", 5))) {
                /* chmod /proc/self/fd/N, /dev/stdin ... of a RAM file (a memfd's link names
                 * no path that mount_key maps, as a tmpfs file's does) */
                char mapped[MAXPATH];
                struct stat st;
                fdid_t *id = stat(as_tracee(tid, raw, mapped, sizeof mapped), &st) == 0
                                 ? ids_find((uint64_t)st.st_dev, (uint64_t)st.st_ino)
                                 : NULL;
                if (id && id->ino && call == RO_LINK && i == 0) {
                    ro_file_of_ours(&rp[0]); /* link("/proc/self/fd/N", new) */
                    mounted++;
                    continue;
                }
                if (id && id->ino) {
                    skip_with(r, -EROFS);
                    return 1;
                }
            }
            long kn = forced ? forced : mount_key(tid, t, d, raw, n, key, 1);
            if (kn == 0) /* through a host symlink: does the last component follow? */
                kn = via_host_symlink(tid, t, d, raw, n, i == 0 && follow, key);
            if (kn > 0) {
                ro_mount_path(tid, raw, (size_t)n, key, (size_t)kn, need_node,
                              i == 0 && follow, &rp[i]);
                mounted++;
            } else if (n > 0) {
                host_i = i;
                host_d = d;
                host_n = n;
                memcpy(host_raw, raw, (size_t)n + 1);
            }
        }
        if (mounted) {
            if (host_i >= 0)
                ro_host_path(tid, t, host_d, host_raw, (size_t)host_n, &rp[host_i]);
            long e = ro_errno(call, ro_flags, follow, geteuid() == 0, &rp[0], &rp[1]);
            if (e != 0 || call != RO_OPEN) {
                skip_with(r, e < 0 ? e : -EROFS);
                return 1;
            }
            /* an open of what is there, writing nothing: as one without O_CREAT, O_TRUNC */
            cls = C_OPEN;
            flags &= F_NOFOLLOW | F_OPATH;
            if ((open_fl & O_ACCMODE) == O_WRONLY || (open_fl & O_ACCMODE) == O_RDWR)
                flags |= F_WRITE;
            goto asked;
        }
        if (cur_notif.active && fo_host_writes())
            fo_patch(tid, nr, cur_notif.ip); /* later writes there in-process, as a host
                                               * read's (_fastopen_tracee_writes.c) */
        n_pass++;
        return 0;
    }

asked:;
    char raw[MAXPATH];
    long n = read_string(tid, *argreg(r, path_arg), raw, sizeof raw);
    if (cls == C_READLINK && n > 0 && magic_readlink(tid, r, nr, raw, (size_t)n))
        return 1;
    long kn = forced ? forced : mount_key(tid, t, dirfd, raw, n, key, allow_empty);
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
    if (kn == 0 && (cls == C_READLINK || cls == C_OPEN))
        kn = proc_key_at(tid, t, dirfd, cls, raw, n, key, &flags); /* trap/proc_files.c */
    if (kn == 0 && cls == C_STAT && !(flags & F_NOFOLLOW) && ids_len) {
        /* stat -L /dev/stdin, /proc/self/fd/N ... of a file opened from the mount */
        char mapped[MAXPATH];
        if (n > 5 && (!strncmp(raw, "/proc/", 6) || !strncmp(raw, "/dev/", 5))) {
            unsigned long buf = nr == 332 ? r->r8 : nr == SYS_newfstatat ? r->rdx : r->rsi;
            return ram_file_stat(tid, r, nr, as_tracee(tid, raw, mapped, sizeof mapped), buf);
        }
    }
    if (kn == 0 && cls != C_EXEC) {
        /* a host path: its call site too is patched (fo_patch), so that later calls there,
         * on host paths or the mount, are made in-process (the handler hands back what is
         * not its own, which traps as now); else every host call of a site stops until its
         * first answer from the mount (~100 of a Python's start, before it touches /cvmfs).
         * Relative ones too: the handler makes them (absolute_of) */
        if (cur_notif.active && raw[0] && fo_enabled())
            fo_patch(tid, nr, cur_notif.ip);
        else if ((flags & F_OPATH) && nr != 437 && raw[0] && fo_enabled())
            fo_patch(tid, nr, r->rip); /* an O_PATH open's ptrace stop, in notify mode: glibc's
                                        * fchmodat and fchownat make one per directory */
        n_pass++;
        return 0;
    }
    if (kn == 0) {
        /* exec of a host path: Python checks for a #! interpreter under the mount */
        char base[MAXPATH];
        if (n <= 0 && !(allow_empty && dirfd >= 0))
            return 0;
        if (n <= 0) { /* execveat(fd, "", AT_EMPTY_PATH), fexecve's way: the caller's fd */
            kn = snprintf(key, MAXPATH, "/proc/%d/fd/%d", (int)tid, (int)dirfd);
        } else if (raw[0] == '/') {
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
        /* /proc/self/fd/N, /dev/fd/N (fexecve's way): the caller's, not ours */
        char mapped[MAXPATH];
        const char *own = as_tracee(tid, key, mapped, sizeof mapped);
        if (own != key) {
            kn = (long)strlen(own);
            if (kn >= MAXPATH)
                return 0;
            memcpy(key, own, (size_t)kn + 1);
        }
        if (!host_exec_needs_python(key)) {
            /* the call site, in the caller (execvp's next PATH entries, if this one fails)
             * and in its parent (a vfork child runs in its memory; a fork child's copy goes
             * with a successful exec): its next children exec host programs in-process */
            if (nr == SYS_execve && fo_host_writes()) {
                fo_patch(tid, nr, r->rip);
                if (t->parent > 0 && !t->execd)
                    fo_patch_parent(t->parent, nr, r->rip);
            }
            n_pass++;
            return 0;
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
        a != &tmp && asked_as(raw, n, key, kn) && fo_enabled())
        offer_answer(tid, nr, cls, flags, a, key, (size_t)kn);
    switch (a->kind) {
    case A_PASS:
        break;
    case A_RETURN:
        skip_with(r, a->ival);
        changed = 1;
        break;
    case A_REDIRECT: {
        if (cls == C_STATFS && has_prefix(a->bval, a->blen, target_p, target_n)) {
            /* the mount's: the shadow tree's, with the f_type of the real client's */
            struct statfs sf;
            long rc = statfs(a->bval, &sf) != 0 ? -errno : 0;
            sf.f_type = 0x65735546; /* FUSE_SUPER_MAGIC */
            skip_with(r, rc ? rc : write_mem(tid, r->rsi, &sf, sizeof sf) < 0 ? -EFAULT : 0);
            changed = 1;
            break;
        }
        if (cls == C_OPEN && a->st[0])
            note_open(a);
        /* (O_NOFOLLOW redirected: no symlink there, so the open without it; the handler
         * takes those where the lstat answer says so: refused_flags) */
        if (cur_notif.active && cls == C_OPEN && (flags == 0 || flags == F_NOFOLLOW) &&
            a != &tmp && asked_as(raw, n, key, kn) && fo_enabled())
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
        else if (rc == 0 && cls == C_OPEN && via_proc && nr == 437)
            rc = allow_magic_link(tid, r, nr, t, 1); /* RESOLVE_* are decided (resolve_key) */
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
            /* the name binfmt_script gives the interpreter: the path as the caller gave it
             * (for one relative to execveat's fd the kernel's /dev/fd/N/path, which may
             * name a /cvmfs directory's mirror: the absolute path, as before) */
            int as_is = raw[0] == '/' || (dirfd == AT_FDCWD && raw[0]);
            rc = exec_prepare(tid, r, path_arg, argv_arg, a, prefix, key, as_is ? raw : NULL);
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
