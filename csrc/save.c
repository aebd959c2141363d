/* Save: stream in, image out.
 *
 * The calling thread reads chunks into a fixed ring of buffers; workers
 * hash and compress them; one writer thread folds the chain and appends to
 * the image in order. In auto mode the reader stores a chunk uncompressed
 * whenever the workers are backed up, so the producer never waits on them.
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
#include <zstd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define DEFAULT_LEVEL 1
#define SINK_CAP (4u << 20)

/* FREE -> QUEUED (for a worker) or READY (store as is) -> BUSY (worker) -> READY -> FREE.
 * TAKEN: the writer took a queued chunk back to store it as is. */
enum { SLOT_FREE, SLOT_QUEUED, SLOT_BUSY, SLOT_READY, SLOT_TAKEN };

struct slot {
    uint8_t *in, *out;
    uint32_t in_len, out_len;
    int state;
    int compressed;
    int digested;
    int owners;                       /* 2 while writer and worker both use a taken-over chunk */
    uint32_t check;                   /* of the compressed frame */
    uint64_t digest;
};

struct save {
    const struct fs_save_opts *o;
    struct fs_job *job;
    struct fs_sync y;
    struct slot *slots;
    uint32_t nslots, nworkers;
    size_t out_cap;
    uint64_t *queue;                  /* seqs waiting for a worker, FIFO ring */
    uint64_t q_head, q_tail;
    uint64_t next_fill, next_write, end_seq;
    int eof;
    int zstd_format;
    struct fs_sink sink;
    struct fs_index_build ix;
};

static struct slot *slot_of(struct save *s, uint64_t seq) { return &s->slots[seq % s->nslots]; }

static void *worker_main(void *arg)
{
    struct save *s = arg;
    uint64_t cpu0 = fs_thread_cpu_ns();
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    if (!cctx || ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, s->o->level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1))) {
        fs_fail(s->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "cannot set up a zstd compressor");
        fs_sync_stop(&s->y);
        ZSTD_freeCCtx(cctx);
        return NULL;
    }
    /* In auto mode compression only gets the CPU nothing else wants: not the
     * producer's (QEMU's migration thread), not the reader's or the writer's. */
    if (s->o->mode == FS_MODE_AUTO) {
        struct sched_param sp = {.sched_priority = 0};
        if (pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp) != 0)
            setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19);
    }
    pthread_mutex_lock(&s->y.mu);
    for (;;) {
        while (!s->y.stop && s->q_head == s->q_tail && !s->eof)
            fs_sync_wait(&s->y, &s->y.cv_work);
        if (s->y.stop || s->q_head == s->q_tail)
            break;
        uint64_t seq = s->queue[s->q_head++ % s->nslots];
        struct slot *sl = slot_of(s, seq);
        if (sl->state != SLOT_QUEUED)
            continue; /* the writer took it back */
        sl->state = SLOT_BUSY;
        pthread_mutex_unlock(&s->y.mu);

        sl->digest = fs_digest(sl->in, sl->in_len);
        sl->digested = 1;
        size_t c = ZSTD_compress2(cctx, sl->out, s->out_cap, sl->in, sl->in_len);
        if (ZSTD_isError(c)) {
            fs_fail(s->job, FS_ERR_IO, EIO, (int64_t)seq, -1, "zstd compression of chunk %llu: %s",
                    (unsigned long long)seq, ZSTD_getErrorName(c));
            pthread_mutex_lock(&s->y.mu);
            fs_sync_stop_locked(&s->y);
            break;
        }
        /* Keep it only if it saves at least 1/64: else the raw copy restores faster. */
        sl->compressed = c + sl->in_len / 64 < sl->in_len;
        sl->out_len = (uint32_t)c;
        if (sl->compressed)
            sl->check = (uint32_t)fs_digest(sl->out, c);

        pthread_mutex_lock(&s->y.mu);
        pthread_cond_t *wake = NULL;
        if (sl->owners) { /* the writer stored it meanwhile: the last one out frees it */
            if (--sl->owners == 0) {
                sl->state = SLOT_FREE;
                wake = &s->y.cv_free;
            }
        } else {
            sl->state = SLOT_READY;
            wake = &s->y.cv_ready;
        }
        /* Wake others with the lock released: a low-priority worker preempted
         * by the thread it woke, while holding the lock, would stall the data
         * path behind it. */
        pthread_mutex_unlock(&s->y.mu);
        if (wake)
            pthread_cond_broadcast(wake);
        pthread_mutex_lock(&s->y.mu);
    }
    pthread_mutex_unlock(&s->y.mu);
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
static int write_chunk(struct save *s, uint64_t seq, struct slot *sl, int as_is)
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
    if (fs_index_add(&s->ix, sl->in_len, stored, flags, check, digest) < 0)
        return fs_fail(s->job, FS_ERR_NOMEM, ENOMEM, (int64_t)seq, -1, "out of memory for the index");
    fs_stat_add(&s->job->stats.chunks, 1);
    fs_stat_add(flags ? &s->job->stats.chunks_compressed : &s->job->stats.chunks_stored, 1);
    return 0;
}

