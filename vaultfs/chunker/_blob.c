/*
 * The per-blob hot path of backup and restore in C: zstd into a caller's buffer, and restic's seal
 * (FORMAT.md section 2.2: nonce || AES-256-CTR(plaintext) || Poly1305-AES tag) into a caller's buffer,
 * each in one call that releases the GIL; and for restore, checking a pack range's blobs and writing
 * the files of one chunk each (Codec.restore_files), a whole range in one such call.
 *
 * Why here: done from Python, one blob costs a dozen calls (zstd, urandom, two cipher objects,
 * update_into, Poly1305, copies), each a GIL hand-off between the pipeline's threads, plus a fresh
 * multi-MiB allocation per output, whose pages the kernel must fault in again every time.
 *
 * The libraries are the ones already on the system and in the process: libcrypto (OpenSSL 3, which
 * Python's hashlib links) and libzstd (a dependency of dpkg and apt on Debian). They are opened with
 * dlopen and called through the few prototypes declared below, so building needs no -dev packages.
 * When either is missing, available() is False and callers use the pure-Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>

#include "../ops/_newfile.h"

/* -- the library functions used, declared by hand (stable ABIs of OpenSSL 3 and zstd 1.x) -------- */

typedef struct {
    void *(*cipher_ctx_new)(void);
    void (*cipher_ctx_free)(void *);
    int (*encrypt_init)(void *ctx, const void *cipher, void *engine, const unsigned char *key,
                        const unsigned char *iv);
    int (*encrypt_update)(void *ctx, unsigned char *out, int *outl, const unsigned char *in, int inl);
    int (*set_padding)(void *ctx, int pad);
    const void *(*aes_256_ctr)(void);
    const void *(*aes_128_ecb)(void);
    void *(*mac_fetch)(void *libctx, const char *algorithm, const char *properties);
    void *(*mac_ctx_new)(void *mac);
    void (*mac_ctx_free)(void *ctx);
    int (*mac_init)(void *ctx, const unsigned char *key, size_t keylen, const void *params);
    int (*mac_update)(void *ctx, const unsigned char *data, size_t datalen);
    int (*mac_final)(void *ctx, unsigned char *out, size_t *outl, size_t outsize);
    int (*memcmp_ct)(const void *a, const void *b, size_t len);
    void *poly1305; /* EVP_MAC, fetched once */

    void *(*zstd_create_cctx)(void);
    size_t (*zstd_free_cctx)(void *);
    size_t (*zstd_compress_cctx)(void *ctx, void *dst, size_t cap, const void *src, size_t n,
                                 int level);
    void *(*zstd_create_dctx)(void);
    size_t (*zstd_free_dctx)(void *);
    size_t (*zstd_decompress_dctx)(void *ctx, void *dst, size_t cap, const void *src, size_t n);
    unsigned long long (*zstd_content_size)(const void *src, size_t n);
    unsigned (*zstd_is_error)(size_t code);
    const char *(*zstd_error_name)(size_t code);
    size_t (*zstd_bound)(size_t n);

    /* Codec.check_blobs only: the plaintext hash (loaded lazily, see load_digest). */
    int (*digest)(const void *data, size_t n, unsigned char *md, unsigned int *size,
                  const void *type, void *engine);
    const void *(*sha256)(void);
} libs_t;

static libs_t L;
static int libs_state = 0; /* 0: not tried, 1: loaded, -1: unavailable */
static char libs_error[200];

static int
load_symbol(void *lib, const char *name, void **out)
{
    *out = lib ? dlsym(lib, name) : NULL;
    if (*out == NULL) {
        snprintf(libs_error, sizeof libs_error, "symbol %s not found", name);
        return -1;
    }
    return 0;
}

#define SYM(lib, field, name) load_symbol(lib, name, (void **)&L.field)

