/*
 * Tree nodes from their JSON objects, in C: the common case of Node.from_json (vaultfs/format/tree.py).
 *
 * Why here: json.loads is C already, but turning each decoded object into a Node (a dozen dict look-ups,
 * int() calls, three RFC 3339 times, hex content IDs, the dataclass __init__) cost about 10 us a node in
 * Python, and a restore's tree loader held the GIL for that while four workers waited for it.
 *
 * This file accepts a strict subset of what from_json accepts and builds exactly what from_json would
 * build from it: ASCII times of the usual shape with real dates, exact ints, plain strings, 64-digit hex
 * IDs, names without a backslash or a surrogate. Any node outside that subset (and any node with
 * extended attributes, generic attributes or a raw link target) goes to the fallback, which is
 * Node.from_json itself, so every unusual or invalid node is handled and reported by the one Python
 * definition. tests/format/test_tree_native.py holds the two to the same results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "../_hexid.h"

enum {
    K_NAME, K_TYPE, K_MODE, K_MTIME, K_ATIME, K_CTIME, K_UID, K_GID, K_USER, K_GROUP, K_INODE,
    K_DEVICE_ID, K_SIZE, K_LINKS, K_LINKTARGET, K_LINKTARGET_RAW, K_XATTRS, K_GENERIC, K_DEVICE,
    K_CONTENT, K_SUBTREE, K_ERROR, K_NS, K_OFFSET, K_COUNT
};
static const char *key_names[K_COUNT] = {
    "name", "type", "mode", "mtime", "atime", "ctime", "uid", "gid", "user", "group", "inode",
    "device_id", "size", "links", "linktarget", "linktarget_raw", "extended_attributes",
    "generic_attributes", "device", "content", "subtree", "error", "ns", "offset",
};
static PyObject *keys[K_COUNT];

/* The Node fields in dataclass order (the order __init__ sets them, so instances share dict keys). */
static const int node_fields[] = {
    K_NAME, K_TYPE, K_MODE, K_MTIME, K_ATIME, K_CTIME, K_UID, K_GID, K_USER, K_GROUP, K_INODE,
    K_DEVICE_ID, K_SIZE, K_LINKS, K_LINKTARGET, K_XATTRS, K_GENERIC, K_DEVICE, K_CONTENT, K_SUBTREE,
    K_ERROR,
};
#define NODE_FIELDS ((int)(sizeof(node_fields) / sizeof(node_fields[0])))

static const char *node_types[] = {
    "file", "dir", "symlink", "dev", "chardev", "fifo", "socket", "irregular",
};
static PyObject *types[8];

static PyObject *empty_str, *empty_tuple, *zero;

/* A value of the document; Py_None (borrowed) when the key is missing; NULL on an error. */
static PyObject *
field(PyObject *doc, int k)
{
    PyObject *v = PyDict_GetItemWithError(doc, keys[k]);
    if (v == NULL && !PyErr_Occurred())
        return Py_None;
    return v;
}

/* int(doc.get(k) or 0) for an exact int or a missing/null value (a new reference); NULL: not ours. */
static PyObject *
int_field(PyObject *v)
{
    if (v == Py_None) {
        Py_INCREF(zero);
        return zero;
    }
    if (PyLong_CheckExact(v)) {
        Py_INCREF(v);
        return v;
    }
    return NULL;
}

/* doc.get(k) or "" for an exact str or a missing/null value (a new reference); NULL: not ours. */
static PyObject *
str_field(PyObject *v)
{
    if (v == Py_None) {
        Py_INCREF(empty_str);
        return empty_str;
    }
    if (PyUnicode_CheckExact(v)) {
        Py_INCREF(v);
        return v;
    }
    return NULL;
}

static int
digits(const char *s, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 1;
}

/* Days from 1970-01-01 to a proleptic Gregorian date (as datetime counts them). */
static int64_t
days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int
month_days(int y, int m)
{
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (m == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0))
        return 29;
    return days[m - 1];
}

/* "YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|+hh:mm|-hh:mm)" with a real date and time of day, and a time that
 * fits int64 nanoseconds. Returns 1 and the result, or 0 (then GoTime.parse decides). */
