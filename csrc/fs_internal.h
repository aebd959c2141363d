/* Internal declarations shared by the C core's files. */
#ifndef FS_INTERNAL_H
#define FS_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>
#include <sys/types.h>

#include "fastsave.h"

/* O_DIRECT alignment and the alignment of the payload start. */
#define FS_ALIGN 4096u

/* zstd skippable frame magic used for all of fastsave's own frames. */
#define FS_SKIP_MAGIC 0x184D2A5Eu
#define FS_ZSTD_MAGIC 0xFD2FB528u

#define FS_LV_HEADER_SIZE 92u
#define FS_LV_FORMAT_RAW 0u
#define FS_LV_FORMAT_ZSTD 5u

#define FS_TRAILER_SIZE 128u          /* whole trailer frame, fixed */
#define FS_INDEX_ENTRY_SIZE 24u       /* major 1 */
#define FS_INDEX_ENTRY2_SIZE 32u      /* major 2: and the chunk's channel */
#define FS_GUARD_SIZE 4096u           /* major 2: payload bytes before the first chunk */
#define FS_CHUNK_MIN ((uint32_t)FS_CHUNK_SIZE_MIN)
#define FS_CHUNK_MAX ((uint32_t)FS_CHUNK_SIZE_MAX)
#define FS_RAW_BLOCK_MAX (128u << 10)  /* zstd raw block limit */
#define FS_CHAIN_SEED 0x6661737473617665ULL /* "fastsave" */

/* Per-chunk index record; `chain` covers this and every earlier chunk of
 * its channel. (The channel of a major 2 image's chunk is kept apart, one
 * byte per chunk, so a single-channel index stays 24 bytes a chunk.) */
struct fs_entry {
    uint32_t raw_len;
    uint32_t stored_len;
    uint32_t flags;                   /* FS_ENTRY_* */
    uint32_t check;                   /* compressed chunks: XXH3 of the stored frame, low 32 bits */
    uint64_t chain;
};
#define FS_ENTRY_COMPRESSED 1u

