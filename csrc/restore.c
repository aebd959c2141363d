/* Restore and verify: image in, stream out.
 *
 * The image is fully checked except for its chunk data before anything is
 * written. A reader thread loads stored chunks into a fixed ring; workers
 * decompress and hash them; the calling thread checks each chunk's chain
 * value in order and only then writes it, so nothing unverified reaches the
 * consumer and the first bad chunk ends the restore.
 */
#include "fs_internal.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <zstd.h>

_Static_assert(FS_CHANNELS_MAX <= 256, "a chunk's channel is kept in one byte");

enum { R_FREE, R_QUEUED, R_READY };

struct rslot {
    uint8_t *in, *out;
    const uint8_t *data;              /* the chunk's bytes as stored, inside `in` */
    const uint8_t *plain;             /* its stream bytes after decoding */
    int state;
    uint64_t digest;
    const char *fault;                /* why decoding failed, or NULL */
};

/* The pipeline of one channel: its chunks, in its order, to its output.
 * `seq` counts the channel's chunks; the image's index numbers all chunks
 * in file order (`chunk_at` maps one to the other; NULL: the same). */
struct restore {
    const struct fs_image *img;
    struct fs_job *job;
    struct fs_sync sync;
    int data_fd;
    int direct;
    int out_fd;
    uint32_t channel;
    uint64_t count;                   /* chunks of this channel */
    const uint32_t *chunk_at;
    const uint64_t *offset;           /* file offset of every chunk of the image */
    struct rslot *slots;
    uint32_t nslots, nworkers;
    size_t in_cap;
    uint64_t *queue, q_head, q_tail;
    uint64_t next_write;
    uint32_t nreaders, readers_left;
    int reader_done;
    int rc;
};

static uint64_t image_seq(const struct restore *r, uint64_t seq)
{
    return r->chunk_at ? r->chunk_at[seq] : seq;
}

static const struct fs_entry *entry_of(const struct restore *r, uint64_t seq)
{
    return &r->img->entries[image_seq(r, seq)];
}

/* One sequential O_DIRECT read at a time gets a fraction of what a disk
 * gives with several in flight (measured on a virtio disk: 1.15 GB/s with
 * one, 2.3 GB/s with four); buffered reads have the kernel's readahead. */
#define DIRECT_READERS 4

struct reader_arg {
    struct restore *r;
    uint32_t index;
};

static struct rslot *rslot_of(struct restore *r, uint64_t seq) { return &r->slots[seq % r->nslots]; }

/* Reads a chunk; with O_DIRECT the read covers the aligned blocks around it. */
static int load_chunk(struct restore *r, struct rslot *sl, uint64_t off, uint32_t len, uint64_t seq)
{
    uint64_t start = r->direct ? off / FS_ALIGN * FS_ALIGN : off;
    size_t want = (size_t)(off + len - start);
    size_t ask = r->direct ? fs_align_up(want, FS_ALIGN) : want;
    size_t got = 0;
    while (got < want) {
        ssize_t k = pread(r->data_fd, sl->in + got, ask - got, (off_t)(start + got));
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return fs_fail(r->job, FS_ERR_IO, errno, (int64_t)seq, (int64_t)(start + got),
                           "reading chunk %llu at offset %llu: %s", (unsigned long long)seq,
                           (unsigned long long)(start + got), strerror(errno));
        if (k == 0)
            return fs_fail(r->job, FS_ERR_TRUNCATED, EBADMSG, (int64_t)seq, (int64_t)(start + got),
                           "image ends inside chunk %llu (offset %llu)", (unsigned long long)seq,
                           (unsigned long long)(start + got));
        got += (size_t)k;
    }
    sl->data = sl->in + (off - start);
    fs_stat_add(&r->job->stats.bytes_in, len);
    return 0;
}