/* Called with the GIL held, so it runs once. */
static int
load_libs(void)
{
    if (libs_state)
        return libs_state;
    libs_state = -1;
    void *crypto = dlopen("libcrypto.so.3", RTLD_NOW | RTLD_LOCAL);
    void *zstd = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (crypto == NULL || zstd == NULL) {
        snprintf(libs_error, sizeof libs_error, "%s", crypto ? "libzstd.so.1 not found"
                                                            : "libcrypto.so.3 not found");
        return -1;
    }
    if (SYM(crypto, cipher_ctx_new, "EVP_CIPHER_CTX_new") ||
        SYM(crypto, cipher_ctx_free, "EVP_CIPHER_CTX_free") ||
        SYM(crypto, encrypt_init, "EVP_EncryptInit_ex") ||
        SYM(crypto, encrypt_update, "EVP_EncryptUpdate") ||
        SYM(crypto, set_padding, "EVP_CIPHER_CTX_set_padding") ||
        SYM(crypto, aes_256_ctr, "EVP_aes_256_ctr") || SYM(crypto, aes_128_ecb, "EVP_aes_128_ecb") ||
        SYM(crypto, mac_fetch, "EVP_MAC_fetch") || SYM(crypto, mac_ctx_new, "EVP_MAC_CTX_new") ||
        SYM(crypto, mac_ctx_free, "EVP_MAC_CTX_free") || SYM(crypto, mac_init, "EVP_MAC_init") ||
        SYM(crypto, mac_update, "EVP_MAC_update") || SYM(crypto, mac_final, "EVP_MAC_final") ||
        SYM(crypto, memcmp_ct, "CRYPTO_memcmp") ||
        SYM(zstd, zstd_create_cctx, "ZSTD_createCCtx") ||
        SYM(zstd, zstd_free_cctx, "ZSTD_freeCCtx") ||
        SYM(zstd, zstd_compress_cctx, "ZSTD_compressCCtx") ||
        SYM(zstd, zstd_create_dctx, "ZSTD_createDCtx") ||
        SYM(zstd, zstd_free_dctx, "ZSTD_freeDCtx") ||
        SYM(zstd, zstd_decompress_dctx, "ZSTD_decompressDCtx") ||
        SYM(zstd, zstd_content_size, "ZSTD_getFrameContentSize") ||
        SYM(zstd, zstd_is_error, "ZSTD_isError") || SYM(zstd, zstd_error_name, "ZSTD_getErrorName") ||
        SYM(zstd, zstd_bound, "ZSTD_compressBound"))
        return -1;
    L.poly1305 = L.mac_fetch(NULL, "POLY1305", NULL);
    if (L.poly1305 == NULL) {
        snprintf(libs_error, sizeof libs_error, "libcrypto has no POLY1305");
        return -1;
    }
    libs_state = 1;
    return 1;
}

static int
require_libs_quiet(void)
{
    return load_libs() == 1 ? 0 : -1;
}

/* EVP_Digest and EVP_sha256 for Codec.check_blobs; called with the GIL held. 0 or -1. */
static int
load_digest(void)
{
    if (require_libs_quiet() < 0)
        return -1;
    if (L.digest && L.sha256)
        return 0;
    void *crypto = dlopen("libcrypto.so.3", RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (SYM(crypto, digest, "EVP_Digest") || SYM(crypto, sha256, "EVP_sha256")) {
        L.digest = NULL;
        return -1;
    }
    return 0;
}

static int
require_libs(void)
{
    if (load_libs() == 1)
        return 0;
    PyErr_Format(PyExc_OSError, "native blob functions unavailable: %s", libs_error);
    return -1;
}

/* require_libs and load_digest: 0, or -1 with an exception set. */
static int
require_digest(void)
{
    if (require_libs() < 0)
        return -1;
    if (load_digest() < 0) {
        PyErr_Format(PyExc_OSError, "native blob functions unavailable: %s", libs_error);
        return -1;
    }
    return 0;
}

/* -- sealing ------------------------------------------------------------------------------------ */

#define NONCE 16
#define TAG 16
#define KEY 64 /* AES-256 key || mac.k (16) || mac.r (16), as MasterKey holds them */

/* AES-256-CTR of n bytes from in to out with the 16-byte initial counter block iv. */
static int
ctr_crypt(const unsigned char *key, const unsigned char *iv, const unsigned char *in,
          unsigned char *out, size_t n)
{
    void *ctx = L.cipher_ctx_new();
    int ok = ctx != NULL && L.encrypt_init(ctx, L.aes_256_ctr(), NULL, key, iv) == 1;
    while (ok && n) {
        int step = n > (1 << 30) ? (1 << 30) : (int)n, outl = 0;
        ok = L.encrypt_update(ctx, out, &outl, in, step) == 1 && outl == step;
        in += step;
        out += step;
        n -= (size_t)step;
    }
    if (ctx)
        L.cipher_ctx_free(ctx);
    return ok ? 0 : -1;
}

/* Poly1305-AES: key clamp(r) || AES-128_k(nonce), over the ciphertext only. */
static int
mac_tag(const unsigned char *key, const unsigned char *nonce, const unsigned char *ct, size_t n,
        unsigned char *tag)
{
    unsigned char polykey[32];
    int outl = 0;
    void *ecb = L.cipher_ctx_new();
    int ok = ecb != NULL && L.encrypt_init(ecb, L.aes_128_ecb(), NULL, key + 32, NULL) == 1 &&
             L.set_padding(ecb, 0) == 1 &&
             L.encrypt_update(ecb, polykey + 16, &outl, nonce, 16) == 1 && outl == 16;
    if (ecb)
        L.cipher_ctx_free(ecb);
    memcpy(polykey, key + 48, 16); /* OpenSSL's Poly1305 clamps r itself */
    void *mac = ok ? L.mac_ctx_new(L.poly1305) : NULL;
    size_t tagl = 0;
    ok = mac != NULL && L.mac_init(mac, polykey, 32, NULL) == 1 && L.mac_update(mac, ct, n) == 1 &&
         L.mac_final(mac, tag, &tagl, TAG) == 1 && tagl == TAG;
    if (mac)
        L.mac_ctx_free(mac);
    memset(polykey, 0, sizeof polykey);
    return ok ? 0 : -1;
}

static int
random_nonce(unsigned char *nonce)
{
    for (;;) {
        size_t got = 0;
        while (got < NONCE) {
            ssize_t r = getrandom(nonce + got, NONCE - got, 0);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                return -1;
            }
            got += (size_t)r;
        }
        for (int i = 0; i < NONCE; i++)
            if (nonce[i])
                return 0; /* restic rejects an all-zero nonce */
    }
}

