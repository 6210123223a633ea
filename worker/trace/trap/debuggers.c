/*
 * ptrace calls of the command: a debugger or strace asking to trace a process of the job.
 * Every process of the job has hep-exec as its tracer, and a process has only one, so the
 * kernel refuses them (EPERM), and the program says no more than "Operation not permitted"
 * (gdb, strace, and the crash handlers of ROOT and CMSSW that run `gdb -p` for a backtrace).
 * The refusal stays (the kernel's errno, said by us); hep-exec adds one line on its stderr,
 * once a run, saying why and what works instead: a core file, which gdb reads without
 * tracing anything, under hep-exec, where the program's /cvmfs libraries are.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and config.c, paths.c, apply.c define.
 */

static int said_tracer; /* the line is said once a run (trap_run clears it) */

/* Does our process trace tid?  /proc/<tid>/status's TracerPid is the tracer's tgid. */
static int traced_by_us(pid_t tid)
{
    char buf[1024];
    const char *at = proc_status(tid, buf, sizeof buf) ? strstr(buf, "\nTracerPid:") : NULL;
    return at && atoi(at + sizeof "\nTracerPid:" - 1) == (int)getpid();
}

static void say_tracer(pid_t tid, const char *what)
{
    if (said_tracer)
        return;
    said_tracer = 1;
    char buf[256], comm[32] = "a program"; /* status's first line: "Name:\t<comm>" */
    if (proc_status(tid, buf, sizeof buf) && !strncmp(buf, "Name:\t", 6)) {
        size_t n = strcspn(buf + 6, "\n");
        if (n && n < sizeof comm) {
            memcpy(comm, buf + 6, n);
            comm[n] = 0;
        }
    }
    dprintf(2,
            "hep-exec: %s (pid %d) asked %s, which no process of this job can be: hep-exec "
            "traces each one itself and a process has one tracer (debuggers and strace do not "
            "run under hep-exec); for a backtrace, let the program dump core (ulimit -c "
            "unlimited) and run gdb PROGRAM CORE under hep-exec\n",
            comm, (int)tid, what);
}

/* ptrace(request, pid, ...): 1 if answered here (EPERM, as the kernel would), else 0 (the
 * kernel's: a process outside the job may be traced by one inside). */
static int ptrace_call(pid_t tid, struct user_regs_struct *r)
{
    long req = (long)r->rdi;
    pid_t target = (pid_t)r->rsi;
    char what[64];
    if (req == PTRACE_TRACEME)
        snprintf(what, sizeof what, "to be traced by its parent");
    else if ((req == PTRACE_ATTACH || req == PTRACE_SEIZE) && target > 0 && traced_by_us(target))
        snprintf(what, sizeof what, "to trace pid %d", (int)target);
    else {
        n_pass++;
        return 0;
    }
    say_tracer(tid, what);
    skip_with(r, -EPERM);
    return 1;
}
