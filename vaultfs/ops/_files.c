/*
 * Backup's small-file hot path in C: open, fstat, list the extended attributes and read a whole batch of
 * small files into one buffer, releasing the GIL once for the batch; and list a folder with the lstat of
 * every entry, releasing it once for the folder.
 *
 * Why here: done from Python, each small file costs about six system calls (open, fstat, listxattr,
 * read, read again for the end, close), and each one hands the GIL between backup's threads (the walk,
 * two readers, two blob workers, the pack writer). On the benchmark's 20,000 small files those
 * hand-offs (futex wake-ups and context switches) cost more CPU than the reading itself.
 *
 * A file found bigger than the limit (or bigger than the room left in the buffer) is handed back open,
 * at offset 0, for the caller's chunking path. Every failure is handed back as an errno, so the caller
 * reports it the way it always has.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "../_hexid.h"

/* Outcomes (the first item of each result). */
enum { READ = 0, BIG = 1, OPEN_FAILED = 2, FAILED = 3, NOT_REGULAR = 4 };

typedef struct {
    int status;
    int err;
    int fd;
    struct stat st;
    size_t offset;
    size_t length;
    char *names;       /* flistxattr's list (NUL-separated), NULL when none */
    ssize_t names_len;
    char **values;     /* one malloc'd value per name, NULL for a name that vanished */
    ssize_t *value_len;
    int count;         /* names in the list */
} result_t;

static int
no_xattrs(int err)
{
    return err == ENOTSUP || err == EOPNOTSUPP || err == ENOSYS || err == ENODATA;
}

/* The file's extended attributes, in the kernel's listing order. 0, or an errno. */
static int
read_xattrs(int fd, result_t *r)
{
    for (int attempt = 0; attempt < 8; attempt++) {
        ssize_t n = flistxattr(fd, NULL, 0);
        if (n < 0)
            return no_xattrs(errno) ? 0 : errno;
        if (n == 0)
            return 0;
        char *names = malloc((size_t)n);
        if (names == NULL)
            return ENOMEM;
        ssize_t got = flistxattr(fd, names, (size_t)n);
        if (got < 0) {
            int err = errno;
            free(names);
            if (err == ERANGE)
                continue; /* the list grew meanwhile */
            return no_xattrs(err) ? 0 : err;
        }
        r->names = names;
        r->names_len = got;
        break;
    }
    if (r->names == NULL)
        return EAGAIN;
    int count = 0;
    for (ssize_t i = 0; i < r->names_len; i++)
        if (r->names[i] == '\0')
            count++;
    r->values = calloc((size_t)count + 1, sizeof(char *));
    r->value_len = calloc((size_t)count + 1, sizeof(ssize_t));
    if (r->values == NULL || r->value_len == NULL)
        return ENOMEM;
    r->count = count;
    const char *name = r->names;
    for (int i = 0; i < count; i++, name += strlen(name) + 1) {
        for (int attempt = 0;; attempt++) {
            ssize_t n = fgetxattr(fd, name, NULL, 0);
            if (n < 0) {
                if (no_xattrs(errno))
                    break; /* removed since the listing: left out */
                return errno;
            }
            char *value = malloc(n ? (size_t)n : 1);
            if (value == NULL)
                return ENOMEM;
            ssize_t got = fgetxattr(fd, name, value, (size_t)n);
            if (got >= 0) {
                r->values[i] = value;
                r->value_len[i] = got;
                break;
            }
            int err = errno;
            free(value);
            if (no_xattrs(err))
                break;
            if (err != ERANGE || attempt >= 8)
                return err;
        }
    }
    return 0;
}

static void
clear_xattrs(result_t *r)
{
    if (r->values)
        for (int i = 0; i < r->count; i++)
            free(r->values[i]);
    free(r->values);
    free(r->value_len);
    free(r->names);
    r->values = NULL;
    r->value_len = NULL;
    r->names = NULL;
    r->count = 0;
}