/* Little-endian field access; fastsave's own fields are LE on every host. */
static inline void fs_put16(uint8_t *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static inline void fs_put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static inline void fs_put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static inline uint16_t fs_get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint32_t fs_get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t fs_get64(const uint8_t *p) { return (uint64_t)fs_get32(p) | (uint64_t)fs_get32(p + 4) << 32; }

static inline uint64_t fs_align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

/* job.c */
uint64_t fs_now_ns(void);
uint64_t fs_thread_cpu_ns(void);
int fs_fail(struct fs_job *job, int kind, int err, int64_t chunk, int64_t offset,
            const char *fmt, ...) __attribute__((format(printf, 6, 7)));
int fs_failed(struct fs_job *job);
int fs_cancelled(struct fs_job *job);
void fs_stat_add(uint64_t *field, uint64_t v);
void fs_stat_set(uint64_t *field, uint64_t v);
void fs_stat_set32(uint32_t *field, uint32_t v);
void *fs_aligned_alloc(size_t size);

/* sync.c: lock, wake-ups and stop flag of a pipeline */
struct fs_sync {
    pthread_mutex_t mu;
    pthread_cond_t cv_free, cv_work, cv_ready;
    int stop;
    struct fs_job *job;
};
void fs_sync_init(struct fs_sync *sync, struct fs_job *job);
void fs_sync_destroy(struct fs_sync *sync);
void fs_sync_stop(struct fs_sync *sync);
void fs_sync_stop_locked(struct fs_sync *sync);
void fs_sync_wait(struct fs_sync *sync, pthread_cond_t *cv);

/* hash.c: every hash of the format (XXH3-64) */
uint64_t fs_digest(const void *data, size_t len);
uint64_t fs_chain(uint64_t prev, uint64_t seq, uint64_t digest, uint32_t raw_len);
uint64_t fs_channel_seed(uint32_t major, uint32_t channel); /* chain value before a channel's first chunk */
uint64_t fs_image_chain(uint64_t prev, uint64_t i, uint64_t chain, uint32_t channel);
struct fs_hash;                       /* incremental fs_digest of data given in pieces */
struct fs_hash *fs_hash_new(void);
void fs_hash_update(struct fs_hash *h, const void *data, size_t len);
uint64_t fs_hash_digest(const struct fs_hash *h);
void fs_hash_free(struct fs_hash *h);

/* format.c: encoding and decoding of the image's parts (docs/image-format.md).
 * Decoders return 0, or -EBADMSG (-EPROTONOSUPPORT for a format version this
 * reader does not know) and say why in a struct fs_why. */
struct fs_why {
    int kind;                         /* FS_ERR_* */
    int64_t at;                       /* offset of the fault inside the decoded bytes, or -1 */
    const char *what;
};
struct fs_lv_header {
    uint32_t data_len;                /* bytes from the header's end to the payload */
    uint32_t was_running;
    uint32_t format;                  /* FS_LV_FORMAT_* */
};
struct fs_meta {
    uint32_t major, minor;
    uint32_t codec, chunk_size, was_running, auto_mode;
    int32_t level;
    uint64_t stream_len;
    int64_t created_ns;
    uint8_t uuid[16];
    uint32_t name_len, version_len;
    const char *name, *version;       /* point into the encoded buffer when decoded */
    uint32_t channels;                /* 1 in major 1 */
    uint64_t channel_len[FS_CHANNELS_MAX];   /* major 2: each channel's stream length */
    uint64_t channel_chain[FS_CHANNELS_MAX]; /* major 2: each channel's last chain value */
};
struct fs_trailer {
    uint32_t major, minor;
    uint32_t channels;                /* major 2; 1 in major 1 */
    uint64_t payload_offset, meta_offset, index_offset, trailer_offset;
    uint64_t prefix_hash, final_chain;
};
#define FS_META_MAX (8u + 80u + FS_NAME_MAX + FS_VERSION_MAX + 16u * FS_CHANNELS_MAX + 16u) /* whole frame */
#define FS_INDEX_HEAD_SIZE 24u        /* skippable header, tag, count */
uint64_t fs_payload_offset(uint64_t xml_len);
void fs_encode_prefix(uint8_t *buf, uint64_t payload_offset, uint32_t lv_format,
                      uint32_t was_running, const char *xml, uint64_t xml_len);
int fs_lv_header_prefix(const uint8_t *buf, size_t n);
int fs_decode_lv_header(const uint8_t *buf, struct fs_lv_header *h, struct fs_why *why);
size_t fs_meta_size(const struct fs_meta *m);
void fs_encode_meta(uint8_t *buf, const struct fs_meta *m);
int fs_decode_meta(const uint8_t *buf, size_t len, struct fs_meta *m, struct fs_why *why);
uint32_t fs_entry_size(uint32_t major);
size_t fs_index_size(uint64_t count, uint32_t major);
void fs_encode_index_head(uint8_t *buf, uint64_t count, uint32_t major);
int fs_decode_index_head(const uint8_t *buf, uint64_t frame_len, uint64_t count, struct fs_why *why);
/* Major 2 entries carry the chunk's channel; a decoder refuses nonzero reserved bytes. */
size_t fs_encode_entry(uint8_t *buf, const struct fs_entry *e, uint32_t major, uint32_t channel);
int fs_decode_entry(const uint8_t *buf, struct fs_entry *e, uint32_t major, uint32_t *channel);
void fs_encode_trailer(uint8_t *buf, const struct fs_trailer *t);
int fs_decode_trailer(const uint8_t *buf, struct fs_trailer *t, struct fs_why *why);
void fs_encode_guard(uint8_t *buf, uint32_t codec);   /* FS_GUARD_SIZE bytes */
size_t fs_raw_frame_size(size_t raw_len);
size_t fs_raw_frame_header(uint8_t *buf, size_t raw_len);
void fs_raw_block_header(uint8_t *buf, size_t block_len, int last);
int fs_raw_frame_decode(const uint8_t *src, size_t stored_len, uint8_t *dst, size_t raw_len); /* 0 or -EBADMSG */

/* sink.c: ordered, optionally O_DIRECT, buffered writer of one file */
struct fs_sink {
    int fd;
    int direct;
    uint8_t *buf;                     /* FS_ALIGN-aligned staging buffer */
    size_t cap, len;
    uint64_t off;                     /* file offset of buf[0] */
    uint64_t wb_start, wb_prev;       /* write-behind windows (buffered mode) */
    struct fs_job *job;
};
int fs_sink_init(struct fs_sink *s, int fd, int direct, size_t cap, struct fs_job *job);
int fs_sink_append(struct fs_sink *s, const void *p, size_t n);
int fs_sink_flush(struct fs_sink *s);
int fs_sink_finish(struct fs_sink *s);
uint64_t fs_sink_pos(const struct fs_sink *s);
void fs_sink_free(struct fs_sink *s);
void fs_sink_advanced(struct fs_sink *s, uint64_t n);

/* fdio.c: cancellable full reads and writes on pipes, sockets and files */
int fs_wait_ready(int fd, short events, struct fs_job *job, uint64_t *wait_ns);
ssize_t fs_read_full(int fd, void *buf, size_t n, struct fs_job *job, uint64_t *wait_ns,
                     uint64_t *count);
int fs_write_full(int fd, const void *buf, size_t n, struct fs_job *job, uint64_t *wait_ns);
int fs_pwrite_full(int fd, const void *buf, size_t n, uint64_t off);
int fs_pread_exact(int fd, void *buf, size_t n, uint64_t off);
void fs_grow_pipe(int fd);
int fs_nonblocking_writer(int fd);   /* an fd, or -errno (-ENOTSUP: fd is not a blocking pipe) */

/* image.c: a validated image, ready to stream */
struct fs_image {
    int fd;
    uint64_t file_size;
    struct fs_meta meta;
    struct fs_trailer trailer;
    uint32_t lv_format;
    uint64_t xml_len;
    uint8_t *meta_buf;
    struct fs_entry *entries;
    uint8_t *channel_of;              /* major 2: each chunk's channel; NULL in major 1 */
    uint64_t chunks_offset;           /* file offset of the first chunk */
    uint64_t channel_count[FS_CHANNELS_MAX]; /* chunks of each channel */
    uint64_t count;
    uint64_t compressed;
};
int fs_image_open(int fd, struct fs_image *img, struct fs_job *job);
void fs_image_close(struct fs_image *img);

/* atomic.c: temp file, durable rename, leftovers */
int fs_check_name(const char *name, struct fs_job *job);
int fs_tmp_create(int dir_fd, const char *name, int *direct, char *tmp, size_t cap,
                  struct fs_job *job);
int fs_tmp_commit(int dir_fd, int fd, const char *tmp, const char *name, struct fs_job *job);
void fs_tmp_discard(int dir_fd, int fd, const char *tmp);

/* entries.c: the index built while saving, 24 bytes per chunk */
struct fs_index_build {
    struct fs_entry *e;
    uint8_t *channel_of;              /* each chunk's channel, when channels > 1 */
    uint64_t count, cap;
    uint64_t max;                     /* FS_CHUNKS_MAX */
    uint32_t major, channels;
    uint64_t chain;                   /* major 1: chain value of the last chunk added */
    uint64_t image_chain;             /* major 2: over the index in file order */
    uint64_t stream_len;
    uint64_t channel_chain[FS_CHANNELS_MAX];
    uint64_t channel_len[FS_CHANNELS_MAX];
    uint64_t channel_count[FS_CHANNELS_MAX];
};
void fs_index_init(struct fs_index_build *b, uint32_t channels);
/* 0, -ENOMEM, or -EFBIG when the index already holds `max` chunks */
int fs_index_add(struct fs_index_build *b, uint32_t channel, uint32_t raw_len, uint32_t stored_len,
                 uint32_t flags, uint32_t check, uint64_t digest);
int fs_index_fail(const struct fs_index_build *b, int rc, uint32_t chunk_size, struct fs_job *job);
void fs_index_free(struct fs_index_build *b);

/* restore.c: the buffers a restore needs at least, per channel, for an
 * image's chunk size and codec (a writer never writes an image whose
 * channels need more than FS_BUFFERS_MAX together) */
#define FS_RESTORE_MIN_SLOTS 3u
uint64_t fs_restore_slot_size(uint32_t chunk_size, int zstd);

/* splice.c: zero-copy raw save when the input is a pipe. Sets *used to 0 and
 * returns 0 without having read anything when it does not apply (the input
 * is not a pipe); else *used is 1 and it returns 0 or -errno. */
int fs_save_raw_splice(int in_fd, struct fs_sink *sink, uint32_t chunk_size,
                       struct fs_index_build *index, int *used, struct fs_job *job);

#endif
