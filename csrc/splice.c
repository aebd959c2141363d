/* Raw save without a userspace copy on the data path: tee duplicates the
 * input pipe's pages into a hash pipe, splice moves the originals into the
 * image, and a hashing thread reads the duplicates to build the index. */
#include "fs_internal.h"

#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

struct hasher {
    int fd;
    uint32_t chunk_size;
    struct fs_index_build *ix;
    struct fs_job *job;
    int err;
};

static int add_chunk(struct hasher *h, const uint8_t *buf, size_t n)
{
    if (fs_index_add(h->ix, (uint32_t)n, (uint32_t)n, 0, 0, fs_digest(buf, n)) < 0)
        return -ENOMEM;
    fs_stat_add(&h->job->stats.chunks, 1);
    fs_stat_add(&h->job->stats.chunks_stored, 1);
    return 0;
}

static void *hasher_main(void *arg)
{
    struct hasher *h = arg;
    uint64_t cpu0 = fs_thread_cpu_ns();
    uint8_t *buf = malloc(h->chunk_size);
    size_t fill = 0;
    if (!buf)
        h->err = ENOMEM;
    for (;;) {
        ssize_t k = read(h->fd, buf ? buf + fill : NULL, buf ? h->chunk_size - fill : 0);
        if (!buf)
            break;
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0) {
            h->err = errno;
            break;
        }
        if (k == 0)
            break;
        fill += (size_t)k;
        if (fill == h->chunk_size) {
            if (add_chunk(h, buf, fill) < 0) {
                h->err = ENOMEM;
                break;
            }
            fill = 0;
        }
    }
    if (!h->err && fill && add_chunk(h, buf, fill) < 0)
        h->err = ENOMEM;
    free(buf);
    fs_stat_add(&h->job->stats.worker_cpu_ns, fs_thread_cpu_ns() - cpu0);
    return NULL;
}

/* Waits for input (or its end); 0 ready, <0 cancelled or failed. */
static int wait_input(int fd, struct fs_job *job)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    uint64_t t0 = fs_now_ns();
    for (;;) {
        if (fs_cancelled(job))
            return -ECANCELED;
        int r = poll(&p, 1, 100);
        if (r > 0)
            break;
        if (r < 0 && errno != EINTR)
            return -errno;
    }
    fs_stat_add(&job->stats.input_wait_ns, fs_now_ns() - t0);
    return 0;
}

/* Moves exactly n bytes from the input pipe to the image at *off. */
static int move_to_file(int in_fd, struct fs_sink *sink, uint64_t *off, size_t n, struct fs_job *job)
{
    while (n) {
        loff_t o = (loff_t)*off;
        ssize_t k = splice(in_fd, NULL, sink->fd, &o, n, SPLICE_F_MOVE);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return fs_fail(job, FS_ERR_IO, k < 0 ? errno : EIO, -1, (int64_t)*off,
                           "writing the image at offset %llu: %s", (unsigned long long)*off,
                           strerror(k < 0 ? errno : EIO));
        *off += (uint64_t)k;
        n -= (size_t)k;
        fs_stat_add(&job->stats.bytes_out, (uint64_t)k);
    }
    sink->off = *off;
    fs_sink_write_behind(sink);
    return 0;
}

int fs_save_raw_splice(int in_fd, struct fs_sink *sink, uint32_t chunk_size,
                       struct fs_index_build *ix, struct fs_job *job)
{
    struct stat st;
    int hp[2];
    if (fstat(in_fd, &st) != 0 || !S_ISFIFO(st.st_mode) || sink->len != 0)
        return 1;
    if (pipe2(hp, O_CLOEXEC) != 0)
        return 1;
    (void)fcntl(hp[1], F_SETPIPE_SZ, 4 << 20); /* slack so tee rarely waits for the hasher */

    struct hasher h = {.fd = hp[0], .chunk_size = chunk_size, .ix = ix, .job = job};
    pthread_t th;
    if (pthread_create(&th, NULL, hasher_main, &h) != 0) {
        close(hp[0]);
        close(hp[1]);
        return 1;
    }
    uint64_t cpu0 = fs_thread_cpu_ns(), off = sink->off;
    int r = 0;
    for (;;) {
        r = wait_input(in_fd, job);
        if (r < 0)
            break;
        ssize_t n = tee(in_fd, hp[1], 1 << 20, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            continue;
        if (n < 0) {
            r = fs_fail(job, FS_ERR_IO, errno, -1, -1, "reading the stream: %s", strerror(errno));
            break;
        }
        if (n == 0)
            break;
        fs_stat_add(&job->stats.bytes_in, (uint64_t)n);
        r = move_to_file(in_fd, sink, &off, (size_t)n, job);
        if (r < 0)
            break;
    }
    close(hp[1]);
    pthread_join(th, NULL);
    close(hp[0]);
    fs_stat_add(&job->stats.reader_cpu_ns, fs_thread_cpu_ns() - cpu0);
    sink->off = off;
    if (r == 0 && h.err)
        r = fs_fail(job, FS_ERR_IO, h.err, -1, -1, "hashing the stream: %s", strerror(h.err));
    return r < 0 ? (r == -1 ? -EIO : r) : 0;
}
