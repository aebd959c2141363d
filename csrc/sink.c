/* Ordered writer of one image file. With O_DIRECT every write is a whole
 * number of FS_ALIGN blocks from an aligned buffer at an aligned offset; the
 * last block is zero-padded and the file truncated back to its true size. */
#include "fs_internal.h"

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

/* Appends at least this big skip the staging copy when they can. */
#define DIRECT_MIN (256u << 10)
/* Buffered mode starts writeback every this many bytes. */
#define WB_STEP (32u << 20)

int fs_sink_init(struct fs_sink *s, int fd, int direct, size_t cap, struct fs_job *job)
{
    memset(s, 0, sizeof *s);
    s->fd = fd;
    s->direct = direct;
    s->job = job;
    s->cap = fs_align_up(cap, FS_ALIGN);
    s->buf = fs_aligned_alloc(s->cap);
    if (!s->buf)
        return fs_fail(job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory for the write buffer");
    return 0;
}

static void write_behind(struct fs_sink *s);

static int write_at(struct fs_sink *s, const void *p, size_t n)
{
    uint64_t t0 = fs_now_ns();
    int r = fs_pwrite_full(s->fd, p, n, s->off);
    fs_stat_add(&s->job->stats.output_wait_ns, fs_now_ns() - t0);
    if (r < 0)
        return fs_fail(s->job, FS_ERR_IO, -r, -1, (int64_t)s->off,
                       "writing the image at offset %llu: %s", (unsigned long long)s->off,
                       strerror(-r));
    s->off += n;
    fs_stat_add(&s->job->stats.bytes_out, n);
    write_behind(s);
    return 0;
}

/* Buffered writes: start writeback of each new window at once and wait for
 * the one before, dropping its pages. Dirty memory stays bounded, the page
 * cache is not flooded with an image nobody reads soon, and the final fsync
 * has little left to do. */
static void write_behind(struct fs_sink *s)
{
    if (s->direct || s->off - s->wb_start < WB_STEP)
        return;
    sync_file_range(s->fd, (off_t)s->wb_start, (off_t)(s->off - s->wb_start), SYNC_FILE_RANGE_WRITE);
    if (s->wb_start > s->wb_prev) {
        sync_file_range(s->fd, (off_t)s->wb_prev, (off_t)(s->wb_start - s->wb_prev),
                        SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                            SYNC_FILE_RANGE_WAIT_AFTER);
        posix_fadvise(s->fd, (off_t)s->wb_prev, (off_t)(s->wb_start - s->wb_prev),
                      POSIX_FADV_DONTNEED);
    }
    s->wb_prev = s->wb_start;
    s->wb_start = s->off;
}

/* Writes out the whole aligned part of the buffer and keeps the tail. */
int fs_sink_flush(struct fs_sink *s)
{
    size_t whole = s->direct ? s->len / FS_ALIGN * FS_ALIGN : s->len;
    if (whole == 0)
        return 0;
    int r = write_at(s, s->buf, whole);
    if (r < 0)
        return r;
    memmove(s->buf, s->buf + whole, s->len - whole);
    s->len -= whole;
    return 0;
}

int fs_sink_append(struct fs_sink *s, const void *p, size_t n)
{
    const uint8_t *src = p;
    /* Aligned whole blocks with nothing staged go straight to the file. */
    if (s->len == 0 && n >= DIRECT_MIN && ((uintptr_t)src % FS_ALIGN) == 0) {
        size_t whole = n / FS_ALIGN * FS_ALIGN;
        int r = write_at(s, src, whole);
        if (r < 0)
            return r;
        src += whole;
        n -= whole;
    }
    while (n) {
        size_t room = s->cap - s->len;
        size_t k = n < room ? n : room;
        memcpy(s->buf + s->len, src, k);
        s->len += k;
        src += k;
        n -= k;
        if (s->len == s->cap) {
            int r = fs_sink_flush(s);
            if (r < 0)
                return r;
        }
    }
    return 0;
}

uint64_t fs_sink_pos(const struct fs_sink *s)
{
    return s->off + s->len;
}

/* Someone else (splice) wrote n bytes at fs_sink_pos with nothing staged:
 * count them, move on, and start their writeback like the sink's own. */
void fs_sink_advanced(struct fs_sink *s, uint64_t n)
{
    s->off += n;
    fs_stat_add(&s->job->stats.bytes_out, n);
    write_behind(s);
}

/* Writes what is staged; returns with the file at its exact size. */
int fs_sink_finish(struct fs_sink *s)
{
    uint64_t end = fs_sink_pos(s);
    int r = fs_sink_flush(s);
    if (r < 0 || s->len == 0)
        return r;
    size_t padded = fs_align_up(s->len, FS_ALIGN);
    memset(s->buf + s->len, 0, padded - s->len);
    r = write_at(s, s->buf, padded);
    if (r < 0)
        return r;
    /* The padding is not image data: count only the true bytes. */
    fs_stat_add(&s->job->stats.bytes_out, (uint64_t)s->len - padded);
    s->len = 0;
    s->off = end;
    if (ftruncate(s->fd, (off_t)end) != 0)
        return fs_fail(s->job, FS_ERR_IO, errno, -1, (int64_t)end,
                       "truncating the image to %llu bytes: %s", (unsigned long long)end,
                       strerror(errno));
    return 0;
}

void fs_sink_free(struct fs_sink *s)
{
    free(s->buf);
    s->buf = NULL;
}