static int
get_key(PyObject *obj, Py_buffer *key)
{
    if (PyObject_GetBuffer(obj, key, PyBUF_SIMPLE) < 0)
        return -1;
    if (key->len != KEY) {
        PyBuffer_Release(key);
        PyErr_SetString(PyExc_ValueError, "key must be 64 bytes (encrypt || mac.k || mac.r)");
        return -1;
    }
    return 0;
}

/* The (key, out, data) arguments of seal_into and open_into; on success all three are held. */
static int
get_args(PyObject *const *args, Py_ssize_t nargs, const char *name, Py_buffer *key, Py_buffer *out,
         Py_buffer *in)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s(key, out, data) takes 3 arguments", name);
        return -1;
    }
    if (require_libs() < 0 || get_key(args[0], key) < 0)
        return -1;
    if (PyObject_GetBuffer(args[1], out, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(key);
        return -1;
    }
    if (PyObject_GetBuffer(args[2], in, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(out);
        PyBuffer_Release(key);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(seal_into_doc,
"seal_into(key, out, plaintext, /) -> None\n\
\n\
Write nonce || AES-256-CTR(plaintext) || Poly1305-AES tag into out, which must be exactly\n\
len(plaintext) + 32 bytes and must not overlap plaintext. key is the 64-byte master key\n\
(encrypt || mac.k || mac.r). Releases the GIL.");

static PyObject *
seal_into(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer key, out, in;
    if (get_args(args, nargs, "seal_into", &key, &out, &in) < 0)
        return NULL;
    int rc = -2;
    if (out.len == in.len + NONCE + TAG) {
        unsigned char *o = out.buf;
        const unsigned char *k = key.buf;
        size_t n = (size_t)in.len;
        Py_BEGIN_ALLOW_THREADS
        rc = random_nonce(o);
        if (rc == 0)
            rc = ctr_crypt(k, o, in.buf, o + NONCE, n);
        if (rc == 0)
            rc = mac_tag(k, o, o + NONCE, n, o + NONCE + n);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    PyBuffer_Release(&key);
    if (rc == -2) {
        PyErr_SetString(PyExc_ValueError, "out must be exactly len(plaintext) + 32 bytes");
        return NULL;
    }
    if (rc < 0) {
        PyErr_SetString(PyExc_OSError, "sealing failed inside libcrypto");
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(open_into_doc,
"open_into(key, out, sealed, /) -> bool\n\
\n\
Check the tag of nonce || ciphertext || tag and, when it matches, decrypt into out (exactly\n\
len(sealed) - 32 bytes, not overlapping sealed). Returns False, leaving out unspecified, when the tag\n\
does not match. Releases the GIL.");

static PyObject *
open_into(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer key, out, in;
    if (get_args(args, nargs, "open_into", &key, &out, &in) < 0)
        return NULL;
    int rc = -2;
    if (in.len >= NONCE + TAG && out.len == in.len - NONCE - TAG) {
        const unsigned char *s = in.buf;
        const unsigned char *k = key.buf;
        size_t n = (size_t)out.len;
        unsigned char tag[TAG];
        Py_BEGIN_ALLOW_THREADS
        rc = mac_tag(k, s, s + NONCE, n, tag);
        if (rc == 0 && L.memcmp_ct(tag, s + NONCE + n, TAG) != 0)
            rc = 1;
        if (rc == 0)
            rc = ctr_crypt(k, s, s + NONCE, out.buf, n);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    PyBuffer_Release(&key);
    if (rc == -2) {
        PyErr_SetString(PyExc_ValueError, "out must be exactly len(sealed) - 32 bytes");
        return NULL;
    }
    if (rc < 0) {
        PyErr_SetString(PyExc_OSError, "opening failed inside libcrypto");
        return NULL;
    }
    return PyBool_FromLong(rc == 0);
}

PyDoc_STRVAR(seal_many_doc,
"seal_many(key, pairs, /) -> None\n\
\n\
seal_into for each (out, plaintext) of pairs, releasing the GIL once for all of them.");

static PyObject *
seal_many(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "seal_many(key, pairs) takes 2 arguments");
        return NULL;
    }
    Py_buffer key;
    if (require_libs() < 0 || get_key(args[0], &key) < 0)
        return NULL;
    PyObject *pairs = PySequence_Tuple(args[1]);
    if (pairs == NULL) {
        PyBuffer_Release(&key);
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(pairs), held = 0;
    Py_buffer *bufs = PyMem_Calloc(2 * (size_t)count + 1, sizeof(Py_buffer));
    int rc = 0;
    if (bufs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < count; held++) {
        PyObject *pair = PyTuple_GET_ITEM(pairs, held);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "pairs must hold (out, plaintext) tuples");
            goto done;
        }
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(pair, 0), &bufs[2 * held], PyBUF_WRITABLE) < 0)
            goto done;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(pair, 1), &bufs[2 * held + 1], PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&bufs[2 * held]);
            goto done;
        }
        if (bufs[2 * held].len != bufs[2 * held + 1].len + NONCE + TAG) {
            PyBuffer_Release(&bufs[2 * held + 1]);
            PyBuffer_Release(&bufs[2 * held]);
            PyErr_SetString(PyExc_ValueError, "out must be exactly len(plaintext) + 32 bytes");
            goto done;
        }
    }
    const unsigned char *k = key.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count && rc == 0; i++) {
        unsigned char *o = bufs[2 * i].buf;
        const unsigned char *in = bufs[2 * i + 1].buf;
        size_t n = (size_t)bufs[2 * i + 1].len;
        rc = random_nonce(o);
        if (rc == 0)
            rc = ctr_crypt(k, o, in, o + NONCE, n);
        if (rc == 0)
            rc = mac_tag(k, o, o + NONCE, n, o + NONCE + n);
    }
    Py_END_ALLOW_THREADS
    if (rc < 0)
        PyErr_SetString(PyExc_OSError, "sealing failed inside libcrypto");