/* Reader `index` of `nreaders` loads chunks index, index + nreaders, ... */
static void *reader_main(void *arg)
{
    struct reader_arg *self = arg;
    struct restore *r = self->r;
    uint64_t cpu0 = fs_thread_cpu_ns();
    for (uint64_t seq = self->index; seq < r->count; seq += r->nreaders) {
        struct rslot *sl = rslot_of(r, seq);
        pthread_mutex_lock(&r->sync.mu);
        /* The slot is this chunk's once the chunk nslots before it was
         * written: a slot that merely looks free may be another reader's. */
        while (!r->sync.stop && (sl->state != R_FREE || seq >= r->next_write + r->nslots))
            fs_sync_wait(&r->sync, &r->sync.cv_free);
        int stop = r->sync.stop;
        pthread_mutex_unlock(&r->sync.mu);
        if (stop || fs_cancelled(r->job))
            break;
        uint64_t at = image_seq(r, seq);
        if (load_chunk(r, sl, r->offset[at], r->img->entries[at].stored_len, at) < 0) {
            fs_sync_stop(&r->sync);
            break;
        }
        pthread_mutex_lock(&r->sync.mu);
        sl->state = R_QUEUED;
        sl->fault = NULL;
        r->queue[r->q_tail++ % r->nslots] = seq;
        pthread_cond_signal(&r->sync.cv_work);
        pthread_mutex_unlock(&r->sync.mu);
    }
    pthread_mutex_lock(&r->sync.mu);
    if (--r->readers_left == 0) {
        r->reader_done = 1;
        pthread_cond_broadcast(&r->sync.cv_work);
    }
    pthread_mutex_unlock(&r->sync.mu);
    fs_stat_add(&r->job->stats.reader_cpu_ns, fs_thread_cpu_ns() - cpu0);
    return NULL;
}

/* Turns a stored chunk into stream bytes; returns why it cannot, or NULL. */
static const char *decode(struct restore *r, ZSTD_DCtx *dctx, struct rslot *sl, const struct fs_entry *e)
{
    if (r->img->lv_format == FS_LV_FORMAT_RAW) {
        sl->plain = sl->data;
        return NULL;
    }
    if (!(e->flags & FS_ENTRY_COMPRESSED)) {
        if (fs_raw_frame_decode(sl->data, e->stored_len, sl->out, e->raw_len) < 0)
            return "stored frame malformed";
        sl->plain = sl->out;
        return NULL;
    }
    if ((uint32_t)fs_digest(sl->data, e->stored_len) != e->check)
        return "compressed bytes checksum mismatch";
    if (ZSTD_findFrameCompressedSize(sl->data, e->stored_len) != e->stored_len)
        return "not exactly one zstd frame";
    if (ZSTD_getFrameContentSize(sl->data, e->stored_len) != e->raw_len)
        return "zstd frame declares another size";
    size_t n = ZSTD_decompressDCtx(dctx, sl->out, r->img->meta.chunk_size, sl->data, e->stored_len);
    if (ZSTD_isError(n))
        return ZSTD_getErrorName(n);
    if (n != e->raw_len)
        return "decoded size differs from the index";
    sl->plain = sl->out;
    return NULL;
}

static void *worker_main(void *arg)
{
    struct restore *r = arg;
    uint64_t cpu0 = fs_thread_cpu_ns();
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    if (!dctx) {
        fs_fail(r->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "cannot set up a zstd decompressor");
        fs_sync_stop(&r->sync);
        return NULL;
    }
    ZSTD_DCtx_setParameter(dctx, ZSTD_d_windowLogMax, 27);
    pthread_mutex_lock(&r->sync.mu);
    for (;;) {
        while (!r->sync.stop && r->q_head == r->q_tail && !r->reader_done)
            fs_sync_wait(&r->sync, &r->sync.cv_work);
        if (r->sync.stop || r->q_head == r->q_tail)
            break;
        uint64_t seq = r->queue[r->q_head++ % r->nslots];
        struct rslot *sl = rslot_of(r, seq);
        pthread_mutex_unlock(&r->sync.mu);

        const struct fs_entry *e = entry_of(r, seq);
        sl->fault = decode(r, dctx, sl, e);
        if (!sl->fault)
            sl->digest = fs_digest(sl->plain, e->raw_len);

        pthread_mutex_lock(&r->sync.mu);
        sl->state = R_READY;
        pthread_cond_broadcast(&r->sync.cv_ready);
    }
    pthread_mutex_unlock(&r->sync.mu);
    ZSTD_freeDCtx(dctx);
    fs_stat_add(&r->job->stats.worker_cpu_ns, fs_thread_cpu_ns() - cpu0);
    return NULL;
}

