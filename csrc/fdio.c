/* Full reads and writes that stay cancellable on pipes and sockets. */
#include "fs_internal.h"

#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define POLL_SLICE_MS 100

/* Waits until fd is ready, in slices that notice cancellation; returns 0,
 * -ECANCELED when the job ended, or -errno. The wait is added to *wait_ns. */
int fs_wait_ready(int fd, short events, struct fs_job *job, uint64_t *wait_ns)
{
    struct pollfd p = {.fd = fd, .events = events};
    uint64_t t0 = fs_now_ns();
    for (;;) {
        if (fs_cancelled(job))
            return -ECANCELED;
        int r = poll(&p, 1, POLL_SLICE_MS);
        if (r > 0)
            break;
        if (r < 0 && errno != EINTR)
            return -errno;
    }
    if (wait_ns)
        *wait_ns += fs_now_ns() - t0;
    return 0;
}

/* Reads until n bytes or EOF; returns the count, or -errno. Each read is
 * added to *count as it happens, so progress shows partial chunks. */
ssize_t fs_read_full(int fd, void *buf, size_t n, struct fs_job *job, uint64_t *wait_ns,
                     uint64_t *count)
{
    size_t got = 0;
    while (got < n) {
        int r = fs_wait_ready(fd, POLLIN, job, wait_ns);
        if (r < 0)
            return r;
        ssize_t k = read(fd, (uint8_t *)buf + got, n - got);
        if (k == 0)
            break;
        if (k < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -errno;
        }
        got += (size_t)k;
        fs_stat_add(count, (uint64_t)k);
    }
    return (ssize_t)got;
}

/* Never blocks inside write(): POLLOUT only promises some room, and a
 * blocking write of a whole chunk would then wait for the consumer with no
 * way to cancel. Sockets get MSG_DONTWAIT; pipes are written through a
 * non-blocking alias (fs_nonblocking_writer). */
int fs_write_full(int fd, const void *buf, size_t n, struct fs_job *job, uint64_t *wait_ns)
{
    size_t put = 0;
    int sock = 1;
    while (put < n) {
        int r = fs_wait_ready(fd, POLLOUT, job, wait_ns);
        if (r < 0)
            return r;
        ssize_t k;
        if (sock) {
            k = send(fd, (const uint8_t *)buf + put, n - put, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (k < 0 && errno == ENOTSOCK) {
                sock = 0;
                k = write(fd, (const uint8_t *)buf + put, n - put);
            }
        } else {
            k = write(fd, (const uint8_t *)buf + put, n - put);
        }
        if (k < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -errno;
        }
        put += (size_t)k;
    }
    return 0;
}

int fs_pwrite_full(int fd, const void *buf, size_t n, uint64_t off)
{
    size_t put = 0;
    while (put < n) {
        ssize_t k = pwrite(fd, (const uint8_t *)buf + put, n - put, (off_t)(off + put));
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (k == 0)
            return -EIO;
        put += (size_t)k;
    }
    return 0;
}

/* Reads exactly n bytes at off; a short file gives -ENODATA. */
int fs_pread_exact(int fd, void *buf, size_t n, uint64_t off)
{
    size_t got = 0;
    while (got < n) {
        ssize_t k = pread(fd, (uint8_t *)buf + got, n - got, (off_t)(off + got));
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (k == 0)
            return -ENODATA;
        got += (size_t)k;
    }
    return 0;
}

/* Bigger pipe buffers mean fewer wakeups for both the producer and us. */
void fs_grow_pipe(int fd)
{
    int cur = fcntl(fd, F_GETPIPE_SZ);
    if (cur > 0 && cur < (1 << 20))
        (void)fcntl(fd, F_SETPIPE_SZ, 1 << 20);
}

/* A private O_NONBLOCK open file description of a blocking pipe, so writes
 * can be non-blocking without changing the flags the caller's fd shares with
 * other processes. Returns the new fd, -ENOTSUP when fd is not such a pipe,
 * or -errno. */
int fs_nonblocking_writer(int fd)
{
    struct stat st;
    char path[64];
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (fl & O_NONBLOCK) || fstat(fd, &st) != 0 || !S_ISFIFO(st.st_mode))
        return -ENOTSUP;
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int alias = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    return alias >= 0 ? alias : -errno;
}
