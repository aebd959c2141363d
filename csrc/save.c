/* Save: streams in, image out.
 *
 * A reader per channel (the calling thread when there is one) fills buffers
 * from a fixed pool with chunks of its channel; a chunk takes its place in
 * the file when it is complete, so no channel waits on another's input.
 * Workers hash and compress chunks; one writer thread folds the chains and
 * appends to the image in that order. In auto mode the reader stores a chunk
 * uncompressed whenever the workers are backed up, so the producer never
 * waits on them.
 */
#include "fs_internal.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#define ZSTD_STATIC_LINKING_ONLY /* ZSTD_estimateCCtxSize_usingCParams */
#include <zstd.h>

#define DEFAULT_LEVEL 1
#define SINK_CAP (4u << 20)

/* FREE -> FILLING (a reader) -> QUEUED (for a worker) or READY (store as is)
 * -> BUSY (worker) -> READY -> FREE.
 * TAKEN: the writer took a queued chunk back to store it as is. */
enum { SLOT_FREE, SLOT_FILLING, SLOT_QUEUED, SLOT_BUSY, SLOT_READY, SLOT_TAKEN };

struct slot {
    uint8_t *in, *out;
    uint32_t id;                      /* index in the pool */
    uint32_t channel;
    uint32_t in_len, out_len;
    int state;
    int compressed;
    int digested;
    int owners;                       /* 2 while writer and worker both use a taken-over chunk */
    uint32_t check;                   /* of the compressed frame */
    uint64_t digest;
};

struct save {
    const struct fs_save_opts *opts;
    struct fs_job *job;
    struct fs_sync sync;
    struct slot *slots;
    uint32_t nslots, nworkers;
    uint32_t channels;
    const int *in_fds;
    size_t out_cap;
    uint32_t *free_ids;               /* slots no reader or chunk holds: a FIFO ring, so that
                                         every buffer is used in turn as in a plain ring */
    uint64_t free_head;
    uint32_t nfree;
    struct slot **order;              /* seq (file order) -> its slot, for seqs in flight */
    uint64_t *queue;                  /* seqs waiting for a worker, FIFO ring */
    uint64_t q_head, q_tail;
    uint64_t next_fill, next_write;   /* next seq to hand on / to write */
    uint32_t readers_left;            /* channels not at EOF yet */
    int zstd_format;
    struct fs_sink sink;
    struct fs_index_build index;
};

static struct slot *slot_of(struct save *s, uint64_t seq) { return s->order[seq % s->nslots]; }

/* Lock held: the slot goes back to the pool; the caller wakes cv_free. */
static void release(struct save *s, struct slot *sl)
{
    sl->state = SLOT_FREE;
    s->free_ids[(s->free_head + s->nfree++) % s->nslots] = sl->id;
}

static void *worker_main(void *arg)
{
    struct save *s = arg;
    uint64_t cpu0 = fs_thread_cpu_ns();
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    if (!cctx || ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, s->opts->level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1))) {
        fs_fail(s->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "cannot set up a zstd compressor");
        fs_sync_stop(&s->sync);
        ZSTD_freeCCtx(cctx);
        return NULL;
    }
    /* In auto mode compression only gets the CPU nothing else wants: not the
     * producer's (QEMU's migration thread), not the reader's or the writer's. */
    if (s->opts->mode == FS_MODE_AUTO) {
        struct sched_param sp = {.sched_priority = 0};
        if (pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp) != 0)
            setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19);
    }
    pthread_mutex_lock(&s->sync.mu);
    for (;;) {
        while (!s->sync.stop && s->q_head == s->q_tail && s->readers_left)
            fs_sync_wait(&s->sync, &s->sync.cv_work);
        if (s->sync.stop || s->q_head == s->q_tail)
            break;
        uint64_t seq = s->queue[s->q_head++ % s->nslots];
        struct slot *sl = slot_of(s, seq);
        if (sl->state != SLOT_QUEUED)
            continue; /* the writer took it back */
        sl->state = SLOT_BUSY;
        pthread_mutex_unlock(&s->sync.mu);

        sl->digest = fs_digest(sl->in, sl->in_len);
        sl->digested = 1;
        size_t c = ZSTD_compress2(cctx, sl->out, s->out_cap, sl->in, sl->in_len);
        if (ZSTD_isError(c)) {
            fs_fail(s->job, FS_ERR_IO, EIO, (int64_t)seq, -1, "zstd compression of chunk %llu: %s",
                    (unsigned long long)seq, ZSTD_getErrorName(c));
            pthread_mutex_lock(&s->sync.mu);
            fs_sync_stop_locked(&s->sync);
            break;
        }
        /* Keep it only if it saves at least 1/64: else the raw copy restores faster. */
        sl->compressed = c + sl->in_len / 64 < sl->in_len;
        sl->out_len = (uint32_t)c;
        if (sl->compressed)
            sl->check = (uint32_t)fs_digest(sl->out, c);

        pthread_mutex_lock(&s->sync.mu);
        pthread_cond_t *wake = NULL;
        if (sl->owners) { /* the writer stored it meanwhile: the last one out frees it */
            if (--sl->owners == 0) {
                release(s, sl);
                wake = &s->sync.cv_free;
            }
        } else {
            sl->state = SLOT_READY;
            wake = &s->sync.cv_ready;
        }
        /* Wake others with the lock released: a low-priority worker preempted
         * by the thread it woke, while holding the lock, would stall the data
         * path behind it. */
        pthread_mutex_unlock(&s->sync.mu);
        if (wake)
            pthread_cond_broadcast(wake);
        pthread_mutex_lock(&s->sync.mu);
    }
    pthread_mutex_unlock(&s->sync.mu);
    ZSTD_freeCCtx(cctx);
    fs_stat_add(&s->job->stats.worker_cpu_ns, fs_thread_cpu_ns() - cpu0);
    return NULL;
}

