/*
 * What both loops use: stop signals, kill_all, the --stats dict, argv/env conversion.
 *
 * Part of the one translation unit of worker/trace/_trap.c (see README.md here): it uses what
 * _trap.c's header and filter.c, answers.c, threads.c, config.c define.
 */

/* ---------- the loop ---------- */

static int is_stop_signal(int sig)
{
    return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU;
}

static void kill_all(void)
{
    for (size_t i = 0; i < threads_cap; i++)
        if (threads[i].tid > 0)
            kill(threads[i].tid, SIGKILL);
}

static PyObject *stats_dict(size_t cached, const char *mode)
{
    PyObject *per = PyDict_New();
    if (!per)
        return NULL;
    for (size_t i = 0; i < sizeof trapped / sizeof trapped[0]; i++) {
        int nr = trapped[i];
        if (nr < 0 || nr >= NSYS || !n_trapped[nr])
            continue;
        PyObject *k = PyUnicode_FromString(trapped_names[i]);
        PyObject *v = PyLong_FromUnsignedLongLong(n_trapped[nr]);
        if (!k || !v || PyDict_SetItem(per, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(per);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    unsigned long long fh, fm, sh, sm, fp, fi, fho, fta, fts, ftm;
    fo_counts(&fh, &fm, &sh, &sm, &fp, &fi, &fho);
    fo_table(&fta, &fts, &ftm);
    return Py_BuildValue("{s:N,s:K,s:K,s:K,s:K,s:n,s:K,s:s,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,"
                         "s:K,s:K,s:K,s:i}",
                         "trapped", per, "passed", n_pass, "hits", n_hits, "upcalls", n_upcalls,
                         "absent", n_absent, "cached",
                         (Py_ssize_t)cached, "notified", n_notified, "mode", mode,
                         "inproc_opens", fh, "inproc_misses", fm, "inproc_stats", sh,
                         "inproc_stat_misses", sm, "inproc_sites", fp, "inproc_images", fi,
                         "inproc_host", fho, "node_puts", n_node_puts, "node_dirs", n_node_dirs, "opens_put", n_opens_put,
                         "inproc_answers", fta, "inproc_slots", fts, "inproc_moves", ftm,
                         "inproc_given", fo_table_given());
}

static char **to_cstrings(PyObject *seq)
{
    Py_ssize_t n = PySequence_Size(seq);
    if (n < 0)
        return NULL;
    char **out = calloc((size_t)n + 1, sizeof *out);
    if (!out) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PySequence_GetItem(seq, i);
        char *s;
        if (!it || PyBytes_AsStringAndSize(it, &s, NULL) < 0) {
            Py_XDECREF(it);
            for (Py_ssize_t j = 0; j < i; j++)
                free(out[j]);
            free(out);
            return NULL;
        }
        out[i] = strdup(s);
        Py_DECREF(it);
    }
    return out;
}

static void free_cstrings(char **v)
{
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free(*p);
    free(v);
}

extern char **environ;
