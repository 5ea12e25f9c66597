/*
 * Rabin-fingerprint content-defined chunker with restic's cut points (FORMAT.md section 9).
 *
 * The fingerprint of a window of 64 bytes w[0..63] (oldest first) is
 *     H = (w[0] x^(8*63) + w[1] x^(8*62) + ... + w[63]) mod P
 * over GF(2). Sliding one byte needs two table lookups: out[o] cancels the byte o leaving the window
 * and mod[top byte] reduces after shifting the new byte in.
 *
 * restic's reset state (window = 63 zeros and a 1, digest 1) and its skip of the first min-64 bytes of
 * a chunk mean that by the first position where a cut is allowed (min bytes into the chunk) exactly 64
 * real bytes have been hashed. From there on the digest is H of the last 64 bytes and nothing else, so
 * any position's digest can be recomputed from the 64 bytes before it. The scanner uses that to run
 * several independent lanes over consecutive segments of a buffer at once: one lane is a chain of
 * dependent table loads (about 8 cycles a byte), several lanes overlap their latencies. The first lane
 * that finds a cut wins, so results never depend on how the input is split into feed() calls.
 *
 * feed() holds a buffer export and releases the GIL while scanning; a Chunker refuses to be used by two
 * threads at once (RuntimeError) instead of locking, since sharing one stream between threads is a bug.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define WINDOW 64
/* Lanes run in parallel over consecutive segments of SEGMENT bytes. A block of LANES*SEGMENT bytes is
 * scanned whole even when the cut lies early in it, so the block must stay small next to the ~1 MiB
 * scanned per chunk, while the 64-byte warm-up of each lane must stay small next to SEGMENT. Four lanes
 * cover the ~8-cycle latency of one lane's chain; with more, two table loads per lane per byte keep the
 * load ports just as busy and the lanes no longer fit in registers (measured: 5 and 8 were no faster).
 * Override with -DLANES=n -DSEGMENT=n to tune. */
#ifndef LANES
#define LANES 4
#endif
#ifndef SEGMENT
#define SEGMENT 16384
#endif
/* Below this many bytes, dropping and retaking the GIL costs more than it lets other threads do. */
#define NOGIL_THRESHOLD 8192
#define TABLE_CACHE_SIZE 8

#if defined(__GNUC__)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define UNLIKELY(x) (x)
#define ALWAYS_INLINE inline
#endif

typedef struct {
    uint64_t out[256];
    uint64_t mod[256];
} tables_t;

static int
pol_degree(uint64_t p)
{
    int d = -1;
    while (p) {
        d++;
        p >>= 1;
    }
    return d;
}

static uint64_t
pol_mod(uint64_t a, uint64_t p)
{
    int dp = pol_degree(p);
    int da;
    while ((da = pol_degree(a)) >= dp)
        a ^= p << (da - dp);
    return a;
}

/* Needs 8 <= deg(p) <= 53 (checked by the caller) so that every shift below stays inside 64 bits. */
static void
tables_compute(tables_t *t, uint64_t p)
{
    int k = pol_degree(p);
    for (uint64_t b = 0; b < 256; b++) {
        /* fingerprint of b followed by 63 zero bytes */
        uint64_t h = pol_mod(b, p);
        for (int i = 0; i < WINDOW - 1; i++)
            h = pol_mod(h << 8, p);
        t->out[b] = h;
        /* the low part reduces b*x^k, the high part cancels the 8 bits above the degree */
        t->mod[b] = pol_mod(b << k, p) | (b << k);
    }
}

/* Tables depend only on the polynomial, which is the same for a whole vault. Guarded by the GIL. */
static struct {
    uint64_t pol;
    tables_t tables;
} table_cache[TABLE_CACHE_SIZE];
static int table_cache_used;
static int table_cache_next;

static void
tables_get(tables_t *t, uint64_t p)
{
    for (int i = 0; i < table_cache_used; i++) {
        if (table_cache[i].pol == p) {
            memcpy(t, &table_cache[i].tables, sizeof(*t));
            return;
        }
    }
    tables_compute(t, p);
    int slot = table_cache_next;
    table_cache_next = (table_cache_next + 1) % TABLE_CACHE_SIZE;
    if (table_cache_used < TABLE_CACHE_SIZE)
        table_cache_used++;
    table_cache[slot].pol = p;
    memcpy(&table_cache[slot].tables, t, sizeof(*t));
}

/* One slide: drop byte o (64 bytes old), shift in byte b. */
#define SLIDE(T, shift, d, b, o)                                                                      \
    do {                                                                                              \
        (d) ^= (T)->out[(o)];                                                                         \
        uint64_t ix_ = (d) >> (shift);                                                               \
        (d) = (((d) << 8) | (b)) ^ (T)->mod[ix_];                                                     \
    } while (0)