done:
    for (Py_ssize_t i = 0; i < held; i++) {
        PyBuffer_Release(&bufs[2 * i + 1]);
        PyBuffer_Release(&bufs[2 * i]);
    }
    PyMem_Free(bufs);
    Py_DECREF(pairs);
    PyBuffer_Release(&key);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

/* The (offset, length) pairs of a flat list of ints, checked against a buffer of size. */
static size_t *
get_spans(PyObject *obj, Py_ssize_t size, Py_ssize_t *count)
{
    PyObject *seq = PySequence_Fast(obj, "spans must be a sequence of ints");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n % 2) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "spans must hold offset, length pairs");
        return NULL;
    }
    size_t *spans = PyMem_Calloc((size_t)n + 2, sizeof(size_t));
    if (spans == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t v = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, i));
        if (v < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "spans must not be negative");
            goto fail;
        }
        spans[i] = (size_t)v;
    }
    for (Py_ssize_t i = 0; i < n; i += 2)
        if (spans[i] > (size_t)size || spans[i + 1] > (size_t)size - spans[i]) {
            PyErr_SetString(PyExc_ValueError, "span outside the data");
            goto fail;
        }
    Py_DECREF(seq);
    *count = n / 2;
    return spans;
fail:
    Py_DECREF(seq);
    PyMem_Free(spans);
    return NULL;
}

/* A list of count items, item(ctx, i) each (a new reference, or NULL with an exception set). */
static PyObject *
build_list(Py_ssize_t count, PyObject *(*item)(const void *, Py_ssize_t), const void *ctx)
{
    PyObject *list = PyList_New(count);
    for (Py_ssize_t i = 0; list != NULL && i < count; i++) {
        PyObject *v = item(ctx, i);
        if (v == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, v);
    }
    return list;
}

static PyObject *
digest_item(const void *digests, Py_ssize_t i)
{
    return PyBytes_FromStringAndSize((const char *)digests + 32 * i, 32);
}

static PyObject *
size_item(const void *sizes, Py_ssize_t i)
{
    return PyLong_FromSize_t(((const size_t *)sizes)[i]);
}

PyDoc_STRVAR(sha256_spans_doc,
"sha256_spans(data, spans, /) -> list[bytes]\n\
\n\
The SHA-256 of each data[offset:offset + length] for spans = [offset, length, offset, length, ...],\n\
releasing the GIL once for all of them.");

static PyObject *
sha256_spans(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "sha256_spans(data, spans) takes 2 arguments");
        return NULL;
    }
    if (require_digest() < 0)
        return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t count = 0;
    size_t *spans = get_spans(args[1], data.len, &count);
    unsigned char *digests = spans ? PyMem_Malloc(32 * (size_t)count + 1) : NULL;
    PyObject *out = NULL;
    if (spans != NULL && digests == NULL)
        PyErr_NoMemory();
    if (digests != NULL) {
        int ok = 1;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < count && ok; i++) {
            unsigned int mdlen = 0;
            ok = L.digest((const unsigned char *)data.buf + spans[2 * i], spans[2 * i + 1],
                          digests + 32 * i, &mdlen, L.sha256(), NULL) == 1 && mdlen == 32;
        }
        Py_END_ALLOW_THREADS
        if (!ok)
            PyErr_SetString(PyExc_OSError, "hashing failed inside libcrypto");
        else
            out = build_list(count, digest_item, digests);
    }
    PyMem_Free(digests);
    PyMem_Free(spans);
    PyBuffer_Release(&data);
    return out;
}