static void *writer_main(void *arg)
{
    struct save *s = arg;
    uint64_t cpu0 = fs_thread_cpu_ns();
    pthread_mutex_lock(&s->y.mu);
    for (;;) {
        struct slot *sl = slot_of(s, s->next_write);
        int take = 0;
        while (!s->y.stop && sl->state != SLOT_READY && !(s->eof && s->next_write == s->end_seq)) {
            /* Auto mode never lets compression hold up the producer: once the
             * ring is (nearly) full, the writer stores this chunk as is. */
            take = s->o->mode == FS_MODE_AUTO && s->next_fill - s->next_write + 1 >= s->nslots &&
                   (sl->state == SLOT_QUEUED || sl->state == SLOT_BUSY);
            if (take)
                break;
            fs_sync_wait(&s->y, &s->y.cv_ready);
        }
        if (s->y.stop || (s->eof && s->next_write == s->end_seq && !take))
            break;
        int busy = take && sl->state == SLOT_BUSY;
        if (take && !busy)
            sl->state = SLOT_TAKEN;
        if (busy)
            sl->owners = 2; /* writer and worker both read `in` now */
        uint64_t seq = s->next_write;
        pthread_mutex_unlock(&s->y.mu);
        int r = write_chunk(s, seq, sl, take);
        pthread_mutex_lock(&s->y.mu);
        if (r < 0) {
            fs_sync_stop_locked(&s->y);
            break;
        }
        if (!busy || --sl->owners == 0)
            sl->state = SLOT_FREE;
        s->next_write++;
        pthread_cond_broadcast(&s->y.cv_free);
    }
    pthread_mutex_unlock(&s->y.mu);
    fs_stat_add(&s->job->stats.writer_cpu_ns, fs_thread_cpu_ns() - cpu0);
    return NULL;
}

/* The calling thread: read chunks, route each to a worker or straight to the writer. */
static void read_loop(struct save *s, int in_fd)
{
    uint64_t cpu0 = fs_thread_cpu_ns();
    uint64_t input_wait = 0;
    for (;;) {
        pthread_mutex_lock(&s->y.mu);
        struct slot *sl = slot_of(s, s->next_fill);
        uint64_t t0 = fs_now_ns();
        if (sl->state != SLOT_FREE)
            pthread_cond_broadcast(&s->y.cv_ready); /* the writer may take over (auto) */
        while (!s->y.stop && sl->state != SLOT_FREE)
            fs_sync_wait(&s->y, &s->y.cv_free);
        fs_stat_add(&s->job->stats.producer_blocked_ns, fs_now_ns() - t0);
        int stop = s->y.stop;
        pthread_mutex_unlock(&s->y.mu);
        if (stop)
            break;

        ssize_t k = fs_read_full(in_fd, sl->in, s->o->chunk_size, s->job, &input_wait,
                                 &s->job->stats.bytes_in);
        fs_stat_set(&s->job->stats.input_wait_ns, input_wait);
        if (k < 0) {
            if (k != -ECANCELED)
                fs_fail(s->job, FS_ERR_IO, (int)-k, (int64_t)s->next_fill, -1,
                        "reading the stream: %s", strerror((int)-k));
            fs_sync_stop(&s->y);
            break;
        }
        pthread_mutex_lock(&s->y.mu);
        if (k == 0) {
            s->eof = 1;
            s->end_seq = s->next_fill;
            pthread_cond_broadcast(&s->y.cv_work);
            pthread_cond_broadcast(&s->y.cv_ready);
            pthread_mutex_unlock(&s->y.mu);
            break;
        }
        sl->in_len = (uint32_t)k;
        sl->compressed = 0;
        sl->digested = 0;
        int compress = s->o->mode == FS_MODE_ZSTD ||
                       (s->o->mode == FS_MODE_AUTO && s->q_tail - s->q_head < s->nworkers);
        if (compress) {
            sl->state = SLOT_QUEUED;
            s->queue[s->q_tail++ % s->nslots] = s->next_fill;
            pthread_cond_signal(&s->y.cv_work);
        } else {
            sl->state = SLOT_READY;
            pthread_cond_broadcast(&s->y.cv_ready);
        }
        s->next_fill++;
        pthread_mutex_unlock(&s->y.mu);
    }
    fs_stat_add(&s->job->stats.reader_cpu_ns, fs_thread_cpu_ns() - cpu0);
}