/* Fingerprint of w[0..63] from scratch: the bytes sliding out are the zeros of an empty window. */
static ALWAYS_INLINE uint64_t
warm(const tables_t *T, unsigned shift, const uint8_t *w)
{
    uint64_t d = 0;
    for (int i = 0; i < WINDOW; i++) {
        uint64_t ix = d >> shift;
        d = ((d << 8) | w[i]) ^ T->mod[ix];
    }
    return d;
}

/*
 * Find the first p in [start, end) whose digest (fingerprint of buf[p-63..p]) has no bit of mask set.
 * Needs buf[start-64 .. end) readable and *digest = fingerprint of buf[start-64 .. start).
 * Returns p, or end if there is none; then *digest is the fingerprint of the last 64 bytes.
 */
static ALWAYS_INLINE size_t
find_cut_impl(const tables_t *T, unsigned shift, uint64_t mask, const uint8_t *buf, size_t start,
              size_t end, uint64_t *digest)
{
    size_t p = start;
    uint64_t d = *digest;

    while (end - p >= (size_t)LANES * SEGMENT) {
        const uint8_t *s = buf + p;
        uint64_t l[LANES];
        size_t first[LANES];
        int any = 0;
        l[0] = d;
        for (int j = 1; j < LANES; j++)
            l[j] = warm(T, shift, s + j * SEGMENT - WINDOW);
        for (int j = 0; j < LANES; j++)
            first[j] = SEGMENT;
        for (size_t i = 0; i < SEGMENT; i++) {
            /* (x & mask) - 1 wraps to a value with the top bit set exactly when x & mask == 0 */
            uint64_t zero = 0;
            for (int j = 0; j < LANES; j++) {
                const uint8_t *q = s + j * SEGMENT + i;
                SLIDE(T, shift, l[j], q[0], q[-WINDOW]);
                zero |= (l[j] & mask) - 1;
            }
            if (UNLIKELY(zero >> 63)) {
                if ((l[0] & mask) == 0)
                    return p + i;
                for (int j = 1; j < LANES; j++)
                    if ((l[j] & mask) == 0 && first[j] == SEGMENT)
                        first[j] = i;
                any = 1;
            }
        }
        if (any) {
            for (int j = 1; j < LANES; j++)
                if (first[j] != SEGMENT)
                    return p + (size_t)j * SEGMENT + first[j];
        }
        d = l[LANES - 1];
        p += (size_t)LANES * SEGMENT;
    }
    for (; p < end; p++) {
        SLIDE(T, shift, d, buf[p], buf[p - WINDOW]);
        if (UNLIKELY((d & mask) == 0))
            return p;
    }
    *digest = d;
    return end;
}

/* Every polynomial restic draws has degree 53: a constant shift saves a register and a cycle. */
static size_t
find_cut_53(const tables_t *T, uint64_t mask, const uint8_t *buf, size_t start, size_t end,
            uint64_t *digest)
{
    return find_cut_impl(T, 53 - 8, mask, buf, start, end, digest);
}

static size_t
find_cut_any(const tables_t *T, unsigned shift, uint64_t mask, const uint8_t *buf, size_t start,
             size_t end, uint64_t *digest)
{
    return find_cut_impl(T, shift, mask, buf, start, end, digest);
}

typedef struct {
    PyObject_HEAD
    tables_t tables;
    uint64_t pol;
    unsigned shift;
    int average_bits;
    uint64_t mask;
    uint64_t min_size;
    uint64_t max_size;
    /* stream state, as restic keeps it */
    uint64_t count; /* bytes of the current chunk seen so far */
    uint64_t digest;
    unsigned wpos; /* window[wpos] is the oldest byte */
    uint8_t window[WINDOW];
    int busy; /* a feed() is running with the GIL released */
} ChunkerObject;

static void
chunker_reset_state(ChunkerObject *c)
{
    c->count = 0;
    memset(c->window, 0, sizeof(c->window));
    /* restic slides the byte 1 into the empty window */
    c->window[0] = 1;
    c->wpos = 1;
    c->digest = 1;
}

typedef struct {
    size_t *v;
    size_t n, cap;
} cuts_t;

static int
cuts_push(cuts_t *cuts, size_t value)
{
    if (cuts->n == cuts->cap) {
        size_t cap = cuts->cap ? cuts->cap * 2 : 16;
        size_t *v = PyMem_RawRealloc(cuts->v, cap * sizeof(size_t));
        if (v == NULL)
            return -1;
        cuts->v = v;
        cuts->cap = cap;
    }
    cuts->v[cuts->n++] = value;
    return 0;
}