/* The channel's own thread: check each chunk's chain in order, then hand it on. */
static int write_loop(struct restore *r, int out_fd)
{
    uint64_t cpu0 = fs_thread_cpu_ns();
    uint64_t chain = fs_channel_seed(r->img->trailer.major, r->channel);
    int rc = 0;
    for (uint64_t seq = 0; seq < r->count && rc == 0; seq++) {
        struct rslot *sl = rslot_of(r, seq);
        pthread_mutex_lock(&r->sync.mu);
        while (!r->sync.stop && sl->state != R_READY)
            fs_sync_wait(&r->sync, &r->sync.cv_ready);
        int stop = r->sync.stop;
        pthread_mutex_unlock(&r->sync.mu);
        if (stop) {
            rc = -ECANCELED;
            break;
        }
        const struct fs_entry *e = entry_of(r, seq);
        uint64_t at = image_seq(r, seq);
        if (!sl->fault) {
            chain = fs_chain(chain, seq, sl->digest, e->raw_len);
            if (chain != e->chain)
                sl->fault = "checksum mismatch";
        }
        if (sl->fault) {
            uint64_t off = r->offset[at];
            if (r->chunk_at)
                rc = fs_fail(r->job, FS_ERR_CORRUPT, EBADMSG, (int64_t)at, (int64_t)off,
                             "chunk %llu (channel %u, its chunk %llu) at offset %llu: %s",
                             (unsigned long long)at, r->channel, (unsigned long long)seq,
                             (unsigned long long)off, sl->fault);
            else
                rc = fs_fail(r->job, FS_ERR_CORRUPT, EBADMSG, (int64_t)seq, (int64_t)off,
                             "chunk %llu at offset %llu: %s", (unsigned long long)seq,
                             (unsigned long long)off, sl->fault);
            break;
        }
        if (out_fd >= 0) {
            uint64_t out_wait = 0;
            int w = fs_write_full(out_fd, sl->plain, e->raw_len, r->job, &out_wait);
            fs_stat_add(&r->job->stats.output_wait_ns, out_wait);
            if (w < 0) {
                rc = w == -ECANCELED ? w
                                     : r->chunk_at
                                           ? fs_fail(r->job, FS_ERR_IO, -w, (int64_t)at, -1,
                                                     "writing channel %u: %s", r->channel, strerror(-w))
                                           : fs_fail(r->job, FS_ERR_IO, -w, (int64_t)seq, -1,
                                                     "writing the stream: %s", strerror(-w));
                break;
            }
        }
        fs_stat_add(&r->job->stats.bytes_out, e->raw_len);
        fs_stat_add(&r->job->stats.chunks, 1);
        fs_stat_add(e->flags ? &r->job->stats.chunks_compressed : &r->job->stats.chunks_stored, 1);
        pthread_mutex_lock(&r->sync.mu);
        sl->state = R_FREE;
        r->next_write = seq + 1;
        pthread_cond_broadcast(&r->sync.cv_free);
        pthread_mutex_unlock(&r->sync.mu);
    }
    if (rc < 0)
        fs_sync_stop(&r->sync);
    fs_stat_add(&r->job->stats.writer_cpu_ns, fs_thread_cpu_ns() - cpu0);
    return rc;
}

/* The fd chunks are read from: the image's own, or an O_DIRECT one of the same
 * file (-1 when O_DIRECT is not to be had). */
static int open_data_fd(int image_fd, int want_direct)
{
    if (!want_direct) {
        /* one pass front to back: a larger readahead window */
        posix_fadvise(image_fd, 0, 0, POSIX_FADV_SEQUENTIAL);
        return -1;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", image_fd);
    return open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
}

static int check_opts(const struct fs_restore_opts *opts, struct fs_job *job)
{
    if (opts->threads < 0 || opts->threads > FS_THREADS_MAX)
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "threads %d out of range 0..%d",
                       opts->threads, FS_THREADS_MAX);
    if (opts->slots > FS_SLOTS_MAX)
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "slots %u is more than the limit of %d",
                       opts->slots, FS_SLOTS_MAX);
    return 0;
}

