/* fastsave native core: public interface.
 *
 * This header is parsed by cffi as is: no includes, no include guard, no
 * attributes. C files include it through fs_internal.h, which provides the
 * <stdint.h> types first.
 *
 * Every function returns 0 (or a count) on success and -errno on failure;
 * the details of a failure (kind, chunk, file offset, message) are written
 * to the caller's fs_job. Nothing is kept in global state.
 */

#define FS_MODE_RAW 0
#define FS_MODE_ZSTD 1
#define FS_MODE_AUTO 2

#define FS_CODEC_RAW 0
#define FS_CODEC_ZSTD 1

#define FS_ERR_NONE 0
#define FS_ERR_IO 1
#define FS_ERR_CORRUPT 2
#define FS_ERR_TRUNCATED 3
#define FS_ERR_VERSION 4
#define FS_ERR_CANCELLED 5
#define FS_ERR_ARG 6
#define FS_ERR_NOMEM 7
#define FS_ERR_NOT_IMAGE 8

#define FS_FORMAT_MAJOR 1              /* single-channel images: the format of every 1.x reader */
#define FS_FORMAT_MINOR 0
#define FS_FORMAT_MAJOR_CHANNELS 2     /* images of several channels (a 1.x reader refuses them) */

#define FS_NAME_MAX 1024
#define FS_VERSION_MAX 64

/* Limits (docs/image-format.md, "Limits"). Options beyond them are refused
 * with FS_ERR_ARG; a reader refuses an image beyond them as corrupt, and a
 * writer never writes one. */
#define FS_CHUNK_SIZE_MIN 65536         /* 64 KiB; chunk sizes are multiples of 4096 */
#define FS_CHUNK_SIZE_MAX 67108864      /* 64 MiB */
#define FS_CHUNKS_MAX 16777216          /* chunks per image: 16 TiB at 1 MiB chunks, 384 MiB of index */
#define FS_XML_MAX 67108864             /* domain XML, 64 MiB */
#define FS_THREADS_MAX 256
#define FS_SLOTS_MAX 4096
#define FS_BUFFERS_MAX 1073741824       /* 1 GiB: chunk buffers and zstd state of one call */
#define FS_CHANNELS_MAX 64              /* streams of one image (QEMU's main and multifd channels) */

/* Counters of a running or finished call. Written by the call's threads with
 * relaxed atomic stores, so another thread may read them at any time. */
struct fs_stats {
    uint64_t bytes_in;          /* stream bytes read (save) / image bytes read (restore) */
    uint64_t bytes_out;         /* image bytes written (save) / stream bytes written (restore) */
    uint64_t stream_total;      /* restore: stream length from the image; save: 0 */
    uint64_t chunks;            /* chunks fully handled */
    uint64_t chunks_compressed;
    uint64_t chunks_stored;
    uint64_t wall_ns;
    uint64_t input_wait_ns;     /* reader blocked in read/poll on its input */
    uint64_t producer_blocked_ns; /* save: reader waited for a free buffer, the producer was not served */
    uint64_t output_wait_ns;    /* writer blocked in write/poll on its output */
    uint64_t reader_cpu_ns;
    uint64_t writer_cpu_ns;
    uint64_t worker_cpu_ns;     /* compression / decompression / hashing workers, summed */
    uint32_t threads;
    uint32_t direct;            /* 1 when O_DIRECT was really used */
    uint32_t spliced;           /* 1 when data moved with splice */
    uint32_t done;              /* 1 once the call has returned */
};

struct fs_error {
    int32_t kind;               /* FS_ERR_* */
    int32_t err;                /* errno, positive, or 0 */
    int64_t chunk;              /* chunk index or -1 */
    int64_t offset;             /* file offset or -1 */
    char msg[512];
};

/* One per call: the caller owns it, may set cancel from another thread and
 * may read stats while the call runs. */
struct fs_job {
    int32_t cancel;
    int32_t claimed;            /* internal: first error wins */
    struct fs_stats stats;
    struct fs_error error;
};