/* -- zstd --------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    void *cctx;
    void *dctx;
    int level;
    int busy;
} CodecObject;

static PyObject *
Codec_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"level", NULL};
    int level = 3;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|i:Codec", kwlist, &level))
        return NULL;
    if (require_libs() < 0)
        return NULL;
    CodecObject *c = (CodecObject *)type->tp_alloc(type, 0);
    if (c == NULL)
        return NULL;
    c->level = level;
    return (PyObject *)c;
}

static void
Codec_dealloc(CodecObject *c)
{
    if (c->cctx)
        L.zstd_free_cctx(c->cctx);
    if (c->dctx)
        L.zstd_free_dctx(c->dctx);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

/* Runs compress (1) or decompress (0) from args[1] into args[0]; returns the output size. */
static PyObject *
codec_run(CodecObject *c, PyObject *const *args, Py_ssize_t nargs, int compress)
{
    Py_buffer out, in;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "takes 2 arguments (out, data)");
        return NULL;
    }
    if (c->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Codec is in use by another thread");
        return NULL;
    }
    if (compress && c->cctx == NULL && (c->cctx = L.zstd_create_cctx()) == NULL)
        return PyErr_NoMemory();
    if (!compress && c->dctx == NULL && (c->dctx = L.zstd_create_dctx()) == NULL)
        return PyErr_NoMemory();
    if (PyObject_GetBuffer(args[0], &out, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &in, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    size_t r;
    unsigned long long expected = 0;
    c->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    if (compress) {
        r = L.zstd_compress_cctx(c->cctx, out.buf, (size_t)out.len, in.buf, (size_t)in.len,
                                 c->level);
    }
    else {
        expected = L.zstd_content_size(in.buf, (size_t)in.len);
        r = L.zstd_decompress_dctx(c->dctx, out.buf, (size_t)out.len, in.buf, (size_t)in.len);
    }
    Py_END_ALLOW_THREADS
    c->busy = 0;
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    if (L.zstd_is_error(r)) {
        PyErr_Format(PyExc_ValueError, "zstd: %s", L.zstd_error_name(r));
        return NULL;
    }
    /* A frame must state its size and hold exactly that (ZSTD_CONTENTSIZE_UNKNOWN/ERROR are huge). */
    if (!compress && expected != (unsigned long long)r) {
        PyErr_SetString(PyExc_ValueError, "zstd: frame content size does not match its data");
        return NULL;
    }
    return PyLong_FromSize_t(r);
}

static PyObject *
Codec_compress_into(CodecObject *c, PyObject *const *args, Py_ssize_t nargs)
{
    return codec_run(c, args, nargs, 1);
}

static PyObject *
Codec_decompress_into(CodecObject *c, PyObject *const *args, Py_ssize_t nargs)
{
    return codec_run(c, args, nargs, 0);
}

static PyObject *
Codec_bound(CodecObject *Py_UNUSED(c), PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "size must not be negative");
        return NULL;
    }
    return PyLong_FromSize_t(L.zstd_bound((size_t)n));
}


PyDoc_STRVAR(compress_spans_doc,
"compress_spans(out, data, spans, /) -> list[int]\n\
\n\
One zstd frame of each data[offset:offset + length] for spans = [offset, length, ...], the frames one\n\
after the other in out from offset 0; returns their lengths. ValueError when out has less room than\n\
the bound of a frame. Releases the GIL once for all of them.");