#define MIB(v) ((unsigned long long)(((v) + (1u << 20) - 1) >> 20))

static size_t in_cap_of(uint32_t chunk_size)
{
    uint64_t max_stored = ZSTD_compressBound(chunk_size);
    if (fs_raw_frame_size(chunk_size) > max_stored)
        max_stored = fs_raw_frame_size(chunk_size);
    return fs_align_up(max_stored, FS_ALIGN) + 2 * FS_ALIGN;
}

/* One slot: a chunk as stored and, for zstd images, its decoded bytes. */
uint64_t fs_restore_slot_size(uint32_t chunk_size, int zstd)
{
    return in_cap_of(chunk_size) + (zstd ? chunk_size : 0);
}

/* Workers and ring depth of one channel's pipeline within its share of
 * FS_BUFFERS_MAX (the limit divided by the channels). The image sets the
 * chunk size, so the default ring is shortened and the workers made fewer
 * until it fits (one worker and three slots always do: the image's checks
 * refuse channel counts and chunk sizes where they would not). */
static int plan_ring(struct restore *r, const struct fs_restore_opts *opts, uint32_t channels)
{
    const struct fs_meta *m = &r->img->meta;
    r->in_cap = in_cap_of(m->chunk_size);
    uint64_t per_slot = fs_restore_slot_size(m->chunk_size, r->img->lv_format == FS_LV_FORMAT_ZSTD);
    uint64_t room = FS_BUFFERS_MAX / per_slot / channels;
    uint64_t threads = opts->threads > 0 ? (uint64_t)opts->threads : 1;
    uint64_t workers = threads / channels > 0 ? threads / channels : 1;
    while (workers > 1 && workers + 2 > room)
        workers--;
    uint64_t nslots;
    r->nreaders = r->direct ? (channels < DIRECT_READERS ? DIRECT_READERS / channels : 1) : 1;
    if (opts->slots) {
        nslots = opts->slots;
        if (nslots > room)
            return channels == 1
                ? fs_fail(r->job, FS_ERR_ARG, EINVAL, -1, -1,
                          "slots %u of %llu bytes each (chunk size %u of the image) need %llu MiB, "
                          "more than the limit of %llu MiB",
                          opts->slots, (unsigned long long)per_slot, m->chunk_size,
                          MIB(nslots * per_slot), MIB(FS_BUFFERS_MAX))
                : fs_fail(r->job, FS_ERR_ARG, EINVAL, -1, -1,
                          "slots %u for each of %u channels, of %llu bytes each (chunk size %u of "
                          "the image), need %llu MiB, more than the limit of %llu MiB",
                          opts->slots, channels, (unsigned long long)per_slot, m->chunk_size,
                          MIB(nslots * channels * per_slot), MIB(FS_BUFFERS_MAX));
    } else {
        nslots = 2 * workers + 2 + r->nreaders;
        if (nslots > room)
            nslots = room;
    }
    if (nslots < workers + 2)
        nslots = workers + 2;
    r->nworkers = (uint32_t)workers;
    r->nslots = (uint32_t)nslots;
    return 0;
}

