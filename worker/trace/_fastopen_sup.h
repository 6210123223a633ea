/* In-process opens: what the tracer (worker/trace/_trap.c) calls in worker/trace/_fastopen.c,
 * always under its `big` lock.  See _fastopen.h. */
#ifndef HEP_FASTOPEN_SUP_H
#define HEP_FASTOPEN_SUP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "_fastopen.h"

/* 0 or -errno; table_dir: a directory on a tmpfs for the table (NULL: a memfd) */
int fo_init(const char *mount, size_t mount_n, const char *table_dir);
/* a table file made ahead (the node's service): its fd, or -errno; the next fo_init's */
int fo_make_table(const char *dir, size_t answers, size_t arena);
void fo_give_table(int fd);
int fo_table_given(void); /* did this run's fo_init take one */
void fo_fini(void);
/* for getcwd and getdents64 in-process: the shadow tree as /proc spells it, its st_dev */
void fo_set_shadow(const char *shadow, size_t n, uint64_t dev);
void fo_add_object_dir(const char *dir, size_t n); /* opens there: openat on a tracee's fd */
int fo_enabled(void);
uint64_t fo_cookie(void);
/* kind: FO_OPEN/STAT/LSTAT/IDENT (_fastopen.h); data: a path (is_path, with its NUL) or a
 * struct stat, or none (dlen 0: the answer is -err); dev/ino: the RAM file it depends on */
int fo_publish(unsigned kind, const char *key, size_t kn, const void *data, size_t dlen,
               int is_path, int err, uint64_t dev, uint64_t ino);
/* fo_publish with the key's hash (fo_hash_finish), its slot prefetched: a publish follows */
uint64_t fo_prefetch_hash(uint64_t hash);
int fo_publish_hashed(unsigned kind, const char *key, size_t kn, uint64_t hash, const void *data,
                      size_t dlen, int is_path, int err, uint64_t dev, uint64_t ino);
/* The live answer of (kind, key): 1 and its data (a struct stat, a path with is_path, or
 * none: -err), else 0. */
int fo_find(unsigned kind, const char *key, size_t kn, const char **data, size_t *dlen,
            int *err, int *is_path);
/* many answers follow: size the table for them, fault their memory in at once */
void fo_reserve(size_t answers, size_t arena_bytes);
void fo_expect(size_t answers); /* only size the table */
void fo_add_ram_dev(uint64_t dev); /* the tracer answers fstat for some files there */
int fo_host_writes(void); /* tracees make writes on host paths themselves (fo_init) */
void fo_withdraw(unsigned kind, const char *key, size_t kn);
/* every answer naming this file; the keys of up to `max` opens among them (in the table) */
size_t fo_withdraw_file(uint64_t dev, uint64_t ino, const char **opens, size_t *lens,
                        size_t max);
void fo_withdraw_all(void);
/* Files that serve paths with different answers (fo_shared_t): one added (0: the table is
 * full; `last`: the stat of the path opened last, or NULL), known, opened by the tracer under
 * a path with this stat; the stat of the path opened last (0: none known). */
int fo_shared_add(uint64_t dev, uint64_t ino, const void *last);
int fo_shared_known(uint64_t dev, uint64_t ino);
void fo_shared_opened(uint64_t dev, uint64_t ino, const void *st);
int fo_shared_last(uint64_t dev, uint64_t ino, void *st);
/* An open of a known shared file, published with its path's stat (target: tn bytes, no NUL;
 * st: a struct stat), which tracees that open it make the file's `last`.  0: not published. */
int fo_publish_shared_open(const char *key, size_t kn, const char *target, size_t tn,
                           const void *st, uint64_t dev, uint64_t ino);
void fo_counts(unsigned long long *hits, unsigned long long *misses,
               unsigned long long *stat_hits, unsigned long long *stat_misses,
               unsigned long long *patched, unsigned long long *injected,
               unsigned long long *host);
void fo_table(unsigned long long *answers, unsigned long long *nslots, unsigned long long *moves);
int fo_exec(pid_t pid, int *other); /* 1: handle waitpid status *other instead */
void fo_fork(pid_t parent, pid_t child);
void fo_gone(pid_t tid);
void fo_patch(pid_t tid, long nr, uint64_t ip);
/* fo_patch of the site in tid's parent (the process runs meanwhile: see site_whole) */
void fo_patch_parent(pid_t parent, long nr, uint64_t ip);
int fo_sigtrap(pid_t tid); /* 1: a patching int3, dealt with: continue without the signal */

#endif