/* Read one file into buf[pos, pos + room) (room <= limit + 1 probes for one byte more). */
static void
read_one(const char *path, unsigned char *buf, size_t pos, size_t room, size_t limit, result_t *r)
{
    r->fd = -1;
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOATIME);
    if (fd < 0 && errno == EPERM) /* O_NOATIME needs to own the file: read it the ordinary way */
        fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        r->status = OPEN_FAILED;
        r->err = errno;
        return;
    }
    if (fstat(fd, &r->st) < 0) {
        r->status = FAILED;
        r->err = errno;
        close(fd);
        return;
    }
    if (!S_ISREG(r->st.st_mode)) {
        r->status = NOT_REGULAR;
        close(fd);
        return;
    }
    int err = read_xattrs(fd, r);
    if (err) {
        clear_xattrs(r);
        r->status = FAILED;
        r->err = err;
        close(fd);
        return;
    }
    /* Read at most min(limit, room) bytes and one more: getting that one means the file is longer. */
    size_t cap = room < limit ? room : limit;
    size_t total = 0;
    unsigned char probe;
    for (;;) {
        ssize_t n;
        if (total < cap)
            n = read(fd, buf + pos + total, cap - total);
        else
            n = read(fd, &probe, 1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            r->status = FAILED;
            r->err = errno;
            clear_xattrs(r);
            close(fd);
            return;
        }
        if (n == 0)
            break;
        if (total >= cap) { /* longer than the limit or the room: the caller chunks it */
            clear_xattrs(r);
            if (lseek(fd, 0, SEEK_SET) < 0) {
                r->status = FAILED;
                r->err = errno;
                close(fd);
                return;
            }
            r->status = BIG;
            r->fd = fd;
            return;
        }
        total += (size_t)n;
    }
    close(fd);
    r->status = READ;
    r->offset = pos;
    r->length = total;
}

static PyObject *
stat_tuple(const struct stat *st)
{
    return Py_BuildValue(
        "(KKKKKKLLLLKLL)", (unsigned long long)st->st_mode, (unsigned long long)st->st_ino,
        (unsigned long long)st->st_dev, (unsigned long long)st->st_nlink,
        (unsigned long long)st->st_uid, (unsigned long long)st->st_gid, (long long)st->st_size,
        (long long)st->st_atim.tv_sec * 1000000000LL + st->st_atim.tv_nsec,
        (long long)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec,
        (long long)st->st_ctim.tv_sec * 1000000000LL + st->st_ctim.tv_nsec,
        (unsigned long long)st->st_rdev, (long long)st->st_blksize, (long long)st->st_blocks);
}

static PyObject *
xattr_list(const result_t *r)
{
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    const char *name = r->names;
    for (int i = 0; i < r->count; i++, name += strlen(name) + 1) {
        if (r->values[i] == NULL)
            continue;
        PyObject *item = Py_BuildValue("(O&y#)", PyUnicode_DecodeFSDefault, name, r->values[i],
                                       (Py_ssize_t)r->value_len[i]);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

static PyObject *
result_object(const result_t *r)
{
    switch (r->status) {
    case READ: {
        PyObject *st = stat_tuple(&r->st);
        if (st == NULL)
            return NULL;
        PyObject *xattrs = xattr_list(r);
        if (xattrs == NULL) {
            Py_DECREF(st);
            return NULL;
        }
        return Py_BuildValue("(iNnnN)", READ, st, (Py_ssize_t)r->offset, (Py_ssize_t)r->length,
                             xattrs);
    }
    case BIG:
        return Py_BuildValue("(ii)", BIG, r->fd);
    case NOT_REGULAR:
        return Py_BuildValue("(ii)", NOT_REGULAR, 0);
    default:
        return Py_BuildValue("(ii)", r->status, r->err);
    }
}

PyDoc_STRVAR(read_files_doc,
"read_files(paths, buffer, limit, /) -> list\n\n"
"Read each file of ``paths`` (bytes; opened O_NOFOLLOW, O_NOATIME when allowed) whole into ``buffer``,\n"
"one after the other from offset 0, with the GIL released once. One result per path:\n"
"(0, stat, offset, length, xattrs): read; stat is (mode, ino, dev, nlink, uid, gid, size, atime_ns,\n"
"    mtime_ns, ctime_ns, rdev, blksize, blocks) of the open file, xattrs a list of (name, value).\n"
"(1, fd): longer than ``limit`` or than the room left; open at offset 0, the caller closes it.\n"
"(2, errno): could not be opened. (3, errno): failed after opening. (4, 0): not a regular file.");

static PyObject *
read_files(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "read_files takes 3 arguments (paths, buffer, limit)");
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (limit < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "limit must not be negative");
        return NULL;
    }
    /* A tuple of its own: the bytes it holds stay alive and in place while the GIL is released. */
    PyObject *paths = PySequence_Tuple(args[0]);
    if (paths == NULL)
        return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(paths);
    const char **names = PyMem_Calloc((size_t)count + 1, sizeof(char *));
    result_t *results = PyMem_Calloc((size_t)count + 1, sizeof(result_t));
    if (names == NULL || results == NULL) {
        PyMem_Free(names);
        PyMem_Free(results);
        Py_DECREF(paths);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *p = PyTuple_GET_ITEM(paths, i);
        char *s;
        Py_ssize_t len;
        if (!PyBytes_Check(p)) {
            PyErr_SetString(PyExc_TypeError, "paths must be bytes");
            goto fail;
        }
        if (PyBytes_AsStringAndSize(p, &s, &len) < 0)
            goto fail;
        if ((Py_ssize_t)strlen(s) != len) {
            PyErr_SetString(PyExc_ValueError, "embedded null byte in path");
            goto fail;
        }
        names[i] = s;
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(args[1], &buf, PyBUF_WRITABLE) < 0)
        goto fail;

    Py_BEGIN_ALLOW_THREADS
    size_t pos = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        read_one(names[i], buf.buf, pos, (size_t)buf.len - pos, (size_t)limit, &results[i]);
        if (results[i].status == READ)
            pos += results[i].length;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);

    PyObject *out = PyList_New(count);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = out ? result_object(&results[i]) : NULL;
        if (item == NULL) {
            Py_CLEAR(out);
        }
        else {
            PyList_SET_ITEM(out, i, item);
        }
    }
    if (out == NULL) /* hand nothing back: close what would have been handed back */
        for (Py_ssize_t i = 0; i < count; i++)
            if (results[i].status == BIG)
                close(results[i].fd);
    for (Py_ssize_t i = 0; i < count; i++)
        clear_xattrs(&results[i]);
    PyMem_Free(names);
    PyMem_Free(results);
    Py_DECREF(paths);
    return out;