/* Runs without the GIL. Appends to cuts the offsets after which chunks end. -1 if out of memory. */
static int
chunker_scan(ChunkerObject *c, const uint8_t *buf, size_t len, cuts_t *cuts)
{
    const tables_t *T = &c->tables;
    const unsigned shift = c->shift;
    const uint64_t mask = c->mask;
    const uint64_t hash_from = c->min_size - WINDOW; /* count at which hashing starts */
    size_t pos = 0;

    while (pos < len) {
        if (c->count < hash_from) {
            uint64_t skip = hash_from - c->count;
            if (skip > len - pos)
                skip = len - pos;
            c->count += skip;
            pos += skip;
            continue;
        }

        /* The first 64 hashed bytes of this call may slide out bytes from before it (or the reset
         * window), so they go through the ring. */
        size_t ring_end = pos + WINDOW < len ? pos + WINDOW : len;
        uint64_t d = c->digest;
        uint64_t count = c->count;
        unsigned w = c->wpos;
        int cut = 0;
        while (pos < ring_end) {
            uint8_t b = buf[pos];
            uint8_t o = c->window[w];
            c->window[w] = b;
            w = (w + 1) % WINDOW;
            SLIDE(T, shift, d, b, o);
            pos++;
            count++;
            if (count >= c->min_size && ((d & mask) == 0 || count >= c->max_size)) {
                cut = 1;
                break;
            }
        }
        if (cut) {
            if (cuts_push(cuts, pos) < 0)
                return -1;
            chunker_reset_state(c);
            continue;
        }
        c->digest = d;
        c->count = count;
        c->wpos = w;
        if (pos == len)
            return 0;

        /* Now 64 bytes of this chunk lie before pos in buf and count >= min_size: every position is a
         * candidate, up to the one where the chunk reaches max_size. */
        size_t room = len - pos;
        int at_max = 0;
        if (c->max_size - count <= room) {
            room = c->max_size - count;
            at_max = 1;
        }
        size_t end = pos + room;
        size_t p = shift == 53 - 8 ? find_cut_53(T, mask, buf, pos, end, &d)
                                   : find_cut_any(T, shift, mask, buf, pos, end, &d);
        if (p < end || at_max) {
            size_t after = p < end ? p + 1 : end;
            if (cuts_push(cuts, after) < 0)
                return -1;
            chunker_reset_state(c);
            pos = after;
            continue;
        }
        /* ran off the end of the buffer inside a chunk: keep the last 64 bytes as the window */
        c->count += end - pos;
        c->digest = d;
        memcpy(c->window, buf + len - WINDOW, WINDOW);
        c->wpos = 0;
        pos = end;
    }
    return 0;
}

static PyObject *
Chunker_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"polynomial", "min_size", "max_size", "average_bits", NULL};
    PyObject *pol_obj;
    unsigned long long min_size = 512 * 1024, max_size = 8 * 1024 * 1024;
    int average_bits = 20;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|KKi:Chunker", kwlist, &pol_obj, &min_size,
                                     &max_size, &average_bits))
        return NULL;
    if (!PyLong_Check(pol_obj)) {
        PyErr_SetString(PyExc_TypeError, "polynomial must be an int");
        return NULL;
    }
    unsigned long long pol = PyLong_AsUnsignedLongLong(pol_obj);
    if (pol == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "polynomial must have degree 8..53");
        return NULL;
    }
    int k = pol_degree(pol);
    if (k < 8 || k > 53) {
        PyErr_Format(PyExc_ValueError, "polynomial must have degree 8..53, got %d", k);
        return NULL;
    }
    if (min_size < WINDOW || max_size < min_size || max_size > ((unsigned long long)1 << 62)) {
        PyErr_Format(PyExc_ValueError,
                     "need %d <= min_size <= max_size <= 2**62, got min_size=%llu max_size=%llu",
                     WINDOW, min_size, max_size);
        return NULL;
    }
    if (average_bits < 1 || average_bits > 63) {
        PyErr_Format(PyExc_ValueError, "average_bits must be 1..63, got %d", average_bits);
        return NULL;
    }

    ChunkerObject *c = (ChunkerObject *)type->tp_alloc(type, 0);
    if (c == NULL)
        return NULL;
    tables_get(&c->tables, pol);
    c->pol = pol;
    c->shift = (unsigned)(k - 8);
    c->average_bits = average_bits;
    c->mask = ((uint64_t)1 << average_bits) - 1;
    c->min_size = min_size;
    c->max_size = max_size;
    c->busy = 0;
    chunker_reset_state(c);
    return (PyObject *)c;
}