static PyObject *
Codec_compress_spans(CodecObject *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "compress_spans(out, data, spans) takes 3 arguments");
        return NULL;
    }
    if (c->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Codec is in use by another thread");
        return NULL;
    }
    if (c->cctx == NULL && (c->cctx = L.zstd_create_cctx()) == NULL)
        return PyErr_NoMemory();
    Py_buffer out, data;
    if (PyObject_GetBuffer(args[0], &out, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    Py_ssize_t count = 0;
    size_t *spans = get_spans(args[2], data.len, &count);
    size_t *sizes = spans ? PyMem_Calloc((size_t)count + 1, sizeof(size_t)) : NULL;
    PyObject *result = NULL;
    if (spans != NULL && sizes == NULL)
        PyErr_NoMemory();
    if (sizes != NULL) {
        size_t err = 0;
        int room = 1;
        c->busy = 1;
        Py_BEGIN_ALLOW_THREADS
        size_t pos = 0, cap = (size_t)out.len;
        for (Py_ssize_t i = 0; i < count; i++) {
            size_t n = spans[2 * i + 1];
            if (L.zstd_bound(n) > cap - pos) {
                room = 0;
                break;
            }
            size_t r = L.zstd_compress_cctx(c->cctx, (unsigned char *)out.buf + pos, cap - pos,
                                            (const unsigned char *)data.buf + spans[2 * i], n,
                                            c->level);
            if (L.zstd_is_error(r)) {
                err = r;
                break;
            }
            sizes[i] = r;
            pos += r;
        }
        Py_END_ALLOW_THREADS
        c->busy = 0;
        if (!room)
            PyErr_SetString(PyExc_ValueError, "out has too little room for the frames");
        else if (err)
            PyErr_Format(PyExc_ValueError, "zstd: %s", L.zstd_error_name(err));
        else
            result = build_list(count, size_item, sizes);
    }
    PyMem_Free(sizes);
    PyMem_Free(spans);
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

/* One entry of Codec.check_blobs' table: offset, length, uncompressed length (0: not compressed),
 * little-endian uint64 each, then the 32-byte blob ID. */
#define ENTRY (3 * 8 + 32)


static uint64_t
le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

enum { CHECK_OK, CHECK_AUTH, CHECK_SIZE, CHECK_RETRY, CHECK_HASH, CHECK_RANGE };


/* The buffers of Codec.check_blobs and Codec.restore_files (key, data, table, opened, plain). */
typedef struct {
    Py_buffer key, data, table, opened, plain;
} check_args;

/* Ready the codec and take the five buffers from args[0..4]; 0, or -1 with an exception set (and
 * nothing held). */
static int
check_args_get(CodecObject *c, PyObject *const *args, check_args *a)
{
    if (require_digest() < 0)
        return -1;
    if (c->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Codec is in use by another thread");
        return -1;
    }
    if (c->dctx == NULL && (c->dctx = L.zstd_create_dctx()) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (get_key(args[0], &a->key) < 0)
        return -1;
    if (PyObject_GetBuffer(args[1], &a->data, PyBUF_SIMPLE) < 0)
        goto fail_key;
    if (PyObject_GetBuffer(args[2], &a->table, PyBUF_SIMPLE) < 0)
        goto fail_data;
    if (PyObject_GetBuffer(args[3], &a->opened, PyBUF_WRITABLE) < 0)
        goto fail_table;
    if (PyObject_GetBuffer(args[4], &a->plain, PyBUF_WRITABLE) < 0)
        goto fail_opened;
    if (a->table.len % ENTRY == 0)
        return 0;
    PyErr_SetString(PyExc_ValueError, "table must hold 56-byte entries");
    PyBuffer_Release(&a->plain);
fail_opened:
    PyBuffer_Release(&a->opened);
fail_table:
    PyBuffer_Release(&a->table);
fail_data:
    PyBuffer_Release(&a->data);
fail_key:
    PyBuffer_Release(&a->key);
    return -1;
}

static void
check_args_release(check_args *a)
{
    PyBuffer_Release(&a->plain);
    PyBuffer_Release(&a->opened);
    PyBuffer_Release(&a->table);
    PyBuffer_Release(&a->data);
    PyBuffer_Release(&a->key);
}

/* Check the blob of table entry t in a->data (see check_blobs): a CHECK_ status, with the plaintext
 * in *p (a->opened or a->plain) and its length in *pn when CHECK_OK; -1 when libcrypto failed. No
 * GIL needed. */
static int
check_one(CodecObject *c, const check_args *a, const unsigned char *t, const unsigned char **p,
          size_t *pn)
{
    const unsigned char *k = a->key.buf, *d = a->data.buf;
    unsigned char *o = a->opened.buf, *u = a->plain.buf;
    size_t dlen = (size_t)a->data.len, olen = (size_t)a->opened.len, ulen_cap = (size_t)a->plain.len;
    uint64_t off = le64(t), len = le64(t + 8), ulen = le64(t + 16);
    const unsigned char *id = t + 24;
    if (len < NONCE + TAG || off > dlen || len > dlen - off || len - NONCE - TAG > olen ||
        ulen > ulen_cap)
        return CHECK_RANGE;
    const unsigned char *s = d + off;
    size_t n = (size_t)(len - NONCE - TAG);
    unsigned char tag[TAG];
    if (mac_tag(k, s, s + NONCE, n, tag) < 0)
        return -1;
    if (L.memcmp_ct(tag, s + NONCE + n, TAG) != 0)
        return CHECK_AUTH;
    if (ctr_crypt(k, s, s + NONCE, o, n) < 0)
        return -1;
    *p = o;
    *pn = n;
    if (ulen) {
        unsigned long long expected = L.zstd_content_size(o, n);
        size_t r = L.zstd_decompress_dctx(c->dctx, u, (size_t)ulen, o, n);
        if (L.zstd_is_error(r) || expected != (unsigned long long)r)
            return CHECK_RETRY;
        if (r != ulen)
            return CHECK_SIZE;
        *p = u;
        *pn = r;
    }
    unsigned char md[32];
    unsigned int mdlen = 0;
    if (L.digest(*p, *pn, md, &mdlen, L.sha256(), NULL) != 1 || mdlen != 32)
        return -1;
    return memcmp(md, id, 32) == 0 ? CHECK_OK : CHECK_HASH;
}

PyDoc_STRVAR(check_blobs_doc,
"check_blobs(key, data, table, opened, plain, /) -> bytes\n\
\n\
Check every blob that table lists inside data, in one call that releases the GIL: the tag, then\n\
AES-256-CTR into opened, zstd (when compressed) into plain, and SHA-256 of the plaintext against the\n\
ID. table holds one 56-byte entry per blob: offset, length, uncompressed length (0 when stored\n\
uncompressed) as little-endian uint64, then the ID. opened needs the largest length - 32 bytes,\n\
plain the largest uncompressed length. Returns one status byte per blob: 0 right, 1 fails\n\
authentication, 2 decompresses to another size, 3 zstd refused the frame (judge it some other way),\n\
4 hash differs from the ID, 5 outside data or too short to be sealed.");

static PyObject *
Codec_check_blobs(CodecObject *c, PyObject *const *args, Py_ssize_t nargs)
{
    check_args a;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "check_blobs(key, data, table, opened, plain) takes 5 arguments");
        return NULL;
    }
    if (check_args_get(c, args, &a) < 0)
        return NULL;
    Py_ssize_t count = a.table.len / ENTRY;
    PyObject *result = PyBytes_FromStringAndSize(NULL, count);
    if (result == NULL)
        goto done;
    unsigned char *status = (unsigned char *)PyBytes_AS_STRING(result);
    int failed = 0;
    c->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    const unsigned char *t = a.table.buf;
    for (Py_ssize_t i = 0; i < count; i++, t += ENTRY) {
        const unsigned char *p;
        size_t pn;
        int st = check_one(c, &a, t, &p, &pn);
        if (st < 0) {
            failed = 1;
            break;
        }
        status[i] = (unsigned char)st;
    }
    Py_END_ALLOW_THREADS
    c->busy = 0;
    if (failed) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_OSError, "checking blobs failed inside libcrypto");
    }
