/*
 * 64 hex digits to a 32-byte ID, as bytes.fromhex does for the IDs in restic's JSON (either case).
 * Shared by the C halves of tree decoding (format/_tree.c) and change detection (ops/_files.c).
 */
#ifndef VAULTFS_HEXID_H
#define VAULTFS_HEXID_H

static int
hex_digit(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The 32-byte ID of an exact str of 64 hex digits (a new bytes object); NULL without an error set
 * when the text is anything else, NULL with one when memory runs out. */
static PyObject *
hex_id(PyObject *text)
{
    if (!PyUnicode_CheckExact(text) || !PyUnicode_IS_ASCII(text) || PyUnicode_GET_LENGTH(text) != 64)
        return NULL;
    const unsigned char *s = PyUnicode_DATA(text);
    unsigned char raw[32];
    for (int i = 0; i < 32; i++) {
        int hi = hex_digit(s[2 * i]), lo = hex_digit(s[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return NULL;
        raw[i] = (unsigned char)(hi << 4 | lo);
    }
    return PyBytes_FromStringAndSize((const char *)raw, 32);
}

#endif
