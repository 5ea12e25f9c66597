/*
 * Restore's per-file hot path in C: open (or create) a regular file, write its last chunk and set its
 * owner, mode and times, in one call that releases the GIL once.
 *
 * Why here: done from Python, a small file costs six system calls (open, pwrite, fchown, chmod, utime,
 * close), each a GIL hand-off between restore's worker threads and its walk; with 20,000 small files those
 * hand-offs (futex wake-ups and context switches) cost more than the system calls themselves.
 *
 * The call stops at the first failure and hands the open descriptor back, so the caller's Python code
 * takes over from there and reports the problem the way it always does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

/* Outcomes (the first item of the result). */
enum { DONE = 0, NOT_CREATED = 1, WRITE_FAILED = 2, META_FAILED = 3 };

PyDoc_STRVAR(write_file_doc,
"write_file(path, data, offset, create, uid, gid, mode, atime_ns, mtime_ns, /)\n"
"-> (status, errno, written, fd)\n\n"
"Open ``path`` (O_NOFOLLOW; with ``create`` O_CREAT | O_EXCL, mode 0600), write ``data`` at ``offset``, fchown to\n"
"uid:gid (skipped when uid is -1), fchmod to ``mode`` and set the times (skipped when atime_ns is None),\n"
"and close it. status 0: all done (fd -1). 1: the file could not be opened (errno says why; nothing\n"
"changed). 2: writing failed after ``written`` bytes; 3: the metadata failed. For 2 and 3 the file is\n"
"left open as ``fd`` for the caller to finish and close.");

static PyObject *
write_file(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "write_file takes 9 arguments (path, data, offset, create, uid, "
                                         "gid, mode, atime_ns, mtime_ns)");
        return NULL;
    }
    const char *path;
    Py_ssize_t path_len;
    if (PyBytes_AsStringAndSize(args[0], (char **)&path, &path_len) < 0)
        return NULL;
    if ((Py_ssize_t)strlen(path) != path_len) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte in path");
        return NULL;
    }
    long long offset = PyLong_AsLongLong(args[2]);
    int create = PyObject_IsTrue(args[3]);
    long uid = PyLong_AsLong(args[4]);
    long gid = PyLong_AsLong(args[5]);
    long mode = PyLong_AsLong(args[6]);
    if (PyErr_Occurred() || create < 0)
        return NULL;
    int set_times = args[7] != Py_None;
    struct timespec times[2];
    if (set_times) {
        long long ns[2];
        for (int i = 0; i < 2; i++) {
            ns[i] = PyLong_AsLongLong(args[7 + i]);
            if (ns[i] == -1 && PyErr_Occurred())
                return NULL;
            /* floor division, so times before 1970 come out right */
            long long sec = ns[i] / 1000000000LL, rem = ns[i] % 1000000000LL;
            if (rem < 0) {
                rem += 1000000000LL;
                sec -= 1;
            }
            times[i].tv_sec = (time_t)sec;
            times[i].tv_nsec = (long)rem;
        }
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0)
        return NULL;

    int status = DONE, err = 0, fd;
    Py_ssize_t written = 0;
    Py_BEGIN_ALLOW_THREADS
    fd = open(path, O_WRONLY | O_CLOEXEC | O_NOFOLLOW | (create ? O_CREAT | O_EXCL : 0), 0600);
    if (fd < 0) {
        status = NOT_CREATED;
        err = errno;
    }
    while (status == DONE && written < data.len) {
        ssize_t n = pwrite(fd, (const char *)data.buf + written, (size_t)(data.len - written),
                           (off_t)(offset + written));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            status = WRITE_FAILED;
            err = errno;
        } else {
            written += n;
        }
    }
    if (status == DONE && uid != -1 && fchown(fd, (uid_t)uid, (gid_t)gid) < 0) {
        status = META_FAILED;
        err = errno;
    }
    if (status == DONE && fchmod(fd, (mode_t)mode) < 0) {
        status = META_FAILED;
        err = errno;
    }
    if (status == DONE && set_times && futimens(fd, times) < 0) {
        status = META_FAILED;
        err = errno;
    }
    if (status == DONE) {
        close(fd);
        fd = -1;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (status == NOT_CREATED)
        fd = -1;
    return Py_BuildValue("iini", status, err, written, fd);
}

static PyMethodDef module_methods[] = {
    {"write_file", (PyCFunction)(void (*)(void))write_file, METH_FASTCALL, write_file_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef newfile_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_newfile",
    .m_doc = "Restore's one-call file finish (open, write, owner, mode, times); see vaultfs.ops.restore.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__newfile(void)
{
    return PyModule_Create(&newfile_module);
}