static int
check_not_busy(ChunkerObject *c)
{
    if (c->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Chunker is in use by another thread");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(Chunker_feed_doc,
"feed(buffer, /) -> list[int]\n\
\n\
Scan the next bytes of the stream. Returns the offsets within buffer after which chunks end, in\n\
increasing order, each in 1..len(buffer); a chunk may have started in an earlier call. The bytes after\n\
the last offset belong to a chunk that continues in the next call; at end of stream they are the last\n\
chunk. Releases the GIL for large buffers; the buffer must not be modified meanwhile.");

static PyObject *
Chunker_feed(ChunkerObject *c, PyObject *arg)
{
    Py_buffer view;
    cuts_t cuts = {NULL, 0, 0};
    int rc;

    if (check_not_busy(c) < 0)
        return NULL;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    c->busy = 1;
    if (view.len >= NOGIL_THRESHOLD) {
        Py_BEGIN_ALLOW_THREADS
        rc = chunker_scan(c, view.buf, (size_t)view.len, &cuts);
        Py_END_ALLOW_THREADS
    }
    else {
        rc = chunker_scan(c, view.buf, (size_t)view.len, &cuts);
    }
    c->busy = 0;
    PyBuffer_Release(&view);
    if (rc < 0) {
        PyMem_RawFree(cuts.v);
        /* the stream state is now somewhere inside the buffer: make the failure visible */
        chunker_reset_state(c);
        return PyErr_NoMemory();
    }

    PyObject *list = PyList_New((Py_ssize_t)cuts.n);
    if (list != NULL) {
        for (size_t i = 0; i < cuts.n; i++) {
            PyObject *n = PyLong_FromSize_t(cuts.v[i]);
            if (n == NULL) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, (Py_ssize_t)i, n);
        }
    }
    PyMem_RawFree(cuts.v);
    return list;
}

PyDoc_STRVAR(Chunker_reset_doc,
"reset() -> None\n\
\n\
Forget the current stream: the next byte fed starts a new chunk (use it between files).");

static PyObject *
Chunker_reset(ChunkerObject *c, PyObject *Py_UNUSED(ignored))
{
    if (check_not_busy(c) < 0)
        return NULL;
    chunker_reset_state(c);
    Py_RETURN_NONE;
}

static PyMethodDef Chunker_methods[] = {
    {"feed", (PyCFunction)Chunker_feed, METH_O, Chunker_feed_doc},
    {"reset", (PyCFunction)Chunker_reset, METH_NOARGS, Chunker_reset_doc},
    {NULL, NULL, 0, NULL},
};

/* The members below are uint64_t read as T_ULONGLONG. */
typedef char ull_is_uint64[sizeof(unsigned long long) == sizeof(uint64_t) ? 1 : -1];

/* Read-only: changing sizes or the polynomial mid-stream would break the cut points. */
static PyMemberDef Chunker_members[] = {
    {"polynomial", T_ULONGLONG, offsetof(ChunkerObject, pol), READONLY, "The polynomial P as an int."},
    {"min_size", T_ULONGLONG, offsetof(ChunkerObject, min_size), READONLY,
     "Smallest chunk, except the last."},
    {"max_size", T_ULONGLONG, offsetof(ChunkerObject, max_size), READONLY, "Largest chunk."},
    {"average_bits", T_INT, offsetof(ChunkerObject, average_bits), READONLY,
     "A cut needs this many low digest bits zero (20: about 1 MiB past min_size)."},
    /* read without the busy check: a racing reader just sees the count from before the feed */
    {"pending", T_ULONGLONG, offsetof(ChunkerObject, count), READONLY,
     "Bytes fed since the last cut (or reset): the size of the unfinished chunk."},
    {NULL, 0, 0, 0, NULL},
};

PyDoc_STRVAR(Chunker_doc,
"Chunker(polynomial, min_size=524288, max_size=8388608, average_bits=20)\n\
\n\
Streaming Rabin-fingerprint chunker with restic's cut points. polynomial is an int of degree 8..53\n\
(restic: irreducible, degree 53; check it with vaultfs.chunker.poly). One instance follows one\n\
stream; it raises RuntimeError if two threads use it at once. Separate instances run in parallel.");

static PyTypeObject ChunkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vaultfs.chunker._chunker.Chunker",
    .tp_basicsize = sizeof(ChunkerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = Chunker_doc,
    .tp_new = Chunker_new,
    .tp_methods = Chunker_methods,
    .tp_members = Chunker_members,
};

PyDoc_STRVAR(module_doc, "C core of vaultfs.chunker; use that package, not this module.");

static struct PyModuleDef chunker_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_chunker",
    .m_doc = module_doc,
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__chunker(void)
{
    if (PyType_Ready(&ChunkerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&chunker_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Chunker", (PyObject *)&ChunkerType) < 0 ||
        PyModule_AddIntConstant(m, "WINDOW_SIZE", WINDOW) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