fail:
    PyMem_Free(names);
    PyMem_Free(results);
    Py_DECREF(paths);
    return NULL;
}

/* -- listing a folder ------------------------------------------------------------------------- */

typedef struct {
    char *name;
    int err; /* 0: st holds its lstat */
    struct stat st;
} entry_t;

static int
by_name(const void *a, const void *b)
{
    return strcmp(((const entry_t *)a)->name, ((const entry_t *)b)->name);
}

/* Every entry of the folder at path, lstat'ed through the folder's descriptor, sorted by name bytes.
 * 0, or an errno for the folder itself; *out is malloc'd (names too), free with free_entries. */
static int
list_folder(const char *path, entry_t **out, size_t *count)
{
    *out = NULL;
    *count = 0;
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return errno;
    DIR *dir = fdopendir(fd);
    if (dir == NULL) {
        int err = errno;
        close(fd);
        return err;
    }
    size_t cap = 64, n = 0;
    entry_t *entries = malloc(cap * sizeof(entry_t));
    int err = entries ? 0 : ENOMEM;
    while (!err) {
        errno = 0;
        struct dirent *d = readdir(dir);
        if (d == NULL) {
            err = errno;
            break;
        }
        if (d->d_name[0] == '.' && (d->d_name[1] == '\0' || (d->d_name[1] == '.' && d->d_name[2] == '\0')))
            continue;
        if (n == cap) {
            entry_t *more = realloc(entries, 2 * cap * sizeof(entry_t));
            if (more == NULL) {
                err = ENOMEM;
                break;
            }
            entries = more;
            cap *= 2;
        }
        entries[n].name = strdup(d->d_name);
        if (entries[n].name == NULL) {
            err = ENOMEM;
            break;
        }
        n++;
    }
    for (size_t i = 0; !err && i < n; i++)
        entries[i].err =
            fstatat(dirfd(dir), entries[i].name, &entries[i].st, AT_SYMLINK_NOFOLLOW) < 0 ? errno : 0;
    closedir(dir);
    if (!err)
        qsort(entries, n, sizeof(entry_t), by_name);
    *out = entries;
    *count = n;
    return err;
}

static void
free_entries(entry_t *entries, size_t count)
{
    for (size_t i = 0; i < count; i++)
        free(entries[i].name);
    free(entries);
}