static int append_stored_frame(struct save *s, const uint8_t *p, size_t n)
{
    uint8_t hdr[9];
    int r = fs_sink_append(&s->sink, hdr, fs_raw_frame_header(hdr, n));
    while (r == 0 && n) {
        size_t k = n < FS_RAW_BLOCK_MAX ? n : FS_RAW_BLOCK_MAX;
        uint8_t bh[3];
        fs_raw_block_header(bh, k, k == n);
        r = fs_sink_append(&s->sink, bh, 3);
        if (r == 0)
            r = fs_sink_append(&s->sink, p, k);
        p += k;
        n -= k;
    }
    return r;
}

/* `as_is`: store the input uncompressed whatever a worker did or does with it
 * (the worker only reads `in`, so both may use it at once). */
static int write_chunk(struct save *s, struct slot *sl, int as_is)
{
    uint64_t digest = !as_is && sl->digested ? sl->digest : fs_digest(sl->in, sl->in_len);
    uint32_t stored, flags = 0, check = 0;
    int r;
    if (!s->zstd_format) {
        stored = sl->in_len;
        r = fs_sink_append(&s->sink, sl->in, sl->in_len);
    } else if (!as_is && sl->compressed) {
        stored = sl->out_len;
        flags = FS_ENTRY_COMPRESSED;
        check = sl->check;
        r = fs_sink_append(&s->sink, sl->out, sl->out_len);
    } else {
        stored = (uint32_t)fs_raw_frame_size(sl->in_len);
        r = append_stored_frame(s, sl->in, sl->in_len);
    }
    if (r < 0)
        return r;
    r = fs_index_add(&s->index, sl->channel, sl->in_len, stored, flags, check, digest);
    if (r < 0)
        return fs_index_fail(&s->index, r, s->opts->chunk_size, s->job);
    fs_stat_add(&s->job->stats.chunks, 1);
    fs_stat_add(flags ? &s->job->stats.chunks_compressed : &s->job->stats.chunks_stored, 1);
    return 0;
}

