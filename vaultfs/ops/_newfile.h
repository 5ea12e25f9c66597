/*
 * Restore's write of one file, shared by vaultfs.ops._newfile.write_file and
 * vaultfs.chunker._blob.Codec.restore_files: open (or create) it, write data at an offset, set its
 * owner, mode and times, and close it. Plain C with no Python calls, so it runs without the GIL.
 * Include after Python.h (which sets the feature macros these calls need).
 */
#ifndef VAULTFS_NEWFILE_H
#define VAULTFS_NEWFILE_H

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* Outcomes (newfile.status). With WRITE_FAILED and META_FAILED the file is left open as fd. */
enum { NEWFILE_DONE = 0, NEWFILE_NOT_OPENED = 1, NEWFILE_WRITE_FAILED = 2, NEWFILE_META_FAILED = 3 };

typedef struct {
    /* what to do */
    const char *path;
    int create;    /* O_CREAT | O_EXCL, mode 0600 */
    long long offset;
    long uid, gid; /* uid -1: no fchown */
    long mode;
    int set_times;
    struct timespec times[2]; /* atime, mtime */
    /* what happened */
    int status, err, fd;
    long long written;
} newfile;

/* Nanoseconds since the epoch as a timespec (floor division, so times before 1970 come out right). */
static void
newfile_timespec(long long ns, struct timespec *ts)
{
    long long sec = ns / 1000000000LL, rem = ns % 1000000000LL;
    if (rem < 0) {
        rem += 1000000000LL;
        sec -= 1;
    }
    ts->tv_sec = (time_t)sec;
    ts->tv_nsec = (long)rem;
}

/* Do what f says with len bytes of data; stops at the first failure (status, errno in err). */
static void
newfile_write(newfile *f, const unsigned char *data, size_t len)
{
    f->written = 0;
    f->err = 0;
    f->fd = open(f->path, O_WRONLY | O_CLOEXEC | O_NOFOLLOW | (f->create ? O_CREAT | O_EXCL : 0), 0600);
    if (f->fd < 0) {
        f->status = NEWFILE_NOT_OPENED;
        f->err = errno;
        return;
    }
    while ((size_t)f->written < len) {
        ssize_t n = pwrite(f->fd, data + f->written, len - (size_t)f->written,
                           (off_t)(f->offset + f->written));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            f->status = NEWFILE_WRITE_FAILED;
            f->err = errno;
            return;
        }
        f->written += n;
    }
    if ((f->uid != -1 && fchown(f->fd, (uid_t)f->uid, (gid_t)f->gid) < 0) ||
        fchmod(f->fd, (mode_t)f->mode) < 0 || (f->set_times && futimens(f->fd, f->times) < 0)) {
        f->status = NEWFILE_META_FAILED;
        f->err = errno;
        return;
    }
    close(f->fd);
    f->fd = -1;
    f->status = NEWFILE_DONE;
}

#endif