static int alloc_ring(struct restore *r)
{
    r->slots = calloc(r->nslots, sizeof *r->slots);
    r->queue = calloc(r->nslots, sizeof *r->queue);
    if (!r->slots || !r->queue)
        return fs_fail(r->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory for buffers");
    int zstd = r->img->lv_format == FS_LV_FORMAT_ZSTD;
    for (uint32_t i = 0; i < r->nslots; i++) {
        r->slots[i].in = fs_aligned_alloc(r->in_cap);
        r->slots[i].out = zstd ? fs_aligned_alloc(r->img->meta.chunk_size) : NULL;
        if (!r->slots[i].in || (zstd && !r->slots[i].out))
            return fs_fail(r->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory for buffers");
    }
    return 0;
}

static void free_ring(struct restore *r)
{
    for (uint32_t i = 0; r->slots && i < r->nslots; i++) {
        free(r->slots[i].in);
        free(r->slots[i].out);
    }
    free(r->slots);
    free(r->queue);
    r->slots = NULL;
    r->queue = NULL;
}

/* One channel's pipeline, ring already allocated; sets r->rc to 0 or -EIO. */
static void *run(void *arg)
{
    struct restore *r = arg;
    pthread_t readers[DIRECT_READERS], workers[FS_THREADS_MAX];
    struct reader_arg reader_args[DIRECT_READERS];
    uint32_t started = 0, readers_started = 0;
    int rc = -1;
    r->readers_left = r->nreaders;
    for (uint32_t i = 0; i < r->nreaders; i++, readers_started++) {
        reader_args[i] = (struct reader_arg){.r = r, .index = i};
        if (pthread_create(&readers[i], NULL, reader_main, &reader_args[i]) != 0)
            break;
    }
    int reader_started = readers_started == r->nreaders;
    for (uint32_t i = 0; reader_started && i < r->nworkers; i++, started++)
        if (pthread_create(&workers[i], NULL, worker_main, r) != 0)
            break;
    if (!reader_started || started < r->nworkers) {
        fs_fail(r->job, FS_ERR_NOMEM, EAGAIN, -1, -1, "cannot start threads");
        fs_sync_stop(&r->sync);
    } else {
        rc = write_loop(r, r->out_fd);
    }
    if (rc < 0)
        fs_sync_stop(&r->sync);
    for (uint32_t i = 0; i < started; i++)
        pthread_join(workers[i], NULL);
    for (uint32_t i = 0; i < readers_started; i++)
        pthread_join(readers[i], NULL);
    /* the error itself is read from the job once every channel has ended:
     * another channel may still be writing it */
    r->rc = rc < 0 || fs_failed(r->job) ? -EIO : 0;
    return NULL;
}

/* Where every chunk starts, and (several channels) each channel's chunks in
 * its order: 8 bytes a chunk, and 4 more for several channels. */
static int map_chunks(const struct fs_image *img, uint64_t **offset, uint32_t **chunk_at,
                      uint64_t *first, struct fs_job *job)
{
    uint64_t count = img->count;
    *offset = malloc((count ? count : 1) * sizeof **offset);
    *chunk_at = img->meta.channels > 1 ? malloc((count ? count : 1) * sizeof **chunk_at) : NULL;
    if (!*offset || (img->meta.channels > 1 && !*chunk_at))
        return fs_fail(job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory for the chunk map");
    uint64_t off = img->chunks_offset;
    for (uint64_t i = 0; i < count; i++) {
        (*offset)[i] = off;
        off += img->entries[i].stored_len;
    }
    if (!*chunk_at)
        return 0;
    uint64_t fill[FS_CHANNELS_MAX];
    for (uint32_t c = 0, at = 0; c < img->meta.channels; c++) {
        first[c] = at;
        fill[c] = at;
        at += (uint32_t)img->channel_count[c];
    }
    for (uint64_t i = 0; i < count; i++)
        (*chunk_at)[fill[img->channel_of[i]]++] = (uint32_t)i;
    return 0;
}

int fs_restore_channels(int image_fd, const int *out_fds, int n, const struct fs_restore_opts *opts,
                        struct fs_job *job)
{
    uint64_t t0 = fs_now_ns();
    struct fs_image img;
    struct restore *chans = NULL;
    uint64_t *offset = NULL, first[FS_CHANNELS_MAX];
    uint32_t *chunk_at = NULL, channels = 0, set_up = 0;
    int nb_fds[FS_CHANNELS_MAX];
    int data_fd = -1;
    memset(&img, 0, sizeof img);
    int rc = check_opts(opts, job);
    if (rc == 0 && out_fds && (n < 1 || n > FS_CHANNELS_MAX))
        rc = fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "%d outputs: the channels of an image are 1..%d",
                     n, FS_CHANNELS_MAX);
    if (rc == 0)
        rc = fs_image_open(image_fd, &img, job);
    if (rc == 0) {
        channels = img.meta.channels;
        if (out_fds && (uint32_t)n != channels)
            rc = fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1,
                         "the image has %u channel%s and %d output%s were given: one output per channel",
                         channels, channels == 1 ? "" : "s", n, n == 1 ? "" : "s");
    }
    if (rc == 0) {
        fs_stat_set(&job->stats.stream_total, img.meta.stream_len);
        rc = map_chunks(&img, &offset, &chunk_at, first, job);
    }
    if (rc == 0) {
        chans = calloc(channels, sizeof *chans);
        if (!chans)
            rc = fs_fail(job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory");
    }
    if (rc == 0)
        data_fd = open_data_fd(image_fd, opts->direct);
    uint32_t workers = 0;
    for (uint32_t c = 0; rc == 0 && c < channels; c++, set_up++) {
        struct restore *r = &chans[c];
        int out_fd = out_fds ? out_fds[c] : -1;
        r->img = &img;
        r->job = job;
        r->channel = c;
        r->count = img.channel_count[c];
        r->chunk_at = chunk_at ? chunk_at + first[c] : NULL;
        r->offset = offset;
        r->data_fd = data_fd >= 0 ? data_fd : image_fd;
        r->direct = data_fd >= 0;
        fs_sync_init(&r->sync, job);
        if (out_fd >= 0 && fcntl(out_fd, F_GETPIPE_SZ) > 0)
            fs_grow_pipe(out_fd);
        nb_fds[c] = out_fd >= 0 ? fs_nonblocking_writer(out_fd) : -1;
        r->out_fd = nb_fds[c] >= 0 ? nb_fds[c] : out_fd;
        rc = plan_ring(r, opts, channels);
        if (rc == 0)
            rc = alloc_ring(r);
        workers += r->nworkers;
    }
    if (rc == 0) {
        fs_stat_set32(&job->stats.threads, workers);
        fs_stat_set32(&job->stats.direct, (uint32_t)(data_fd >= 0));
        if (channels == 1) {
            run(&chans[0]);
        } else {
            /* Each channel is written by its own thread: QEMU reads its
             * channels in parallel and may wait on one before it reads
             * another, so no channel's output may wait on another's. */
            pthread_t threads[FS_CHANNELS_MAX];
            uint32_t started = 0;
            for (; started < channels; started++)
                if (pthread_create(&threads[started], NULL, run, &chans[started]) != 0)
                    break;
            if (started < channels) {
                fs_fail(job, FS_ERR_NOMEM, EAGAIN, -1, -1, "cannot start threads");
                for (uint32_t c = 0; c < started; c++)
                    fs_sync_stop(&chans[c].sync);
            }
            for (uint32_t c = 0; c < started; c++)
                pthread_join(threads[c], NULL);
        }
        for (uint32_t c = 0; c < channels && rc == 0; c++)
            rc = chans[c].rc;
        if (rc == 0 && fs_failed(job))
            rc = job->error.err ? -job->error.err : -EIO;
    }
    for (uint32_t c = 0; c < set_up; c++) {
        free_ring(&chans[c]);
        if (nb_fds[c] >= 0)
            close(nb_fds[c]);
        fs_sync_destroy(&chans[c].sync);
    }
    free(chans);
    free(offset);
    free(chunk_at);
    if (data_fd >= 0)
        close(data_fd);
    fs_image_close(&img);
    fs_stat_set(&job->stats.wall_ns, fs_now_ns() - t0);
    fs_stat_set32(&job->stats.done, 1);
    if (rc < 0 && !fs_failed(job))
        fs_fail(job, FS_ERR_IO, -rc, -1, -1, "restore failed: %s", strerror(-rc));
    return rc < 0 ? (job->error.err ? -job->error.err : -EIO) : 0;
}

int fs_restore(int image_fd, int out_fd, const struct fs_restore_opts *opts, struct fs_job *job)
{
    return out_fd < 0 ? fs_restore_channels(image_fd, NULL, 0, opts, job)
                      : fs_restore_channels(image_fd, &out_fd, 1, opts, job);
}