static void *writer_main(void *arg)
{
    struct save *s = arg;
    uint64_t cpu0 = fs_thread_cpu_ns();
    pthread_mutex_lock(&s->sync.mu);
    for (;;) {
        struct slot *sl = NULL;
        int take = 0;
        while (!s->sync.stop) {
            if (s->next_write < s->next_fill) {
                struct slot *next = slot_of(s, s->next_write);
                /* Auto mode never lets compression hold up the producer: once
                 * no buffer is free, the writer stores this chunk as is. */
                take = s->opts->mode == FS_MODE_AUTO && s->nfree == 0 &&
                       (next->state == SLOT_QUEUED || next->state == SLOT_BUSY);
                if (next->state == SLOT_READY || take) {
                    sl = next;
                    break;
                }
            } else if (s->readers_left == 0) {
                break; /* every channel at EOF and every chunk written */
            }
            fs_sync_wait(&s->sync, &s->sync.cv_ready);
        }
        if (s->sync.stop || !sl)
            break;
        int busy = take && sl->state == SLOT_BUSY;
        if (take && !busy)
            sl->state = SLOT_TAKEN;
        if (busy)
            sl->owners = 2; /* writer and worker both read `in` now */
        pthread_mutex_unlock(&s->sync.mu);
        int r = write_chunk(s, sl, take);
        pthread_mutex_lock(&s->sync.mu);
        if (r < 0) {
            fs_sync_stop_locked(&s->sync);
            break;
        }
        if (!busy || --sl->owners == 0)
            release(s, sl);
        s->next_write++;
        pthread_cond_broadcast(&s->sync.cv_free);
    }
    pthread_mutex_unlock(&s->sync.mu);
    fs_stat_add(&s->job->stats.writer_cpu_ns, fs_thread_cpu_ns() - cpu0);
    return NULL;
}

struct reader {
    struct save *s;
    uint32_t channel;
};

/* A channel's reader: fill a free buffer with the next chunk of its channel;
 * only a complete chunk (or the last, at EOF) gets the next place in the
 * file, and goes to a worker or straight to the writer. */
static void *read_loop(void *arg)
{
    struct reader *self = arg;
    struct save *s = self->s;
    int in_fd = s->in_fds[self->channel];
    uint64_t cpu0 = fs_thread_cpu_ns();
    for (;;) {
        pthread_mutex_lock(&s->sync.mu);
        uint64_t t0 = fs_now_ns();
        if (s->nfree == 0)
            pthread_cond_broadcast(&s->sync.cv_ready); /* the writer may take over (auto) */
        while (!s->sync.stop && s->nfree == 0)
            fs_sync_wait(&s->sync, &s->sync.cv_free);
        fs_stat_add(&s->job->stats.producer_blocked_ns, fs_now_ns() - t0);
        int stop = s->sync.stop;
        struct slot *sl = NULL;
        if (!stop) {
            sl = &s->slots[s->free_ids[s->free_head++ % s->nslots]];
            s->nfree--;
            sl->state = SLOT_FILLING;
        }
        pthread_mutex_unlock(&s->sync.mu);
        if (stop)
            break;

        uint64_t input_wait = 0;
        ssize_t k = fs_read_full(in_fd, sl->in, s->opts->chunk_size, s->job, &input_wait,
                                 &s->job->stats.bytes_in);
        fs_stat_add(&s->job->stats.input_wait_ns, input_wait);
        if (k < 0) {
            if (k != -ECANCELED) {
                if (s->channels == 1)
                    fs_fail(s->job, FS_ERR_IO, (int)-k, (int64_t)s->next_fill, -1,
                            "reading the stream: %s", strerror((int)-k));
                else
                    fs_fail(s->job, FS_ERR_IO, (int)-k, -1, -1, "reading channel %u: %s",
                            self->channel, strerror((int)-k));
            }
            fs_sync_stop(&s->sync);
            break;
        }
        pthread_mutex_lock(&s->sync.mu);
        if (k == 0) {
            release(s, sl);
            pthread_cond_broadcast(&s->sync.cv_free);
            pthread_mutex_unlock(&s->sync.mu);
            break;
        }
        sl->in_len = (uint32_t)k;
        sl->channel = self->channel;
        sl->compressed = 0;
        sl->digested = 0;
        uint64_t seq = s->next_fill++;
        s->order[seq % s->nslots] = sl;
        int compress = s->opts->mode == FS_MODE_ZSTD ||
                       (s->opts->mode == FS_MODE_AUTO && s->q_tail - s->q_head < s->nworkers);
        if (compress) {
            sl->state = SLOT_QUEUED;
            s->queue[s->q_tail++ % s->nslots] = seq;
            pthread_cond_signal(&s->sync.cv_work);
        } else {
            sl->state = SLOT_READY;
            pthread_cond_broadcast(&s->sync.cv_ready);
        }
        pthread_mutex_unlock(&s->sync.mu);
    }
    pthread_mutex_lock(&s->sync.mu);
    if (--s->readers_left == 0) {
        pthread_cond_broadcast(&s->sync.cv_work);
        pthread_cond_broadcast(&s->sync.cv_ready);
    }
    pthread_mutex_unlock(&s->sync.mu);
    fs_stat_add(&s->job->stats.reader_cpu_ns, fs_thread_cpu_ns() - cpu0);
    return NULL;
}