static int check_opts(const struct fs_save_opts *o, struct fs_job *job)
{
    if (o->mode < FS_MODE_RAW || o->mode > FS_MODE_AUTO)
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "unknown mode %d", o->mode);
    if (o->chunk_size < FS_CHUNK_MIN || o->chunk_size > FS_CHUNK_MAX || o->chunk_size % FS_ALIGN)
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1,
                       "chunk size must be a multiple of 4096 from 64 KiB to 64 MiB");
    if (o->threads < 1 || o->threads > 256)
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "threads must be 1..256");
    if (o->level < ZSTD_minCLevel() || o->level > ZSTD_maxCLevel())
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "zstd level must be %d..%d",
                       ZSTD_minCLevel(), ZSTD_maxCLevel());
    if (o->xml_len && (!o->xml || memchr(o->xml, 0, o->xml_len)))
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "domain XML must not contain NUL bytes");
    if (o->xml_len > (64u << 20))
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "domain XML larger than 64 MiB");
    if (o->name_len > FS_NAME_MAX - 1 || (o->name_len && !o->name))
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "domain name longer than %d bytes",
                       FS_NAME_MAX - 1);
    if (o->version && strlen(o->version) > FS_VERSION_MAX - 1)
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "version string too long");
    return 0;
}

static int write_prefix(struct save *s, uint64_t *payload_offset, uint64_t *prefix_hash)
{
    const struct fs_save_opts *o = s->o;
    uint64_t off = fs_payload_offset(o->xml_len);
    uint8_t *buf = calloc(1, off);
    if (!buf)
        return fs_fail(s->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory for the header");
    fs_encode_prefix(buf, off, s->zstd_format ? FS_LV_FORMAT_ZSTD : FS_LV_FORMAT_RAW,
                     o->was_running, o->xml, o->xml_len);
    *prefix_hash = XXH3_64bits(buf, off);
    *payload_offset = off;
    int r = fs_sink_append(&s->sink, buf, off);
    free(buf);
    return r < 0 ? r : fs_sink_flush(&s->sink);
}

static int write_tail(struct save *s, uint64_t payload_offset, uint64_t prefix_hash)
{
    const struct fs_save_opts *o = s->o;
    struct fs_meta m = {
        .codec = s->zstd_format ? FS_CODEC_ZSTD : FS_CODEC_RAW,
        .chunk_size = o->chunk_size,
        .was_running = o->was_running ? 1 : 0,
        .auto_mode = o->mode == FS_MODE_AUTO,
        .level = s->zstd_format ? o->level : 0,
        .stream_len = s->ix.stream_len,
        .created_ns = o->created_ns,
        .name_len = (uint32_t)o->name_len,
        .version_len = o->version ? (uint32_t)strlen(o->version) : 0,
        .name = o->name,
        .version = o->version,
    };
    memcpy(m.uuid, o->uuid, 16);
    struct fs_trailer t = {.payload_offset = payload_offset, .prefix_hash = prefix_hash,
                           .final_chain = s->ix.chain};
    t.meta_offset = fs_sink_pos(&s->sink);
    size_t msize = fs_meta_size(&m);
    uint8_t mbuf[8 + 72 + FS_NAME_MAX + FS_VERSION_MAX + 16];
    fs_encode_meta(mbuf, &m);
    int r = fs_sink_append(&s->sink, mbuf, msize);
    if (r < 0)
        return r;

    t.index_offset = fs_sink_pos(&s->sink);
    uint8_t head[24], rec[FS_INDEX_ENTRY_SIZE], h[8];
    XXH3_state_t *st = XXH3_createState();
    if (!st)
        return fs_fail(s->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory");
    XXH3_64bits_reset(st);
    fs_encode_index_head(head, s->ix.count);
    XXH3_64bits_update(st, head + 8, 16);
    r = fs_sink_append(&s->sink, head, sizeof head);
    for (uint64_t i = 0; r == 0 && i < s->ix.count; i++) {
        fs_encode_entry(rec, &s->ix.e[i]);
        XXH3_64bits_update(st, rec, sizeof rec);
        r = fs_sink_append(&s->sink, rec, sizeof rec);
    }
    fs_put64(h, XXH3_64bits_digest(st));
    XXH3_freeState(st);
    if (r == 0)
        r = fs_sink_append(&s->sink, h, 8);
    if (r < 0)
        return r;

    t.trailer_offset = fs_sink_pos(&s->sink);
    uint8_t tbuf[FS_TRAILER_SIZE];
    fs_encode_trailer(tbuf, &t);
    r = fs_sink_append(&s->sink, tbuf, sizeof tbuf);
    return r < 0 ? r : fs_sink_finish(&s->sink);
}

static int run_pipeline(struct save *s, int in_fd)
{
    const struct fs_save_opts *o = s->o;
    s->nworkers = o->mode == FS_MODE_RAW ? 0 : (uint32_t)o->threads;
    /* Auto mode gets a deeper ring: the writer stores a chunk as is only when
     * the ring is nearly full, so depth is how long idle-priority workers may
     * lag behind the producer before a chunk goes uncompressed. */
    uint32_t deep = 8 * s->nworkers + 8 < 32 ? 8 * s->nworkers + 8 : 32;
    s->nslots = 3 * s->nworkers + 4;
    if (o->mode == FS_MODE_AUTO && s->nslots < deep)
        s->nslots = deep;
    if (o->slots)
        s->nslots = o->slots;
    if (s->nslots < s->nworkers + 2)
        s->nslots = s->nworkers + 2;
    s->out_cap = s->nworkers ? ZSTD_compressBound(o->chunk_size) : 0;
    s->slots = calloc(s->nslots, sizeof *s->slots);
    s->queue = calloc(s->nslots, sizeof *s->queue);
    if (!s->slots || !s->queue)
        return fs_fail(s->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory for buffers");
    for (uint32_t i = 0; i < s->nslots; i++) {
        s->slots[i].in = fs_aligned_alloc(o->chunk_size);
        s->slots[i].out = s->out_cap ? fs_aligned_alloc(s->out_cap) : NULL;
        if (!s->slots[i].in || (s->out_cap && !s->slots[i].out))
            return fs_fail(s->job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory for buffers");
    }
    fs_stat_set32(&s->job->stats.threads, s->nworkers);

    pthread_t writer, workers[256];
    uint32_t started = 0;
    int writer_started = pthread_create(&writer, NULL, writer_main, s) == 0;
    for (uint32_t i = 0; writer_started && i < s->nworkers; i++, started++)
        if (pthread_create(&workers[i], NULL, worker_main, s) != 0)
            break;
    if (!writer_started || started < s->nworkers) {
        fs_fail(s->job, FS_ERR_NOMEM, EAGAIN, -1, -1, "cannot start threads");
        fs_sync_stop(&s->y);
    } else {
        read_loop(s, in_fd);
    }
    for (uint32_t i = 0; i < started; i++)
        pthread_join(workers[i], NULL);
    if (writer_started)
        pthread_join(writer, NULL);
    return fs_failed(s->job) ? -1 : 0;
}

static void free_pipeline(struct save *s)
{
    for (uint32_t i = 0; s->slots && i < s->nslots; i++) {
        free(s->slots[i].in);
        free(s->slots[i].out);
    }
    free(s->slots);
    free(s->queue);
}

static int is_pipe(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode);
}

int fs_save(int in_fd, int dir_fd, const char *name, const struct fs_save_opts *opts,
            struct fs_job *job)
{
    uint64_t t0 = fs_now_ns();
    struct save s;
    memset(&s, 0, sizeof s);
    s.o = opts;
    s.job = job;
    s.zstd_format = opts->mode != FS_MODE_RAW;
    fs_index_init(&s.ix);
    fs_sync_init(&s.y, job);

    char tmp[512];
    int fd = -1, r = check_opts(opts, job);
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
    if (r == 0 && is_pipe(in_fd))
        fs_grow_pipe(in_fd);
    if (r == 0) {
        int done = 1;
        if (opts->mode == FS_MODE_RAW && opts->allow_splice && !s.sink.direct)
            done = fs_save_raw_splice(in_fd, &s.sink, opts->chunk_size, &s.ix, job);
        if (done == 1)
            r = run_pipeline(&s, in_fd);
        else
            r = done;
        fs_stat_set32(&job->stats.spliced, done == 0);
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
    fs_index_free(&s.ix);
    fs_sync_destroy(&s.y);
    fs_stat_set(&job->stats.wall_ns, fs_now_ns() - t0);
    fs_stat_set32(&job->stats.done, 1);
    if (r < 0 && !fs_failed(job))
        fs_fail(job, FS_ERR_IO, -r, -1, -1, "save failed: %s", strerror(-r));
    return r < 0 ? (job->error.err ? -job->error.err : -EIO) : 0;
}

int fs_default_level(void) { return DEFAULT_LEVEL; }
unsigned fs_zstd_version(void) { return ZSTD_versionNumber(); }
