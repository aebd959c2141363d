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
    struct fs_index_build *index;
    struct fs_job *job;
};

/* A failure ends the save through the job (the main loop sees it at its next
 * wait); the hasher then drains its pipe so that tee never blocks on it. */
static int add_chunk(struct hasher *h, const uint8_t *buf, size_t n)
{
    int r = fs_index_add(h->index, 0, (uint32_t)n, (uint32_t)n, 0, 0, fs_digest(buf, n));
    if (r < 0)
        return fs_index_fail(h->index, r, h->chunk_size, h->job);
    fs_stat_add(&h->job->stats.chunks, 1);
    fs_stat_add(&h->job->stats.chunks_stored, 1);
    return 0;
}

static void drain(int fd)
{
    uint8_t scrap[4096];
    for (;;) {
        ssize_t k = read(fd, scrap, sizeof scrap);
        if (k == 0 || (k < 0 && errno != EINTR))
            break;
    }
}

static void *hasher_main(void *arg)
{
    struct hasher *h = arg;
    uint64_t cpu0 = fs_thread_cpu_ns();
    uint8_t *buf = malloc(h->chunk_size);
    size_t fill = 0;
    int failed = 0;
    if (!buf) {
        fs_fail(h->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory for the hashing buffer");
        failed = 1;
    }
    while (!failed) {
        ssize_t k = read(h->fd, buf + fill, h->chunk_size - fill);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0) {
            fs_fail(h->job, FS_ERR_IO, errno, -1, -1, "hashing the stream: %s", strerror(errno));
            failed = 1;
            break;
        }
        if (k == 0)
            break;
        fill += (size_t)k;
        if (fill == h->chunk_size) {
            failed = add_chunk(h, buf, fill) < 0;
            fill = 0;
        }
    }
    if (!failed && fill)
        failed = add_chunk(h, buf, fill) < 0;
    if (failed)
        drain(h->fd);
    free(buf);
    fs_stat_add(&h->job->stats.worker_cpu_ns, fs_thread_cpu_ns() - cpu0);
    return NULL;
}

/* Moves exactly n bytes from the input pipe to the image at *off. */
/* Moves exactly n bytes from the input pipe to the image at the sink's position. */
static int move_to_file(int in_fd, struct fs_sink *sink, size_t n, struct fs_job *job)
{
    while (n) {
        loff_t off = (loff_t)fs_sink_pos(sink);
        ssize_t k = splice(in_fd, NULL, sink->fd, &off, n, SPLICE_F_MOVE);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            int err = k < 0 ? errno : EIO;
            return fs_fail(job, FS_ERR_IO, err, -1, (int64_t)fs_sink_pos(sink),
                           "writing the image at offset %llu: %s",
                           (unsigned long long)fs_sink_pos(sink), strerror(err));
        }
        n -= (size_t)k;
        fs_sink_advanced(sink, (uint64_t)k);
    }
    return 0;
}

int fs_save_raw_splice(int in_fd, struct fs_sink *sink, uint32_t chunk_size,
                       struct fs_index_build *index, int *used, struct fs_job *job)
{
    struct stat st;
    int hash_pipe[2];
    *used = 0;
    if (fstat(in_fd, &st) != 0 || !S_ISFIFO(st.st_mode) || sink->len != 0)
        return 0;
    if (pipe2(hash_pipe, O_CLOEXEC) != 0)
        return 0;
    (void)fcntl(hash_pipe[1], F_SETPIPE_SZ, 4 << 20); /* slack so tee rarely waits for the hasher */

    struct hasher h = {.fd = hash_pipe[0], .chunk_size = chunk_size, .index = index, .job = job};
    pthread_t th;
    if (pthread_create(&th, NULL, hasher_main, &h) != 0) {
        close(hash_pipe[0]);
        close(hash_pipe[1]);
        return 0;
    }
    *used = 1;
    uint64_t cpu0 = fs_thread_cpu_ns();
    int r = 0;
    for (;;) {
        uint64_t waited = 0;
        r = fs_wait_ready(in_fd, POLLIN, job, &waited);
        fs_stat_add(&job->stats.input_wait_ns, waited);
        if (r < 0)
            break;
        ssize_t n = tee(in_fd, hash_pipe[1], 1 << 20, 0);
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
        r = move_to_file(in_fd, sink, (size_t)n, job);
        if (r < 0)
            break;
    }
    close(hash_pipe[1]);
    pthread_join(th, NULL);
    close(hash_pipe[0]);
    fs_stat_add(&job->stats.reader_cpu_ns, fs_thread_cpu_ns() - cpu0);
    if (r == 0 && fs_failed(job))
        r = job->error.err ? -job->error.err : -EIO;
    return r;
}