static int
parse_time(PyObject *text, int64_t *ns_out, int *offset_out)
{
    if (!PyUnicode_IS_ASCII(text))
        return 0;
    const char *s = (const char *)PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    int y, mo, d, h, mi, sec;
    if (n < 20 || s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' || s[16] != ':')
        return 0;
    if (!digits(s, 4, &y) || !digits(s + 5, 2, &mo) || !digits(s + 8, 2, &d) ||
        !digits(s + 11, 2, &h) || !digits(s + 14, 2, &mi) || !digits(s + 17, 2, &sec))
        return 0;
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || d > month_days(y, mo) || h > 23 || mi > 59 || sec > 59)
        return 0;
    Py_ssize_t i = 19;
    int64_t nanos = 0;
    if (s[i] == '.') {
        Py_ssize_t start = ++i;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
        Py_ssize_t len = i - start;
        if (len < 1 || len > 9)
            return 0;
        for (Py_ssize_t j = 0; j < 9; j++)
            nanos = nanos * 10 + (j < len ? s[start + j] - '0' : 0);
    }
    int offset;
    if (n - i == 1 && s[i] == 'Z') {
        offset = 0;
    } else if (n - i == 6 && (s[i] == '+' || s[i] == '-') && s[i + 3] == ':') {
        int oh, om;
        if (!digits(s + i + 1, 2, &oh) || !digits(s + i + 4, 2, &om) || oh > 23 || om > 59)
            return 0;
        offset = (oh * 3600 + om * 60) * (s[i] == '+' ? 1 : -1);
    } else {
        return 0;
    }
    int64_t secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - offset;
    if (secs > INT64_MAX / 1000000000 - 1 || secs < INT64_MIN / 1000000000 + 1)
        return 0;
    *ns_out = secs * 1000000000 + nanos;
    *offset_out = offset;
    return 1;
}

/* Missing (None here), null or "": what ``x or default`` in from_json replaces. */
static int
falsy_or_missing(PyObject *v)
{
    return v == Py_None || (PyUnicode_CheckExact(v) && PyUnicode_GET_LENGTH(v) == 0);
}

/* A GoTime for a time field (a new reference); NULL without an error: not ours. */
static PyObject *
time_field(PyObject *v, PyTypeObject *time_cls, PyObject *zero_time)
{
    if (falsy_or_missing(v)) {
        Py_INCREF(zero_time);
        return zero_time;
    }
    int64_t ns;
    int offset;
    if (!PyUnicode_CheckExact(v) || !parse_time(v, &ns, &offset))
        return NULL;
    PyObject *t = time_cls->tp_new(time_cls, empty_tuple, NULL);
    if (t == NULL)
        return NULL;
    PyObject *ns_obj = PyLong_FromLongLong(ns), *off_obj = PyLong_FromLong(offset);
    /* GoTime is frozen: the generic setter goes past its __setattr__ to the slots, as __init__ does. */
    if (ns_obj == NULL || off_obj == NULL || PyObject_GenericSetAttr(t, keys[K_NS], ns_obj) < 0 ||
        PyObject_GenericSetAttr(t, keys[K_OFFSET], off_obj) < 0) {
        Py_XDECREF(ns_obj);
        Py_XDECREF(off_obj);
        Py_DECREF(t);
        return NULL;
    }
    Py_DECREF(ns_obj);
    Py_DECREF(off_obj);
    return t;
}

/* Whether two time texts are equal as from_json compares them (both are None or exact str here). */
static int
same_text(PyObject *a, PyObject *b)
{
    if (a == b)
        return 1;
    if (a == Py_None || b == Py_None)
        return 0;
    return PyUnicode_Compare(a, b) == 0;
}

/* Whether a name is returned unchanged by fs_name(go_unquote(name)): no escape, no surrogate. */
static int
plain_name(PyObject *name)
{
    if (!PyUnicode_CheckExact(name) || PyUnicode_GET_LENGTH(name) == 0)
        return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(name);
    int kind = PyUnicode_KIND(name);
    const void *data = PyUnicode_DATA(name);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c == '\\' || (c >= 0xD800 && c <= 0xDFFF))
            return 0;
    }
    return 1;
}