done:
    check_args_release(&a);
    return result;
}


/* One file of Codec.restore_files: the blob's check status, then the file (see _newfile.h). */
typedef struct {
    PyObject *path; /* the bytes object f.path points into, referenced */
    int check;
    newfile f;
} file_job;

/* Fill job from (path, create, offset, uid, gid, mode, atime_ns, mtime_ns); 0 or -1 (exception). */
static int
parse_job(PyObject *item, file_job *job)
{
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 8) {
        PyErr_SetString(PyExc_TypeError, "files holds (path, create, offset, uid, gid, mode, "
                                         "atime_ns, mtime_ns) tuples");
        return -1;
    }
    PyObject *path = PyTuple_GET_ITEM(item, 0);
    if (!PyBytes_Check(path) || (size_t)PyBytes_GET_SIZE(path) != strlen(PyBytes_AS_STRING(path))) {
        PyErr_SetString(PyExc_ValueError, "a path must be bytes without a null byte");
        return -1;
    }
    newfile *f = &job->f;
    f->create = PyObject_IsTrue(PyTuple_GET_ITEM(item, 1));
    f->offset = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 2));
    f->uid = PyLong_AsLong(PyTuple_GET_ITEM(item, 3));
    f->gid = PyLong_AsLong(PyTuple_GET_ITEM(item, 4));
    f->mode = PyLong_AsLong(PyTuple_GET_ITEM(item, 5));
    if (f->create < 0 || PyErr_Occurred())
        return -1;
    f->set_times = PyTuple_GET_ITEM(item, 6) != Py_None;
    for (int i = 0; f->set_times && i < 2; i++) {
        long long ns = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 6 + i));
        if (ns == -1 && PyErr_Occurred())
            return -1;
        newfile_timespec(ns, &f->times[i]);
    }
    Py_INCREF(path);
    job->path = path;
    f->path = PyBytes_AS_STRING(path);
    return 0;
}

PyDoc_STRVAR(restore_files_doc,
"restore_files(key, data, table, opened, plain, files, /) -> list\n\
\n\
Restore's files of one chunk each, in one call that releases the GIL: every blob that table lists\n\
inside data is checked as check_blobs checks it and, when right, written to its file. files holds\n\
one tuple per entry, (path, create, offset, uid, gid, mode, atime_ns, mtime_ns): open path\n\
(O_NOFOLLOW; with create also O_CREAT | O_EXCL, mode 0600), write the plaintext at offset, fchown\n\
(unless uid is -1), fchmod, set the times (unless atime_ns is None) and close. Returns one tuple per\n\
entry, (check, status, errno, written, fd): check is check_blobs' status byte, and when it is not 0\n\
the file was not touched (status -1). status 0: done (fd -1); 1: not opened (errno says why);\n\
2: writing failed after written bytes; 3: the metadata failed. With 2 and 3 the file is left open\n\
as fd for the caller to finish.");