static int check_opts(const struct fs_save_opts *opts, struct fs_job *job)
{
    if (opts->mode < FS_MODE_RAW || opts->mode > FS_MODE_AUTO)
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "unknown mode %d", opts->mode);
    if (opts->chunk_size < FS_CHUNK_MIN || opts->chunk_size > FS_CHUNK_MAX || opts->chunk_size % FS_ALIGN)
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1,
                       "chunk_size %u out of range: a multiple of %u from %u to %u",
                       opts->chunk_size, FS_ALIGN, FS_CHUNK_MIN, FS_CHUNK_MAX);
    if (opts->threads < 1 || opts->threads > FS_THREADS_MAX)
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "threads %d out of range 1..%d",
                       opts->threads, FS_THREADS_MAX);
    if (opts->slots > FS_SLOTS_MAX)
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "slots %u is more than the limit of %d",
                       opts->slots, FS_SLOTS_MAX);
    if (opts->level < ZSTD_minCLevel() || opts->level > ZSTD_maxCLevel())
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "zstd level %d out of range %d..%d",
                       opts->level, ZSTD_minCLevel(), ZSTD_maxCLevel());
    if (opts->xml_len > FS_XML_MAX)
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1,
                       "domain XML of %llu bytes is more than the limit of %d",
                       (unsigned long long)opts->xml_len, FS_XML_MAX);
    if (opts->xml_len && (!opts->xml || memchr(opts->xml, 0, opts->xml_len)))
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "domain XML must not contain NUL bytes");
    if (opts->name_len > FS_NAME_MAX - 1 || (opts->name_len && !opts->name))
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1,
                       "domain name of %llu bytes is more than the limit of %d",
                       (unsigned long long)opts->name_len, FS_NAME_MAX - 1);
    if (opts->version && strlen(opts->version) > FS_VERSION_MAX - 1)
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1,
                       "version string of %zu bytes is more than the limit of %d",
                       strlen(opts->version), FS_VERSION_MAX - 1);
    return 0;
}

#define MIB(v) ((unsigned long long)(((v) + (1u << 20) - 1) >> 20))

/* Workers and ring depth within FS_BUFFERS_MAX: each slot holds a chunk and,
 * when chunks are compressed, its compressed copy; each worker has a zstd
 * context sized by level and chunk size. Without a slots option the default
 * depth is shortened, and failing that the workers are fewer, so that a host
 * with many CPUs saves with large chunks all the same. */
