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
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The entries of an encoded listing (worker/trace/node_answers.py, encode_listing: u32 mode,
 * i64 mtime in ns, then per entry u8 S_IFMT >> 12, u16 name length, name) made in the
 * directory dfd; 0 or an errno (EINVAL: bytes that are not a listing, or a name no directory
 * holds). */
static inline int mirror_entries(int dfd, const unsigned char *d, size_t n, uint32_t *mode,
                          int64_t *mtime)
{
    if (n < 12)
        return EINVAL;
    memcpy(mode, d, 4);
    memcpy(mtime, d + 4, 8);
    size_t off = 12;
    while (off < n) {
        if (n - off < 3)
            return EINVAL;
        unsigned kind = d[off];
        uint16_t len;
        memcpy(&len, d + off + 1, 2);
        off += 3;
        if (len == 0 || len > n - off || len > 255)
            return EINVAL;
        char name[256];
        memcpy(name, d + off, len);
        name[len] = 0;
        off += len;
        if (memchr(name, '/', len) || memchr(name, 0, len) || strcmp(name, ".") == 0 ||
            strcmp(name, "..") == 0)
            return EINVAL;
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
            return EINVAL;
        }
        if (r != 0 && errno != EEXIST)
            return errno;
    }
    return 0;
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
        e = mirror_entries(dfd, listing, n, &mode, &mtime);
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
