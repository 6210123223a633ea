/*
 * A short-lived child that runs in our memory (clone CLONE_VM|CLONE_VFORK, as posix_spawn
 * does): no copy of a Python process's page tables, ~1 ms less than a fork of a job-sized
 * hep-exec.  The calling thread waits until the child exits.  Shared by worker/trace/_tmpfs.c
 * (the private tmpfs's helper) and worker/trace/_trap.c (the notify-mode probe).  The child
 * runs on a stack of its own with every signal blocked (no handler of ours runs in it) and
 * must make only system calls before it returns or calls _exit.
 */
#ifndef HEP_SPAWN_H
#define HEP_SPAWN_H

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>

/* Start `fn(arg)` in such a child; its pid, or -1 with errno set. */
static pid_t spawn_in_our_memory(int (*fn)(void *), void *arg)
{
    size_t size = 64 * 1024;
    char *stack = malloc(size);
    if (!stack) {
        errno = ENOMEM;
        return -1;
    }
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    pid_t pid = clone(fn, stack + size, CLONE_VM | CLONE_VFORK | SIGCHLD, arg);
    int e = errno;
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    free(stack); /* (the child has exited: CLONE_VFORK) */
    errno = e;
    return pid;
}

#endif