static int plan_ring(struct save *s)
{
    const struct fs_save_opts *opts = s->opts;
    uint64_t workers = opts->mode == FS_MODE_RAW ? 0 : (uint64_t)opts->threads;
    uint64_t out_cap = workers ? ZSTD_compressBound(opts->chunk_size) : 0;
    uint64_t per_slot = opts->chunk_size + fs_align_up(out_cap, FS_ALIGN);
    uint64_t per_worker = 0;
    uint64_t n = s->channels;
    if (n > 1) {
        /* a reader never writes an image it could not restore within the limit */
        uint64_t restore = n * FS_RESTORE_MIN_SLOTS * fs_restore_slot_size(opts->chunk_size, s->zstd_format);
        if (restore > FS_BUFFERS_MAX)
            return fs_fail(s->job, FS_ERR_ARG, EINVAL, -1, -1,
                           "%llu channels with chunk_size %u need %llu MiB of buffers to restore, "
                           "more than the limit of %llu MiB; use fewer channels or smaller chunks",
                           (unsigned long long)n, opts->chunk_size, MIB(restore), MIB(FS_BUFFERS_MAX));
    }
    if (workers)
        per_worker = ZSTD_estimateCCtxSize_usingCParams(ZSTD_getCParams(opts->level, opts->chunk_size, 0));
    /* the least ring: a buffer per worker, one per channel's reader, one for the writer */
    while (workers > 1 && (workers + 1 + n) * per_slot + workers * per_worker > FS_BUFFERS_MAX)
        workers--;
    uint64_t least = (workers + 1 + n) * per_slot + workers * per_worker;
    if (least > FS_BUFFERS_MAX)
        return n == 1
            ? fs_fail(s->job, FS_ERR_ARG, EINVAL, -1, -1,
                      "zstd level %d with chunk_size %u needs %llu MiB of buffers and compressor "
                      "state, more than the limit of %llu MiB",
                      opts->level, opts->chunk_size, MIB(least), MIB(FS_BUFFERS_MAX))
            : fs_fail(s->job, FS_ERR_ARG, EINVAL, -1, -1,
                      "%llu channels with zstd level %d and chunk_size %u need %llu MiB of buffers "
                      "and compressor state, more than the limit of %llu MiB",
                      (unsigned long long)n, opts->level, opts->chunk_size, MIB(least),
                      MIB(FS_BUFFERS_MAX));
    uint64_t room = (FS_BUFFERS_MAX - workers * per_worker) / per_slot;
    uint64_t nslots;
    if (opts->slots) {
        nslots = opts->slots;
        if (nslots > room)
            return fs_fail(s->job, FS_ERR_ARG, EINVAL, -1, -1,
                           "slots %u of %llu bytes each (chunk_size %u) need %llu MiB, more than "
                           "the limit of %llu MiB",
                           opts->slots, (unsigned long long)per_slot, opts->chunk_size,
                           MIB(nslots * per_slot + workers * per_worker), MIB(FS_BUFFERS_MAX));
    } else {
        /* Auto mode gets a deeper ring: the writer stores a chunk as is only when
         * the ring is nearly full, so depth is how long idle-priority workers may
         * lag behind the producer before a chunk goes uncompressed. */
        uint64_t deep = 8 * workers + 8 < 32 ? 8 * workers + 8 : 32;
        nslots = 3 * workers + 4;
        if (opts->mode == FS_MODE_AUTO && nslots < deep)
            nslots = deep;
        nslots += 2 * (n - 1); /* each further channel: the chunk it fills and one more */
        if (nslots > room)
            nslots = room;
    }
    if (nslots < workers + 1 + n)
        nslots = workers + 1 + n;
    s->nworkers = (uint32_t)workers;
    s->nslots = (uint32_t)nslots;
    s->out_cap = (size_t)out_cap;
    return 0;
}

