/*
 * Host directories from which the in-process handler makes a relative call as the program
 * gave it, with no readlink of the directory (worker/trace/_fastopen_tracee_paths.c,
 * plain_host_dir).  Part of _fastopen.c's translation unit (fo_init calls note_host_dirs).
 *
 * Why: a relative stat or open from a host directory (a job's working directory, a build
 * tree) had its directory's path read from /proc/thread-self/fd/N or cwd first, ~3 us of its
 * ~5 (1.4 natively), only to learn whether the path could lead where the tracer answers:
 * /proc, /dev, /etc/mtab or the mount (host_path).  From a directory on a file system none of
 * whose mount points is /proc, /dev or below them, and that holds neither /proc nor /dev
 * itself, a relative path with no ".." stays on the host, unless the directory is "/", /etc
 * or an ancestor of the mount, whose entries name those; a symlink on the way is the kernel's
 * to follow, as it was.  Only where the mount does not exist on the host (host_writes): no
 * host directory can be in it then.
 */

#include <sys/sysmacros.h>

/* An octal-escaped mountinfo field ("\040" for a space) in place; its length. */
static size_t unescape_field(char *s)
{
    size_t i = 0, o = 0;
    while (s[i]) {
        if (s[i] == '\\' && s[i + 1] >= '0' && s[i + 1] <= '3' && s[i + 2] >= '0' &&
            s[i + 2] <= '7' && s[i + 3] >= '0' && s[i + 3] <= '7') {
            s[o++] = (char)((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0'));
            i += 4;
        } else {
            s[o++] = s[i++];
        }
    }
    s[o] = 0;
    return o;
}

/* Is `point` (a mount point) where host_path sends calls to the tracer: under "/proc" or
 * "/dev" (as host_path spells them: by prefix), or the mount or below it? */
static int tracers_point(const char *point, const char *mount, size_t mount_n)
{
    if (strncmp(point, "/proc", 5) == 0 || strncmp(point, "/dev", 4) == 0)
        return 1;
    return strncmp(point, mount, mount_n) == 0 && (point[mount_n] == '/' || !point[mount_n]);
}

static int listed_dev(const uint64_t *devs, size_t n, uint64_t dev)
{
    for (size_t i = 0; i < n; i++)
        if (devs[i] == dev)
            return 1;
    return 0;
}

/* hdr->plain_devs and hdr->near_dirs, from this mount namespace (the tracees'). */
static void note_host_dirs(void)
{
    memset(hdr->plain_devs, 0, sizeof hdr->plain_devs);
    memset(hdr->near_dirs, 0, sizeof hdr->near_dirs);
    if (!hdr->host_writes)
        return;
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f)
        return;
    uint64_t good[64], bad[66];
    size_t ng = 0, nb = 0;
    int whole = 1; /* every line read and kept: else no file system is plain */
    char line[4096];
    while (whole && fgets(line, sizeof line, f)) {
        unsigned maj, min;
        char point[4096];
        /* "36 35 98:0 /root /mount/point options ..." */
        whole = strchr(line, '\n') != NULL;
        if (!whole || sscanf(line, "%*u %*u %u:%u %*s %4095s", &maj, &min, point) != 3)
            continue;
        unescape_field(point);
        uint64_t dev = (uint64_t)makedev(maj, min);
        if (tracers_point(point, hdr->mount, hdr->mount_len)) {
            if (!listed_dev(bad, nb, dev))
                whole = nb < 64 && (bad[nb++] = dev, 1);
        } else if (!listed_dev(good, ng, dev)) {
            whole = ng < 64 && (good[ng++] = dev, 1);
        }
    }
    whole = whole && !ferror(f);
    fclose(f);
    if (!whole)
        return;
    struct stat st;
    const char *holders[] = {"/proc", "/dev"}; /* where they are directories of another */
    for (size_t k = 0; k < 2; k++)
        if (stat(holders[k], &st) == 0)
            bad[nb++] = (uint64_t)st.st_dev;
    size_t n = 0;
    for (size_t i = 0; i < ng && n < FO_PLAIN_DEVS; i++)
        if (good[i] && !listed_dev(bad, nb, good[i]))
            hdr->plain_devs[n++] = good[i];
    /* "/", /etc and the mount's ancestors: their entries name what the tracer answers */
    char dir[256];
    size_t m = 0;
    memcpy(dir, "/etc", 5);
    if (stat(dir, &st) == 0) {
        hdr->near_dirs[m][0] = (uint64_t)st.st_dev;
        hdr->near_dirs[m++][1] = (uint64_t)st.st_ino;
    }
    for (size_t i = 0; i < hdr->mount_len && m < FO_NEAR_DIRS; i++) {
        if (hdr->mount[i] != '/')
            continue;
        memcpy(dir, hdr->mount, i ? i : 1);
        dir[i ? i : 1] = 0;
        if (stat(dir, &st) != 0) {
            memset(hdr->plain_devs, 0, sizeof hdr->plain_devs); /* (not to be: keep /proc's way) */
            return;
        }
        hdr->near_dirs[m][0] = (uint64_t)st.st_dev;
        hdr->near_dirs[m++][1] = (uint64_t)st.st_ino;
    }
    if (m == FO_NEAR_DIRS) /* a mount too deep to name them all: none made as given */
        memset(hdr->plain_devs, 0, sizeof hdr->plain_devs);
}