static PyObject *
Codec_restore_files(CodecObject *c, PyObject *const *args, Py_ssize_t nargs)
{
    check_args a;
    PyObject *result = NULL;
    file_job *jobs = NULL;
    Py_ssize_t parsed = 0;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "restore_files(key, data, table, opened, plain, files) takes 6 arguments");
        return NULL;
    }
    PyObject *files = PySequence_Fast(args[5], "files must be a sequence");
    if (files == NULL)
        return NULL;
    if (check_args_get(c, args, &a) < 0) {
        Py_DECREF(files);
        return NULL;
    }
    Py_ssize_t count = a.table.len / ENTRY;
    if (PySequence_Fast_GET_SIZE(files) != count) {
        PyErr_SetString(PyExc_ValueError, "files must hold one tuple per table entry");
        goto done;
    }
    jobs = PyMem_Calloc((size_t)count + 1, sizeof(file_job));
    if (jobs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; parsed < count; parsed++)
        if (parse_job(PySequence_Fast_GET_ITEM(files, parsed), &jobs[parsed]) < 0)
            goto done;
    int failed = 0;
    c->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    const unsigned char *t = a.table.buf;
    for (Py_ssize_t i = 0; i < count; i++, t += ENTRY) {
        file_job *job = &jobs[i];
        const unsigned char *p = NULL;
        size_t pn = 0;
        job->f.status = -1; /* not touched */
        job->f.fd = -1;
        job->check = check_one(c, &a, t, &p, &pn);
        if (job->check < 0) {
            failed = 1;
            break;
        }
        if (job->check == CHECK_OK)
            newfile_write(&job->f, p, pn);
    }
    Py_END_ALLOW_THREADS
    c->busy = 0;
    if (failed) {
        PyErr_SetString(PyExc_OSError, "checking blobs failed inside libcrypto");
        for (Py_ssize_t i = 0; i < count; i++)
            if (jobs[i].f.fd >= 0)
                close(jobs[i].f.fd);
        goto done;
    }
    result = PyList_New(count);
    for (Py_ssize_t i = 0; result != NULL && i < count; i++) {
        file_job *job = &jobs[i];
        PyObject *item = Py_BuildValue("iiini", job->check, job->f.status, job->f.err,
                                       (Py_ssize_t)job->f.written, job->f.fd);
        if (item == NULL)
            Py_CLEAR(result);
        else
            PyList_SET_ITEM(result, i, item);
    }
done:
    for (Py_ssize_t i = 0; i < parsed; i++)
        Py_XDECREF(jobs[i].path);
    PyMem_Free(jobs);
    Py_DECREF(files);
    check_args_release(&a);
    return result;
}

static PyMethodDef Codec_methods[] = {
    {"restore_files", (PyCFunction)(void (*)(void))Codec_restore_files, METH_FASTCALL,
     restore_files_doc},
    {"compress_into", (PyCFunction)(void (*)(void))Codec_compress_into, METH_FASTCALL,
     "compress_into(out, data, /) -> int\n\nOne zstd frame (content size, no checksum) of data into "
     "out; returns its length. out needs bound(len(data)) bytes to be sure. Releases the GIL."},
    {"decompress_into", (PyCFunction)(void (*)(void))Codec_decompress_into, METH_FASTCALL,
     "decompress_into(out, frame, /) -> int\n\nDecompress one zstd frame that states its content "
     "size into out; returns that size. ValueError on bad data. Releases the GIL."},
    {"compress_spans", (PyCFunction)(void (*)(void))Codec_compress_spans, METH_FASTCALL,
     compress_spans_doc},
    {"check_blobs", (PyCFunction)(void (*)(void))Codec_check_blobs, METH_FASTCALL,
     check_blobs_doc},
    {"bound", (PyCFunction)Codec_bound, METH_O,
     "bound(size, /) -> int\n\nThe largest frame compress_into makes of size bytes."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CodecType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vaultfs.chunker._blob.Codec",
    .tp_basicsize = sizeof(CodecObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Codec(level=3)\n\nA zstd compression and decompression context for one thread at a "
              "time (RuntimeError if two use it at once).",
    .tp_new = Codec_new,
    .tp_dealloc = (destructor)Codec_dealloc,
    .tp_methods = Codec_methods,
};

/* -- module ------------------------------------------------------------------------------------- */

static PyObject *
available(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(load_libs() == 1);
}

static PyMethodDef module_methods[] = {
    {"available", available, METH_NOARGS,
     "available() -> bool\n\nWhether libcrypto and libzstd could be loaded."},
    {"seal_into", (PyCFunction)(void (*)(void))seal_into, METH_FASTCALL, seal_into_doc},
    {"open_into", (PyCFunction)(void (*)(void))open_into, METH_FASTCALL, open_into_doc},
    {"seal_many", (PyCFunction)(void (*)(void))seal_many, METH_FASTCALL, seal_many_doc},
    {"sha256_spans", (PyCFunction)(void (*)(void))sha256_spans, METH_FASTCALL, sha256_spans_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef blob_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_blob",
    .m_doc = "Native per-blob work (zstd, seal, open); use vaultfs.crypto and vaultfs.chunker.blob.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__blob(void)
{
    if (PyType_Ready(&CodecType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&blob_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Codec", (PyObject *)&CodecType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