static int write_prefix(struct save *s, uint64_t *payload_offset, uint64_t *prefix_hash)
{
    const struct fs_save_opts *opts = s->opts;
    uint64_t off = fs_payload_offset(opts->xml_len);
    uint8_t *buf = calloc(1, off);
    if (!buf)
        return fs_fail(s->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory for the header");
    fs_encode_prefix(buf, off, s->zstd_format ? FS_LV_FORMAT_ZSTD : FS_LV_FORMAT_RAW,
                     opts->was_running, opts->xml, opts->xml_len);
    *prefix_hash = fs_digest(buf, off);
    *payload_offset = off;
    int r = fs_sink_append(&s->sink, buf, off);
    free(buf);
    if (r == 0 && s->channels > 1) {
        uint8_t guard[FS_GUARD_SIZE];
        fs_encode_guard(guard, s->zstd_format ? FS_CODEC_ZSTD : FS_CODEC_RAW);
        r = fs_sink_append(&s->sink, guard, sizeof guard);
    }
    return r < 0 ? r : fs_sink_flush(&s->sink);
}

static int write_tail(struct save *s, uint64_t payload_offset, uint64_t prefix_hash)
{
    const struct fs_save_opts *opts = s->opts;
    struct fs_meta m = {
        .codec = s->zstd_format ? FS_CODEC_ZSTD : FS_CODEC_RAW,
        .chunk_size = opts->chunk_size,
        .was_running = opts->was_running ? 1 : 0,
        .auto_mode = opts->mode == FS_MODE_AUTO,
        .level = s->zstd_format ? opts->level : 0,
        .stream_len = s->index.stream_len,
        .created_ns = opts->created_ns,
        .name_len = (uint32_t)opts->name_len,
        .version_len = opts->version ? (uint32_t)strlen(opts->version) : 0,
        .name = opts->name,
        .version = opts->version,
        .channels = s->channels,
    };
    memcpy(m.uuid, opts->uuid, 16);
    memcpy(m.channel_len, s->index.channel_len, sizeof m.channel_len);
    memcpy(m.channel_chain, s->index.channel_chain, sizeof m.channel_chain);
    struct fs_trailer t = {.payload_offset = payload_offset, .prefix_hash = prefix_hash,
                           .channels = s->channels,
                           .final_chain = s->channels > 1 ? s->index.image_chain : s->index.chain};
    t.meta_offset = fs_sink_pos(&s->sink);
    size_t meta_size = fs_meta_size(&m);
    uint8_t meta_buf[FS_META_MAX];
    fs_encode_meta(meta_buf, &m);
    int r = fs_sink_append(&s->sink, meta_buf, meta_size);
    if (r < 0)
        return r;

    t.index_offset = fs_sink_pos(&s->sink);
    uint8_t head[FS_INDEX_HEAD_SIZE], rec[FS_INDEX_ENTRY2_SIZE], sum[8];
    uint32_t major = s->index.major;
    struct fs_hash *hash = fs_hash_new();
    if (!hash)
        return fs_fail(s->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory");
    fs_encode_index_head(head, s->index.count, major);
    fs_hash_update(hash, head + 8, sizeof head - 8);
    r = fs_sink_append(&s->sink, head, sizeof head);
    for (uint64_t i = 0; r == 0 && i < s->index.count; i++) {
        size_t n = fs_encode_entry(rec, &s->index.e[i], major,
                                   s->index.channel_of ? s->index.channel_of[i] : 0);
        fs_hash_update(hash, rec, n);
        r = fs_sink_append(&s->sink, rec, n);
    }
    fs_put64(sum, fs_hash_digest(hash));
    fs_hash_free(hash);
    if (r == 0)
        r = fs_sink_append(&s->sink, sum, 8);
    if (r < 0)
        return r;

    t.trailer_offset = fs_sink_pos(&s->sink);
    uint8_t trailer_buf[FS_TRAILER_SIZE];
    fs_encode_trailer(trailer_buf, &t);
    r = fs_sink_append(&s->sink, trailer_buf, sizeof trailer_buf);
    return r < 0 ? r : fs_sink_finish(&s->sink);
}

/* Returns 0 or -errno; the ring was sized by plan_ring. */
static int run_pipeline(struct save *s)
{
    const struct fs_save_opts *opts = s->opts;
    s->slots = calloc(s->nslots, sizeof *s->slots);
    s->queue = calloc(s->nslots, sizeof *s->queue);
    s->order = calloc(s->nslots, sizeof *s->order);
    s->free_ids = calloc(s->nslots, sizeof *s->free_ids);
    if (!s->slots || !s->queue || !s->order || !s->free_ids)
        return fs_fail(s->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory for buffers");
    for (uint32_t i = 0; i < s->nslots; i++)
        s->free_ids[i] = i;
    s->nfree = s->nslots;
    s->readers_left = s->channels;
    for (uint32_t i = 0; i < s->nslots; i++) {
        s->slots[i].id = i;
        s->slots[i].in = fs_aligned_alloc(opts->chunk_size);
        s->slots[i].out = s->out_cap ? fs_aligned_alloc(s->out_cap) : NULL;
        if (!s->slots[i].in || (s->out_cap && !s->slots[i].out))
            return fs_fail(s->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory for buffers");
    }
    fs_stat_set32(&s->job->stats.threads, s->nworkers);

    pthread_t writer, workers[FS_THREADS_MAX];
    uint32_t started = 0;
    int writer_started = pthread_create(&writer, NULL, writer_main, s) == 0;
    for (uint32_t i = 0; writer_started && i < s->nworkers; i++, started++)
        if (pthread_create(&workers[i], NULL, worker_main, s) != 0)
            break;
    struct reader readers[FS_CHANNELS_MAX];
    pthread_t reader_threads[FS_CHANNELS_MAX];
    uint32_t readers_started = 0;
    if (!writer_started || started < s->nworkers) {
        fs_fail(s->job, FS_ERR_NOMEM, EAGAIN, -1, -1, "cannot start threads");
        fs_sync_stop(&s->sync);
    } else if (s->channels == 1) {
        readers[0] = (struct reader){.s = s, .channel = 0};
        read_loop(&readers[0]);
    } else {
        /* a thread per channel: each channel is read as fast as it comes,
         * whatever the others do (QEMU blocks one channel while it waits for
         * another to drain) */
        for (; readers_started < s->channels; readers_started++) {
            readers[readers_started] = (struct reader){.s = s, .channel = readers_started};
            if (pthread_create(&reader_threads[readers_started], NULL, read_loop,
                               &readers[readers_started]) != 0)
                break;
        }
        if (readers_started < s->channels) {
            fs_fail(s->job, FS_ERR_NOMEM, EAGAIN, -1, -1, "cannot start threads");
            fs_sync_stop(&s->sync);
        }
    }
    for (uint32_t i = 0; i < readers_started; i++)
        pthread_join(reader_threads[i], NULL);
    for (uint32_t i = 0; i < started; i++)
        pthread_join(workers[i], NULL);
    if (writer_started)
        pthread_join(writer, NULL);
    if (!fs_failed(s->job))
        return 0;
    return s->job->error.err ? -s->job->error.err : -EIO;
}

static void free_pipeline(struct save *s)
{
    for (uint32_t i = 0; s->slots && i < s->nslots; i++) {
        free(s->slots[i].in);
        free(s->slots[i].out);
    }
    free(s->slots);
    free(s->queue);
    free(s->order);
    free(s->free_ids);
}

static int is_pipe(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode);
}

int fs_save_channels(const int *in_fds, int n, int dir_fd, const char *name,
                     const struct fs_save_opts *opts, struct fs_job *job)
{
    uint64_t t0 = fs_now_ns();
    struct save s;
    memset(&s, 0, sizeof s);
    s.opts = opts;
    s.job = job;
    s.zstd_format = opts->mode != FS_MODE_RAW;
    s.in_fds = in_fds;
    s.channels = n >= 1 && n <= FS_CHANNELS_MAX ? (uint32_t)n : 1;
    fs_index_init(&s.index, s.channels);
    fs_sync_init(&s.sync, job);

    char tmp[512];
    int fd = -1, r = 0;
    if (n < 1 || n > FS_CHANNELS_MAX || !in_fds)
        r = fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "channels %d out of range 1..%d", n, FS_CHANNELS_MAX);
    if (r == 0)
        r = check_opts(opts, job);
    if (r == 0)
        r = plan_ring(&s);
    if (r == 0)
        r = fs_check_name(name, job);
    if (r == 0) {
        int direct = opts->direct != 0;
        fd = fs_tmp_create(dir_fd, name, &direct, tmp, sizeof tmp, job);
        r = fd < 0 ? fd : 0;
        fs_stat_set32(&job->stats.direct, (uint32_t)direct);
        if (r == 0)
            r = fs_sink_init(&s.sink, fd, direct, SINK_CAP, job);
    }
    uint64_t payload_offset = 0, prefix_hash = 0;
    if (r == 0)
        r = write_prefix(&s, &payload_offset, &prefix_hash);
    for (uint32_t c = 0; r == 0 && c < s.channels; c++)
        if (is_pipe(in_fds[c]))
            fs_grow_pipe(in_fds[c]);
    if (r == 0) {
        int spliced = 0;
        if (opts->mode == FS_MODE_RAW && opts->allow_splice && !s.sink.direct && s.channels == 1)
            r = fs_save_raw_splice(in_fds[0], &s.sink, opts->chunk_size, &s.index, &spliced, job);
        if (!spliced)
            r = run_pipeline(&s);
        fs_stat_set32(&job->stats.spliced, (uint32_t)spliced);
    }
    if (r == 0)
        r = write_tail(&s, payload_offset, prefix_hash);
    if (r == 0)
        r = fs_tmp_commit(dir_fd, fd, tmp, name, job);
    if (r == 0)
        close(fd);
    else if (fd >= 0)
        fs_tmp_discard(dir_fd, fd, tmp);

    free_pipeline(&s);
    fs_sink_free(&s.sink);
    fs_index_free(&s.index);
    fs_sync_destroy(&s.sync);
    fs_stat_set(&job->stats.wall_ns, fs_now_ns() - t0);
    fs_stat_set32(&job->stats.done, 1);
    if (r < 0 && !fs_failed(job))
        fs_fail(job, FS_ERR_IO, -r, -1, -1, "save failed: %s", strerror(-r));
    return r < 0 ? (job->error.err ? -job->error.err : -EIO) : 0;
}

int fs_save(int in_fd, int dir_fd, const char *name, const struct fs_save_opts *opts,
            struct fs_job *job)
{
    return fs_save_channels(&in_fd, 1, dir_fd, name, opts, job);
}

int fs_default_level(void) { return DEFAULT_LEVEL; }
unsigned fs_zstd_version(void) { return ZSTD_versionNumber(); }
