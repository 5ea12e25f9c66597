/*
 * scrypt's ROMix (RFC 7914 section 5) on lanes the caller picks, so that the p independent lanes of one
 * key derivation can run in several threads at once. hashlib.scrypt (OpenSSL) runs the lanes one after
 * the other; restic's key files use p > 1 (p is calibrated by timing: p = 8 on a fast machine), so on a
 * 2-core machine opening a vault takes half the time when the lanes are spread over both cores.
 *
 * The caller does the two PBKDF2-HMAC-SHA256 steps (hashlib.pbkdf2_hmac, one iteration each) and passes
 * the expanded buffer B = B_0 || ... || B_{p-1} of 128*r bytes per lane; romix() replaces each lane of
 * the buffer it is given in place, with the GIL released.
 *
 * Plain C, as in the RFC: the four quarter-rounds of a Salsa20 round are independent chains, which a
 * modern core runs side by side with one-instruction rotates. (An SSE2 version with the state in
 * diagonal order was measured 1.5x slower here: one chain, three instructions per rotate.)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK_WORDS 16

static inline uint32_t
load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline void
store_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

#define ROTL(a, b) (((a) << (b)) | ((a) >> (32 - (b))))

static void
salsa8(uint32_t b[16])
{
    uint32_t x[16];
    memcpy(x, b, sizeof(x));
    for (int i = 0; i < 8; i += 2) {
        x[4] ^= ROTL(x[0] + x[12], 7);
        x[8] ^= ROTL(x[4] + x[0], 9);
        x[12] ^= ROTL(x[8] + x[4], 13);
        x[0] ^= ROTL(x[12] + x[8], 18);
        x[9] ^= ROTL(x[5] + x[1], 7);
        x[13] ^= ROTL(x[9] + x[5], 9);
        x[1] ^= ROTL(x[13] + x[9], 13);
        x[5] ^= ROTL(x[1] + x[13], 18);
        x[14] ^= ROTL(x[10] + x[6], 7);
        x[2] ^= ROTL(x[14] + x[10], 9);
        x[6] ^= ROTL(x[2] + x[14], 13);
        x[10] ^= ROTL(x[6] + x[2], 18);
        x[3] ^= ROTL(x[15] + x[11], 7);
        x[7] ^= ROTL(x[3] + x[15], 9);
        x[11] ^= ROTL(x[7] + x[3], 13);
        x[15] ^= ROTL(x[11] + x[7], 18);
        x[1] ^= ROTL(x[0] + x[3], 7);
        x[2] ^= ROTL(x[1] + x[0], 9);
        x[3] ^= ROTL(x[2] + x[1], 13);
        x[0] ^= ROTL(x[3] + x[2], 18);
        x[6] ^= ROTL(x[5] + x[4], 7);
        x[7] ^= ROTL(x[6] + x[5], 9);
        x[4] ^= ROTL(x[7] + x[6], 13);
        x[5] ^= ROTL(x[4] + x[7], 18);
        x[11] ^= ROTL(x[10] + x[9], 7);
        x[8] ^= ROTL(x[11] + x[10], 9);
        x[9] ^= ROTL(x[8] + x[11], 13);
        x[10] ^= ROTL(x[9] + x[8], 18);
        x[12] ^= ROTL(x[15] + x[14], 7);
        x[13] ^= ROTL(x[12] + x[15], 9);
        x[14] ^= ROTL(x[13] + x[12], 13);
        x[15] ^= ROTL(x[14] + x[13], 18);
    }
    for (int i = 0; i < 16; i++)
        b[i] += x[i];
}

/* BlockMix: in (2r blocks) -> out (2r blocks), even outputs first, then odd ones. */
static void
blockmix(const uint32_t *in, uint32_t *out, size_t r)
{
    uint32_t x[16];
    memcpy(x, in + (2 * r - 1) * 16, sizeof(x));
    for (size_t i = 0; i < 2 * r; i++) {
        for (int k = 0; k < 16; k++)
            x[k] ^= in[i * 16 + k];
        salsa8(x);
        memcpy(out + ((i & 1) * r + i / 2) * 16, x, sizeof(x));
    }
}

static void
romix_lane(uint8_t *b, size_t n, size_t r, uint32_t *v, uint32_t *x, uint32_t *y)
{
    size_t words = 32 * r;
    for (size_t k = 0; k < words; k++)
        x[k] = load_le32(b + 4 * k);
    for (size_t i = 0; i < n; i++) {
        memcpy(v + i * words, x, words * 4);
        blockmix(x, y, r);
        memcpy(x, y, words * 4);
    }
    for (size_t i = 0; i < n; i++) {
        size_t j = x[(2 * r - 1) * 16] & (n - 1);
        for (size_t k = 0; k < words; k++)
            x[k] ^= v[j * words + k];
        blockmix(x, y, r);
        memcpy(x, y, words * 4);
    }
    for (size_t k = 0; k < words; k++)
        store_le32(b + 4 * k, x[k]);
}

/* -- Python --------------------------------------------------------------------------------------- */

static PyObject *
romix(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer buf;
    Py_ssize_t n, r;
    if (!PyArg_ParseTuple(args, "w*nn", &buf, &n, &r))
        return NULL;
    if (r < 1 || r > (1 << 20) || n < 2 || (n & (n - 1)) != 0 || n > ((Py_ssize_t)1 << 32)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "romix: N must be a power of two >= 2 and 1 <= r <= 2^20");
        return NULL;
    }
    size_t lane = 128 * (size_t)r, words = 32 * (size_t)r;
    if (buf.len == 0 || (size_t)buf.len % lane != 0) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "romix: buffer is not a whole number of lanes");
        return NULL;
    }
    /* V (n blocks of 128*r bytes) plus X and Y; one allocation serves every lane of the buffer. */
    uint32_t *mem = NULL;
    if ((size_t)n > SIZE_MAX / lane - 2 || posix_memalign((void **)&mem, 64, ((size_t)n + 2) * lane)) {
        PyBuffer_Release(&buf);
        return PyErr_NoMemory();
    }
    size_t lanes = (size_t)buf.len / lane;
    uint8_t *base = buf.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < lanes; i++)
        romix_lane(base + i * lane, (size_t)n, (size_t)r, mem, mem + (size_t)n * words,
                   mem + ((size_t)n + 1) * words);
    Py_END_ALLOW_THREADS
    free(mem);
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"romix", romix, METH_VARARGS,
     "romix(buffer, n, r): replace each 128*r-byte lane of a writable buffer by scrypt's ROMix of it "
     "(GIL released)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scrypt", "scrypt ROMix lanes with the GIL released.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__scrypt(void)
{
    return PyModule_Create(&module);
}
