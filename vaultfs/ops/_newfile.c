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
#include <string.h>

#include "_newfile.h"

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
    newfile f = {0};
    Py_ssize_t path_len;
    if (PyBytes_AsStringAndSize(args[0], (char **)&f.path, &path_len) < 0)
        return NULL;
    if ((Py_ssize_t)strlen(f.path) != path_len) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte in path");
        return NULL;
    }
    f.offset = PyLong_AsLongLong(args[2]);
    f.create = PyObject_IsTrue(args[3]);
    f.uid = PyLong_AsLong(args[4]);
    f.gid = PyLong_AsLong(args[5]);
    f.mode = PyLong_AsLong(args[6]);
    if (PyErr_Occurred() || f.create < 0)
        return NULL;
    f.set_times = args[7] != Py_None;
    for (int i = 0; f.set_times && i < 2; i++) {
        long long ns = PyLong_AsLongLong(args[7 + i]);
        if (ns == -1 && PyErr_Occurred())
            return NULL;
        newfile_timespec(ns, &f.times[i]);
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    newfile_write(&f, data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return Py_BuildValue("iini", f.status, f.err, (Py_ssize_t)f.written, f.fd);
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