struct fs_save_opts {
    int32_t mode;               /* FS_MODE_* */
    int32_t level;              /* zstd level; negative levels are fast modes */
    int32_t threads;            /* compression workers, 1 .. FS_THREADS_MAX (fewer when
                                   FS_BUFFERS_MAX needs it: stats.threads says) */
    int32_t direct;             /* 1: O_DIRECT writes */
    uint32_t chunk_size;        /* multiple of 4096, FS_CHUNK_SIZE_MIN .. FS_CHUNK_SIZE_MAX */
    uint32_t slots;             /* chunk buffers in flight (shared by all channels),
                                   <= FS_SLOTS_MAX; 0: default */
    uint32_t was_running;
    uint32_t allow_splice;      /* raw mode: splice when the input is a pipe */
    const char *xml;            /* domain XML, no NUL inside; may be NULL */
    uint64_t xml_len;
    const char *name;           /* domain name, may be NULL */
    uint64_t name_len;
    uint8_t uuid[16];
    const char *version;        /* fastsave version string */
    int64_t created_ns;         /* creation time, Unix ns */
};

struct fs_restore_opts {
    int32_t threads;            /* 0 .. FS_THREADS_MAX, 0 means 1; fewer when
                                   FS_BUFFERS_MAX needs it */
    int32_t direct;             /* 1: O_DIRECT reads of the payload */
    uint32_t slots;             /* per channel, <= FS_SLOTS_MAX; 0: default */
};

/* What an image says about itself, after header, metadata, index and
 * trailer passed their checks. */
struct fs_image_info {
    uint32_t major;
    uint32_t minor;
    uint32_t libvirt_format;    /* 0 raw, 5 zstd */
    uint32_t codec;             /* FS_CODEC_* */
    int32_t level;
    uint32_t chunk_size;
    uint32_t was_running;
    uint32_t auto_mode;
    uint64_t stream_len;        /* all channels together */
    uint32_t channels;          /* 1 for a major 1 image */
    uint64_t channel_len[64];   /* stream length of each channel (FS_CHANNELS_MAX) */
    uint64_t chunk_count;
    uint64_t chunks_compressed;
    uint64_t payload_offset;
    uint64_t payload_len;       /* bytes of chunk data in the file */
    uint64_t file_size;
    uint64_t xml_offset;
    uint64_t xml_len;
    int64_t created_ns;
    uint8_t uuid[16];
    uint32_t name_len;
    char name[1024];
    char version[64];
};

/* Reads a stream from in_fd until EOF and writes the image `name` inside the
 * directory dir_fd, atomically: temp file, fsync, rename, fsync directory. */
int fs_save(int in_fd, int dir_fd, const char *name,
            const struct fs_save_opts *opts, struct fs_job *job);

/* Reads n streams (channels) concurrently, each until its EOF, and writes one
 * image of them as fs_save does. n == 1 is fs_save (a major 1 image); n > 1
 * writes a major 2 image that keeps each channel's bytes apart. 1 <= n <=
 * FS_CHANNELS_MAX. A channel's progress never waits on another's input. */
int fs_save_channels(const int *in_fds, int n, int dir_fd, const char *name,
                     const struct fs_save_opts *opts, struct fs_job *job);

/* Checks an image and writes its stream to out_fd; out_fd < 0 only verifies
 * (an image of any channel count). */
int fs_restore(int image_fd, int out_fd, const struct fs_restore_opts *opts,
               struct fs_job *job);

/* Checks an image and writes channel i to out_fds[i], each from its own
 * thread; n must be the image's channel count. out_fds == NULL only
 * verifies (n is then ignored). */
int fs_restore_channels(int image_fd, const int *out_fds, int n,
                        const struct fs_restore_opts *opts, struct fs_job *job);

/* Checks header, metadata, index and trailer (not the chunk data). */
int fs_inspect(int image_fd, struct fs_image_info *info, struct fs_job *job);

/* Removes temp files left in dir_fd by saves that died; returns the count. */
int fs_cleanup(int dir_fd, struct fs_job *job);

/* Default zstd level and the libzstd version, for reporting. */
int fs_default_level(void);
unsigned fs_zstd_version(void);