PyDoc_STRVAR(scan_dir_doc,
"scan_dir(path, /) -> list[tuple[bytes, tuple | int]] | int\n\n"
"The entries of the folder at ``path`` (opened O_NOFOLLOW) sorted by name bytes, each with its lstat\n"
"(the tuple read_files gives) or the errno lstat failed with; an int (errno) when the folder itself\n"
"cannot be opened or listed. Releases the GIL once.");

static PyObject *
scan_dir(PyObject *Py_UNUSED(module), PyObject *arg)
{
    char *path;
    Py_ssize_t len;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "path must be bytes");
        return NULL;
    }
    if (PyBytes_AsStringAndSize(arg, &path, &len) < 0)
        return NULL;
    if ((Py_ssize_t)strlen(path) != len) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte in path");
        return NULL;
    }
    entry_t *entries;
    size_t count;
    int err;
    Py_INCREF(arg); /* path stays alive while the GIL is released */
    Py_BEGIN_ALLOW_THREADS
    err = list_folder(path, &entries, &count);
    Py_END_ALLOW_THREADS
    Py_DECREF(arg);
    if (err) {
        free_entries(entries, count);
        return PyLong_FromLong(err);
    }
    PyObject *list = PyList_New((Py_ssize_t)count);
    for (size_t i = 0; list != NULL && i < count; i++) {
        PyObject *st = entries[i].err ? PyLong_FromLong(entries[i].err) : stat_tuple(&entries[i].st);
        PyObject *item = st ? Py_BuildValue("(yN)", entries[i].name, st) : NULL;
        if (item == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    free_entries(entries, count);
    return list;
}

/* -- change detection for unchanged files ----------------------------------------------------- */

/* An unsigned value of a stat tuple; 0 when it is not one (the caller then leaves the entry alone). */
static int
stat_field(PyObject *st, Py_ssize_t i, unsigned long long *out)
{
    PyObject *v = PyTuple_GET_ITEM(st, i);
    if (!PyLong_CheckExact(v))
        return 0;
    *out = PyLong_AsUnsignedLongLong(v);
    if (*out == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

static int
signed_field(PyObject *st, Py_ssize_t i, long long *out)
{
    PyObject *v = PyTuple_GET_ITEM(st, i);
    if (!PyLong_CheckExact(v))
        return 0;
    *out = PyLong_AsLongLong(v);
    if (*out == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* The parent entries' keys, made once (PyDict_GetItemString would make a str per look-up). */
enum { D_NAME, D_TYPE, D_MODE, D_MTIME, D_ATIME, D_CTIME, D_UID, D_GID, D_USER, D_GROUP, D_INODE,
       D_DEVICE_ID, D_SIZE, D_LINKS, D_CONTENT, D_COUNT };
static const char *doc_key_names[D_COUNT] = {
    "name", "type", "mode", "mtime", "atime", "ctime", "uid", "gid", "user", "group", "inode",
    "device_id", "size", "links", "content",
};
static PyObject *doc_keys[D_COUNT];

static PyObject *
doc_get(PyObject *doc, int key)
{
    PyObject *v = PyDict_GetItemWithError(doc, doc_keys[key]);
    if (v == NULL)
        PyErr_Clear(); /* str keys: no error to keep */
    return v;
}

/* Whether doc[key] is an exact int equal to x. */
static int
same_int(PyObject *doc, int key, unsigned long long x)
{
    PyObject *v = doc_get(doc, key);
    if (v == NULL || !PyLong_CheckExact(v))
        return 0;
    unsigned long long got = PyLong_AsUnsignedLongLong(v);
    if (got == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return got == x;
}

/* Whether doc[key] is an exact str with exactly these ASCII bytes. */
static int
same_text(PyObject *doc, int key, const char *text, size_t len)
{
    PyObject *v = doc_get(doc, key);
    return v != NULL && PyUnicode_CheckExact(v) && PyUnicode_IS_ASCII(v) &&
           (size_t)PyUnicode_GET_LENGTH(v) == len && memcmp(PyUnicode_DATA(v), text, len) == 0;
}

/* Whether doc[key] is an exact str equal to the str name. */
static int
same_str(PyObject *doc, int key, PyObject *name)
{
    PyObject *v = doc_get(doc, key);
    return v != NULL && PyUnicode_CheckExact(v) && PyUnicode_Compare(v, name) == 0;
}

/* The text LocalTime (vaultfs/ops/scan.py) makes of a time in nanoseconds: RFC 3339 in the local
 * zone, the fraction without trailing zeros. Its length, or 0 when it has none (outside years 1-9999). */
static size_t
local_text(long long ns, char *out)
{
    long long sec = ns / 1000000000LL, frac = ns % 1000000000LL;
    if (frac < 0) {
        frac += 1000000000LL;
        sec -= 1;
    }
    /* Files of a folder often share seconds: the last two conversions are kept (the GIL guards them). */
    static long long cached_sec[2] = {0, 0};
    static struct tm cached_tm[2];
    static int cached_ok[2] = {0, 0}, next_slot = 0;
    struct tm tm;
    if (cached_ok[0] && cached_sec[0] == sec) {
        tm = cached_tm[0];
    } else if (cached_ok[1] && cached_sec[1] == sec) {
        tm = cached_tm[1];
    } else {
        time_t t = (time_t)sec;
        if (localtime_r(&t, &tm) == NULL)
            return 0;
        cached_sec[next_slot] = sec;
        cached_tm[next_slot] = tm;
        cached_ok[next_slot] = 1;
        next_slot ^= 1;
    }
    if (tm.tm_year + 1900 <= 0 || tm.tm_year + 1900 > 9999)
        return 0;
    int n = sprintf(out, "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                    tm.tm_hour, tm.tm_min, tm.tm_sec);
    if (frac) {
        n += sprintf(out + n, ".%09lld", frac);
        while (out[n - 1] == '0')
            n--;
    }
    long off = tm.tm_gmtoff;
    if (off == 0) {
        out[n++] = 'Z';
    } else {
        long a = off < 0 ? -off : off;
        n += sprintf(out + n, "%c%02ld:%02ld", off > 0 ? '+' : '-', a / 3600, (a % 3600) / 60);
    }
    out[n] = 0;
    return (size_t)n;
}

/* The content IDs of a parent's file entry as 32-byte bytes (a new list); NULL without an error when
 * they are not all 64 hex digits. */
static PyObject *
content_ids(PyObject *content)
{
    if (content == NULL || !PyList_CheckExact(content))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(content);
    PyObject *ids = PyList_New(n);
    if (ids == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *id = hex_id(PyList_GET_ITEM(content, i));
        if (id == NULL) {
            Py_DECREF(ids);
            return NULL; /* an error set, or not an ID */
        }
        PyList_SET_ITEM(ids, i, id);
    }
    return ids;
}

/* One entry of unchanged_files: its content IDs, or NULL (with an error set only on a real error). */
static PyObject *
unchanged_entry(PyObject *entry, PyObject *prev, PyObject *users, PyObject *groups)
{
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2)
        return NULL;
    PyObject *raw = PyTuple_GET_ITEM(entry, 0), *st = PyTuple_GET_ITEM(entry, 1);
    if (!PyBytes_CheckExact(raw) || !PyTuple_CheckExact(st) || PyTuple_GET_SIZE(st) != 13)
        return NULL;
    /* Names that go_quote leaves as they are, and fs_name decodes to the same text. */
    const char *name = PyBytes_AS_STRING(raw);
    Py_ssize_t len = PyBytes_GET_SIZE(raw);
    if (len == 0)
        return NULL;
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c < 0x20 || c > 0x7e || c == '"' || c == '\\')
            return NULL;
    }
    unsigned long long mode, ino, dev, nlink, uid, gid;
    long long size, mtime, ctime;
    if (!stat_field(st, 0, &mode) || !stat_field(st, 1, &ino) || !stat_field(st, 2, &dev) ||
        !stat_field(st, 3, &nlink) || !stat_field(st, 4, &uid) || !stat_field(st, 5, &gid) ||
        !signed_field(st, 6, &size) || !signed_field(st, 8, &mtime) || !signed_field(st, 9, &ctime))
        return NULL;
    if (!S_ISREG(mode) || size < 0)
        return NULL;
    PyObject *key = PyUnicode_DecodeASCII(name, len, NULL);
    if (key == NULL)
        return NULL;
    PyObject *ids = NULL;
    PyObject *doc = PyDict_GetItemWithError(prev, key);
    if (doc == NULL || !PyDict_CheckExact(doc))
        goto done;
    /* The owner names backup has looked up so far; an id not among them is left to Python. */
    PyObject *uid_obj = PyLong_FromUnsignedLongLong(uid), *gid_obj = PyLong_FromUnsignedLongLong(gid);
    PyObject *user = uid_obj ? PyDict_GetItemWithError(users, uid_obj) : NULL;
    PyObject *group = gid_obj ? PyDict_GetItemWithError(groups, gid_obj) : NULL;
    Py_XDECREF(uid_obj);
    Py_XDECREF(gid_obj);
    if (user == NULL || group == NULL || !PyUnicode_CheckExact(user) || !PyUnicode_CheckExact(group))
        goto done;
    /* file_doc's keys: the optional ones only when not zero or empty. With the count equal and
     * every expected key present and equal, the two dicts are equal. */
    unsigned long long go_mode = (mode & 0777) | (mode & S_ISUID ? 1ULL << 23 : 0) |
                                 (mode & S_ISGID ? 1ULL << 22 : 0) | (mode & S_ISVTX ? 1ULL << 20 : 0);
    int has_user = PyUnicode_GET_LENGTH(user) > 0, has_group = PyUnicode_GET_LENGTH(group) > 0;
    Py_ssize_t keys = 8 + (go_mode != 0) + has_user + has_group + (ino != 0) + (dev != 0) +
                      (size != 0) + (nlink != 0);
    if (PyDict_GET_SIZE(doc) != keys)
        goto done;
    char mtext[64], ctext[64];
    size_t mlen = local_text(mtime, mtext), clen = local_text(ctime, ctext);
    if (mlen == 0 || clen == 0)
        goto done;
    if (!same_str(doc, D_NAME, key) || !same_text(doc, D_TYPE, "file", 4) ||
        (go_mode && !same_int(doc, D_MODE, go_mode)) || !same_text(doc, D_MTIME, mtext, mlen) ||
        !same_text(doc, D_ATIME, mtext, mlen) || !same_text(doc, D_CTIME, ctext, clen) ||
        !same_int(doc, D_UID, uid) || !same_int(doc, D_GID, gid) ||
        (has_user && !same_str(doc, D_USER, user)) || (has_group && !same_str(doc, D_GROUP, group)) ||
        (ino && !same_int(doc, D_INODE, ino)) || (dev && !same_int(doc, D_DEVICE_ID, dev)) ||
        (size && !same_int(doc, D_SIZE, (unsigned long long)size)) ||
        (nlink && !same_int(doc, D_LINKS, nlink)))
        goto done;
    ids = content_ids(doc_get(doc, D_CONTENT));
done:
    Py_DECREF(key);
    return ids;
}

PyDoc_STRVAR(unchanged_files_doc,
"unchanged_files(entries, previous, users, groups, /) -> list[list[bytes] | None]\n\n"
"For scan_dir's entries, the parent tree's entries by name, and the uid -> user and gid -> group\n"
"names looked up so far: for each regular file whose node would encode to the parent's entry\n"
"unchanged (file_doc(...) == previous[name], so size, inode, mtime and ctime are the same too),\n"
"the parent's content IDs; None for everything else (Python then decides as it always does).\n"
"Only plain ASCII names, known owners and entries without extended attributes are taken.");

static PyObject *
unchanged_files(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_Check(args[0]) || !PyDict_Check(args[1]) || !PyDict_Check(args[2]) ||
        !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "unchanged_files(list, dict, dict, dict)");
        return NULL;
    }
    PyObject *entries = args[0];
    Py_ssize_t n = PyList_GET_SIZE(entries);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *ids = unchanged_entry(PyList_GET_ITEM(entries, i), args[1], args[2], args[3]);
        if (ids == NULL) {
            if (PyErr_Occurred()) {
                Py_DECREF(out);
                return NULL;
            }
            ids = Py_None;
            Py_INCREF(ids);
        }
        PyList_SET_ITEM(out, i, ids);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"read_files", (PyCFunction)(void (*)(void))read_files, METH_FASTCALL, read_files_doc},
    {"scan_dir", (PyCFunction)scan_dir, METH_O, scan_dir_doc},
    {"unchanged_files", (PyCFunction)(void (*)(void))unchanged_files, METH_FASTCALL,
     unchanged_files_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_files",
    "Backup's batched small-file reads (see _files.c); use vaultfs.ops.backup.", -1, methods,
};

PyMODINIT_FUNC
PyInit__files(void)
{
    for (int k = 0; k < D_COUNT; k++) {
        if ((doc_keys[k] = PyUnicode_InternFromString(doc_key_names[k])) == NULL)
            return NULL;
    }
    return PyModule_Create(&module);
}
