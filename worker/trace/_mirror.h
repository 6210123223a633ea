/*
 * A directory of the shadow tree made from a listing (worker/trace/node_answers.py,
 * encode_listing): an empty entry per catalog entry, for getdents of a /cvmfs directory, with
 * the directory's mode and mtime.  Shared by worker/trace/_tmpfs.c (mirror(), for Python) and
 * worker/trace/_trap.c (directories the node's earlier jobs listed, mirrored when a job first
 * opens them, with no upcall).  No Python here: callers may hold neither the GIL nor anything
 * else.
 */
#ifndef HEP_MIRROR_H
#define HEP_MIRROR_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/*
 * Does a directory of this tmpfs list its entries newest first (most kernels: the dentry's
 * list of children) or in the order they were made (6.6 to 6.13: stable offsets)?  Asked once,
 * of the kernel's tmpfs in /dev/shm (the shadow tree's is no place for a scratch directory a
 * program could list; where /dev/shm is not usable, newest first), so that a mirror lists its
 * entries in the listing's order, the catalog's, as the real client does (find, os.listdir,
 * glob and tar show it).
 */
static inline int mirror_newest_first(void)
{
    static int known = -1;
    if (known >= 0)
        return known;
    char probe[64];
    snprintf(probe, sizeof probe, "/dev/shm/.hep-exec-order-%d", (int)getpid());
    int first_b = 1;
    if (mkdir(probe, 0700) == 0) {
        int dfd = open(probe, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            mknodat(dfd, "a", S_IFREG | 0600, 0);
            mknodat(dfd, "b", S_IFREG | 0600, 0);
            char buf[1024];
            long got = syscall(SYS_getdents64, dfd, buf, sizeof buf);
            for (long off = 0; off < got;) {
                unsigned short reclen;
                memcpy(&reclen, buf + off + 16, 2);
                const char *name = buf + off + 19;
                if (name[0] != '.') {
                    first_b = name[0] == 'b';
                    break;
                }
                off += reclen;
            }
            unlinkat(dfd, "a", 0);
            unlinkat(dfd, "b", 0);
            close(dfd);
        }
        rmdir(probe);
    }
    known = first_b;
    return known;
}

/* The entries of an encoded listing (worker/trace/node_answers.py, encode_listing: u32 mode,
 * i64 mtime in ns, then per entry u8 S_IFMT >> 12, u16 name length, name) made in the
 * directory dfd, last first where the file system lists newest first; 0 or an errno (EINVAL:
 * bytes that are not a listing, or a name no directory holds). */
static inline int mirror_entries(int dfd, const unsigned char *d, size_t n, uint32_t *mode,
                                 int64_t *mtime, int newest_first)
{
    if (n < 12)
        return EINVAL;
    memcpy(mode, d, 4);
    memcpy(mtime, d + 4, 8);
    size_t count = 0, *at = NULL;
    for (size_t off = 12; off < n; count++) { /* where each entry starts */
        uint16_t len;
        if (n - off < 3)
            return EINVAL;
        memcpy(&len, d + off + 1, 2);
        off += 3 + (size_t)len;
    }
    at = malloc((count ? count : 1) * sizeof *at);
    if (!at)
        return ENOMEM;
    size_t i = 0;
    for (size_t off = 12; off < n; i++) {
        uint16_t len;
        memcpy(&len, d + off + 1, 2);
        at[i] = off;
        off += 3 + (size_t)len;
    }
    int e = 0;
    for (size_t k = 0; k < count && !e; k++) {
        size_t off = at[newest_first ? count - 1 - k : k];
        unsigned kind = d[off];
        uint16_t len;
        memcpy(&len, d + off + 1, 2);
        off += 3;
        if (len == 0 || len > n - off || len > 255) {
            e = EINVAL;
            break;
        }
        char name[256];
        memcpy(name, d + off, len);
        name[len] = 0;
        if (memchr(name, '/', len) || memchr(name, 0, len) || strcmp(name, ".") == 0 ||
            strcmp(name, "..") == 0) {
            e = EINVAL;
            break;
        }
        int r;
        switch (kind << 12) {
        case S_IFDIR:
            r = mkdirat(dfd, name, 0755);
            break;
        case S_IFLNK:
            r = symlinkat(".", dfd, name);
            break;
        case S_IFIFO:
            r = mknodat(dfd, name, S_IFIFO | 0600, 0);
            break;
        case S_IFREG:
        case S_IFCHR:
        case S_IFBLK:
        case S_IFSOCK:
            r = mknodat(dfd, name, S_IFREG | 0600, 0);
            break;
        default:
            r = 0;
            e = EINVAL;
        }
        if (!e && r != 0 && errno != EEXIST)
            e = errno;
    }
    free(at);
    return e;
}

/* Make `target` (its parent exists) a mirror of `listing`; 0 or an errno. */
static inline int mirror_dir(const char *target, const unsigned char *listing, size_t n)
{
    int e = 0;
    if (mkdir(target, 0755) != 0 && errno != EEXIST)
        e = errno;
    int dfd = e ? -1 : open(target, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (!e && dfd < 0)
        e = errno;
    if (!e) {
        uint32_t mode = 0;
        int64_t mtime = 0;
        e = mirror_entries(dfd, listing, n, &mode, &mtime, mirror_newest_first());
        struct timespec ts[2] = {{mtime / 1000000000, mtime % 1000000000},
                                 {mtime / 1000000000, mtime % 1000000000}};
        if (ts[0].tv_nsec < 0) { /* before 1970 */
            ts[0].tv_sec -= 1;
            ts[0].tv_nsec += 1000000000;
            ts[1] = ts[0];
        }
        if (!e && fchmod(dfd, mode & 07777) != 0)
            e = errno;
        if (!e && futimens(dfd, ts) != 0)
            e = errno;
    }
    if (dfd >= 0)
        close(dfd);
    return e;
}

#endif