/* One node, or NULL without an error when the fallback must decide, or NULL with an error. */
static PyObject *
fast_node(PyObject *doc, PyTypeObject *node_cls, PyTypeObject *time_cls, PyObject *zero_time)
{
    PyObject *raw[K_COUNT];
    for (int k = 0; k < K_NS; k++) {
        raw[k] = field(doc, k);
        if (raw[k] == NULL)
            return NULL;
    }
    /* What only from_json handles. */
    if (!falsy_or_missing(raw[K_LINKTARGET_RAW]) || raw[K_GENERIC] != Py_None)
        return NULL;
    if (raw[K_XATTRS] != Py_None && !(PyList_CheckExact(raw[K_XATTRS]) && PyList_GET_SIZE(raw[K_XATTRS]) == 0))
        return NULL;
    if (!plain_name(raw[K_NAME]) || !PyUnicode_CheckExact(raw[K_TYPE]))
        return NULL;
    PyObject *type = NULL;
    for (int i = 0; i < 8; i++) {
        if (PyUnicode_Compare(raw[K_TYPE], types[i]) == 0) {
            type = types[i];
            break;
        }
    }
    if (type == NULL)
        return NULL;
    for (int k = K_MTIME; k <= K_CTIME; k++) {
        if (raw[k] != Py_None && !PyUnicode_CheckExact(raw[k]))
            return NULL;
    }

    PyObject *val[K_COUNT] = {NULL};
    PyObject *node = NULL;
    val[K_NAME] = raw[K_NAME];
    Py_INCREF(val[K_NAME]);
    val[K_TYPE] = type;
    Py_INCREF(type);
    static const int ints[] = {K_MODE, K_UID, K_GID, K_INODE, K_DEVICE_ID, K_SIZE, K_LINKS, K_DEVICE};
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++) {
        if ((val[ints[i]] = int_field(raw[ints[i]])) == NULL)
            goto done;
    }
    static const int strs[] = {K_USER, K_GROUP, K_LINKTARGET, K_ERROR};
    for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++) {
        if ((val[strs[i]] = str_field(raw[strs[i]])) == NULL)
            goto done;
    }
    if ((val[K_MTIME] = time_field(raw[K_MTIME], time_cls, zero_time)) == NULL)
        goto done;
    if (same_text(raw[K_ATIME], raw[K_MTIME])) {
        val[K_ATIME] = val[K_MTIME];
        Py_INCREF(val[K_ATIME]);
    } else if ((val[K_ATIME] = time_field(raw[K_ATIME], time_cls, zero_time)) == NULL) {
        goto done;
    }
    if (same_text(raw[K_CTIME], raw[K_MTIME])) {
        val[K_CTIME] = val[K_MTIME];
        Py_INCREF(val[K_CTIME]);
    } else if (same_text(raw[K_CTIME], raw[K_ATIME])) {
        val[K_CTIME] = val[K_ATIME];
        Py_INCREF(val[K_CTIME]);
    } else if ((val[K_CTIME] = time_field(raw[K_CTIME], time_cls, zero_time)) == NULL) {
        goto done;
    }
    if ((val[K_XATTRS] = PyList_New(0)) == NULL)
        goto done;
    val[K_GENERIC] = Py_None;
    Py_INCREF(Py_None);
    PyObject *content = raw[K_CONTENT];
    if (content == Py_None) {
        val[K_CONTENT] = Py_None;
        Py_INCREF(Py_None);
    } else if (PyList_CheckExact(content)) {
        Py_ssize_t n = PyList_GET_SIZE(content);
        if ((val[K_CONTENT] = PyList_New(n)) == NULL)
            goto done;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *id = hex_id(PyList_GET_ITEM(content, i));
            if (id == NULL)
                goto done;
            PyList_SET_ITEM(val[K_CONTENT], i, id);
        }
    } else {
        goto done;
    }
    if (raw[K_SUBTREE] == Py_None) {
        val[K_SUBTREE] = Py_None;
        Py_INCREF(Py_None);
    } else if ((val[K_SUBTREE] = hex_id(raw[K_SUBTREE])) == NULL) {
        goto done;
    }

    node = node_cls->tp_new(node_cls, empty_tuple, NULL);
    if (node == NULL)
        goto done;
    for (int i = 0; i < NODE_FIELDS; i++) {
        if (PyObject_GenericSetAttr(node, keys[node_fields[i]], val[node_fields[i]]) < 0) {
            Py_CLEAR(node);
            break;
        }
    }
done:
    for (int k = 0; k < K_COUNT; k++)
        Py_XDECREF(val[k]);
    return node;
}

static PyObject *
decode_nodes(PyObject *self, PyObject *args)
{
    PyObject *docs, *node_cls, *time_cls, *zero_time, *fallback;
    if (!PyArg_ParseTuple(args, "O!O!O!OO:decode_nodes", &PyList_Type, &docs, &PyType_Type, &node_cls,
                          &PyType_Type, &time_cls, &zero_time, &fallback))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(docs);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *doc = PyList_GET_ITEM(docs, i);
        PyObject *node = NULL;
        if (PyDict_CheckExact(doc)) {
            node = fast_node(doc, (PyTypeObject *)node_cls, (PyTypeObject *)time_cls, zero_time);
            if (node == NULL && PyErr_Occurred()) {
                Py_DECREF(out);
                return NULL;
            }
        }
        if (node == NULL && (node = PyObject_CallOneArg(fallback, doc)) == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, node);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"decode_nodes", decode_nodes, METH_VARARGS,
     "decode_nodes(docs, Node, GoTime, zero_time, fallback) -> list of Node: Node.from_json of each "
     "decoded JSON object; the objects the fast path does not take go to fallback(doc)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tree", "Tree nodes from their JSON objects (see tree.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__tree(void)
{
    for (int k = 0; k < K_COUNT; k++) {
        if ((keys[k] = PyUnicode_InternFromString(key_names[k])) == NULL)
            return NULL;
    }
    for (int i = 0; i < 8; i++) {
        if ((types[i] = PyUnicode_InternFromString(node_types[i])) == NULL)
            return NULL;
    }
    if ((empty_str = PyUnicode_FromString("")) == NULL || (empty_tuple = PyTuple_New(0)) == NULL ||
        (zero = PyLong_FromLong(0)) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
