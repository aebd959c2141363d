/* Self-contained tests of the fastsave C core (csrc/).
 *
 * Streams are generated in memory, fed to fs_save by a producer thread
 * through a pipe or socket, written back by fs_restore into a pipe (or a
 * socket or a file) and compared byte by byte by a consumer thread.
 *
 * Groups (run all by default, or name some on the command line):
 *   roundtrip  size x content x mode x direct x threads x splice, 64 KiB chunks
 *   big        the same idea with 1 MiB chunks
 *   corrupt    bit flips in every region, truncation, extension, chunk swaps
 *              and duplicates of zstd and raw images (64 KiB and 1 MiB chunks);
 *              a restore must fail and never emit a byte that is not the
 *              stream's (zstd bits a decoder ignores may leave the stream
 *              intact: such flips must then restore the identical stream)
 *   cancel     cancelling saves and restores from another thread
 *   cleanup    fs_cleanup of stale and locked temp files
 *   args       invalid arguments
 *   misc       non-images, XML region edges, concurrent saves, EPIPE, many
 *              threads, tmpfs, ramfs (no O_DIRECT; needs CAP_SYS_ADMIN, else
 *              skipped)
 *   errors     the image cannot be written (file size limit): clean failure
 *   limits     memory limits: options beyond FS_*_MAX refused naming value and
 *              limit, buffers within FS_BUFFERS_MAX (fewer workers), images
 *              claiming more than FS_CHUNKS_MAX chunks (sparse files whose
 *              size allows them) refused before the index is allocated
 *
 * The last line printed is "N passed, N failed"; the exit status is non-zero
 * when anything failed.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zstd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "fs_internal.h" /* fastsave.h, and the index builder for the limits group */

#define KIB 1024u
#define CH (64u * KIB)          /* chunk size of most cases */
#define BIG_CH (1024u * KIB)    /* chunk size of the "big" group */
#define MAX_LEN ((size_t)5 * BIG_CH + 123)
#define LV_HEADER 92u
#define TRAILER 128u

/* ------------------------------------------------------------------ */
/* Bookkeeping                                                         */

static int g_pass, g_fail, g_case_failed, g_case_open, g_msgs;
static char g_case[256];

static void case_begin(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void case_begin(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_case, sizeof g_case, fmt, ap);
    va_end(ap);
    g_case_failed = 0;
    g_case_open = 1;
}

static void case_end(void)
{
    g_case_open = 0;
    if (g_case_failed)
        g_fail++;
    else
        g_pass++;
}

static void fail_at(int line, const char *cond, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void fail_at(int line, const char *cond, const char *fmt, ...)
{
    g_case_failed = 1;
    if (g_msgs++ >= 300) {
        if (g_msgs == 301)
            fprintf(stderr, "(further failure messages suppressed)\n");
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL [%s] line %d: %s: ", g_case, line, cond);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

#define EXPECT(cond, ...)                                    \
    do {                                                     \
        if (!(cond))                                         \
            fail_at(__LINE__, #cond, __VA_ARGS__);           \
    } while (0)

/* Setup failures of the test itself: report and give up on the case. */
#define SETUP(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fail_at(__LINE__, #cond, "test setup failed: %s", strerror(errno));  \
            goto out;                                                            \
        }                                                                        \
    } while (0)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static const char *kind_name(int k)
{
    static const char *names[] = {"NONE", "IO", "CORRUPT", "TRUNCATED", "VERSION",
                                  "CANCELLED", "ARG", "NOMEM", "NOT_IMAGE"};
    return k >= 0 && k <= 8 ? names[k] : "?";
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

/* ------------------------------------------------------------------ */
/* Stream contents                                                     */

enum { C_ZEROS, C_RANDOM, C_TEXT, C_MIXED, C_COUNT };
static const char *content_name[] = {"zeros", "random", "text", "mixed"};
static uint8_t *g_content[C_COUNT];

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void gen_random(uint8_t *b, size_t n, uint64_t seed)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL | 1;
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = xorshift(&s);
        memcpy(b + i, &v, n - i < 8 ? n - i : 8);
    }
}

static void gen_text(uint8_t *b, size_t n, uint64_t seed)
{
    static const char *words[] = {"virtual", "machine", "memory", "page", "qemu", "libvirt",
                                  "save", "restore", "the", "of", "and", "dirty", "bitmap",
                                  "device", "state", "ram", "block", "migration", "\n", "0x7f3a"};
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL | 1;
    size_t i = 0;
    while (i < n) {
        const char *w = words[xorshift(&s) % (sizeof words / sizeof *words)];
        size_t l = strlen(w);
        for (size_t j = 0; j < l && i < n; j++)
            b[i++] = (uint8_t)w[j];
        if (i < n)
            b[i++] = ' ';
    }
}

/* Guest-memory-like: extents of zeros, noise, text and short repeating patterns. */
static void gen_mixed(uint8_t *b, size_t n, uint64_t seed)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL | 1;
    size_t i = 0;
    while (i < n) {
        size_t ext = 4096 * (1 + xorshift(&s) % 8);
        if (ext > n - i)
            ext = n - i;
        switch (xorshift(&s) % 4) {
        case 0: memset(b + i, 0, ext); break;
        case 1: gen_random(b + i, ext, xorshift(&s)); break;
        case 2: gen_text(b + i, ext, xorshift(&s)); break;
        default: {
            uint8_t pat[16];
            gen_random(pat, sizeof pat, xorshift(&s));
            for (size_t j = 0; j < ext; j++)
                b[i + j] = pat[j % sizeof pat];
        }
        }
        i += ext;
    }
}

static void make_contents(void)
{
    for (int c = 0; c < C_COUNT; c++) {
        g_content[c] = malloc(MAX_LEN);
        if (!g_content[c]) {
            perror("malloc");
            exit(2);
        }
    }
    memset(g_content[C_ZEROS], 0, MAX_LEN);
    gen_random(g_content[C_RANDOM], MAX_LEN, 11);
    gen_text(g_content[C_TEXT], MAX_LEN, 12);
    gen_mixed(g_content[C_MIXED], MAX_LEN, 13);
}

/* ------------------------------------------------------------------ */
/* Producer and consumer threads                                       */

struct producer {
    int fd;
    const uint8_t *data;
    size_t len;
    uint64_t seed;
    int trickle;                /* write 4 KiB every 5 ms until `stop` (cancel tests) */
    int idle;                   /* write nothing until `stop` */
    int pace;                   /* sleep a little between writes */
    int stop;                   /* atomic */
    size_t sent;
    int err;
};

static void *producer_main(void *arg)
{
    struct producer *p = arg;
    uint64_t s = p->seed * 0x9E3779B97F4A7C15ULL | 1;
    if (p->trickle || p->idle) {
        uint8_t buf[4096];
        memset(buf, 0x5a, sizeof buf);
        while (!__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE)) {
            if (p->trickle) {
                ssize_t k = write(p->fd, buf, sizeof buf);
                if (k < 0 && errno == EINTR)
                    continue;
                if (k < 0)
                    break;
                p->sent += (size_t)k;
            }
            sleep_ms(5);
        }
    } else {
        size_t off = 0;
        while (off < p->len) {
            size_t want = 1 + xorshift(&s) % (3 * CH / 2);
            if (xorshift(&s) % 4 == 0)
                want = 1 + want % 100;
            if (want > p->len - off)
                want = p->len - off;
            if (p->pace && xorshift(&s) % 3 == 0)
                sleep_ms(1);
            ssize_t k = write(p->fd, p->data + off, want);
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0) {
                p->err = errno;
                break;
            }
            off += (size_t)k;
        }
        p->sent = off;
    }
    close(p->fd);
    return NULL;
}

struct consumer {
    int fd;
    const uint8_t *expect;
    size_t len;
    size_t pre_read;            /* bytes to read before waiting at the gate */
    int gate;                   /* atomic: when set, wait (at most 5 s) for it to clear */
    size_t got;
    int mismatch;
    size_t bad_at;
};

/* Reads until EOF or until `limit` bytes in all; returns 0 at EOF. */
static int consume(struct consumer *c, uint8_t *buf, size_t cap, size_t limit)
{
    while (c->got < limit) {
        size_t want = limit - c->got < cap ? limit - c->got : cap;
        ssize_t k = read(c->fd, buf, want);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return 0;
        size_t n = (size_t)k;
        if (!c->mismatch) {
            if (c->got + n > c->len) {
                c->mismatch = 1;
                c->bad_at = c->len;
            } else if (memcmp(buf, c->expect + c->got, n) != 0) {
                size_t j = 0;
                while (buf[j] == c->expect[c->got + j])
                    j++;
                c->mismatch = 1;
                c->bad_at = c->got + j;
            }
        }
        c->got += n;
    }
    return 1;
}

static void *consumer_main(void *arg)
{
    struct consumer *c = arg;
    size_t cap = 256 * KIB;
    uint8_t *buf = malloc(cap);
    int more = 1;
    if (c->pre_read)
        more = consume(c, buf, cap, c->pre_read);
    for (int waited = 0; __atomic_load_n(&c->gate, __ATOMIC_ACQUIRE) && waited < 5000; waited += 2)
        sleep_ms(2);
    if (more)
        consume(c, buf, cap, SIZE_MAX);
    close(c->fd);
    free(buf);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Running saves and restores                                          */

enum { IN_PIPE, IN_SOCK };
enum { OUT_NONE, OUT_PIPE, OUT_SOCK, OUT_FILE };
#define KIND_MASK 3
#define NONBLOCK 4              /* or'ed into a kind: O_NONBLOCK on fs_*'s end */
#define SLOW 8                  /* or'ed into an input kind: the producer pauses */
static const char *out_name[] = {"verify", "pipe", "socket", "file"};

static int make_channel(int kind, int fds[2])
{
    if (kind == IN_SOCK)
        return socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds);
    return pipe2(fds, O_CLOEXEC);
}

/* `job` is initialised by the caller (so a test can preset cancel). */
static int run_save(const uint8_t *data, size_t len, int in_kind, int dir_fd, const char *name,
                    const struct fs_save_opts *o, struct fs_job *job, uint64_t seed)
{
    int fds[2];
    if (make_channel(in_kind & KIND_MASK, fds) != 0) {
        fail_at(__LINE__, "channel", "%s", strerror(errno));
        return -9999;
    }
    if (in_kind & NONBLOCK)
        fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK);
    struct producer p = {.fd = fds[1], .data = data, .len = len, .seed = seed, .pace = !!(in_kind & SLOW)};
    pthread_t th;
    if (pthread_create(&th, NULL, producer_main, &p) != 0) {
        close(fds[0]);
        close(fds[1]);
        fail_at(__LINE__, "pthread_create", "producer");
        return -9999;
    }
    int rc = fs_save(fds[0], dir_fd, name, o, job);
    close(fds[0]);
    pthread_join(th, NULL);
    return rc;
}

struct rres {
    int rc;
    size_t got;
    int mismatch;
    size_t bad_at;
};

static struct rres run_restore(int img_fd, const uint8_t *expect, size_t len, int out_kind,
                               const struct fs_restore_opts *ro, struct fs_job *job)
{
    struct rres r = {0};
    int nonblock = out_kind & NONBLOCK;
    out_kind &= KIND_MASK;
    memset(job, 0, sizeof *job);
    if (out_kind == OUT_NONE) {
        r.rc = fs_restore(img_fd, -1, ro, job);
        return r;
    }
    if (out_kind == OUT_FILE) {
        int fd = open("/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
        if (fd < 0) {
            fail_at(__LINE__, "O_TMPFILE", "%s", strerror(errno));
            r.rc = -9999;
            return r;
        }
        r.rc = fs_restore(img_fd, fd, ro, job);
        struct stat st;
        fstat(fd, &st);
        r.got = (size_t)st.st_size;
        if (r.got > len) {
            r.mismatch = 1;
            r.bad_at = len;
        } else if (r.got) {
            uint8_t *b = malloc(r.got);
            if (pread(fd, b, r.got, 0) != (ssize_t)r.got || memcmp(b, expect, r.got) != 0) {
                r.mismatch = 1;
                size_t j = 0;
                while (j < r.got && b[j] == expect[j])
                    j++;
                r.bad_at = j;
            }
            free(b);
        }
        close(fd);
        return r;
    }
    int fds[2];
    if (make_channel(out_kind == OUT_SOCK ? IN_SOCK : IN_PIPE, fds) != 0) {
        fail_at(__LINE__, "channel", "%s", strerror(errno));
        r.rc = -9999;
        return r;
    }
    if (nonblock)
        fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK);
    struct consumer c = {.fd = fds[0], .expect = expect, .len = len};
    pthread_t th;
    if (pthread_create(&th, NULL, consumer_main, &c) != 0) {
        close(fds[0]);
        close(fds[1]);
        fail_at(__LINE__, "pthread_create", "consumer");
        r.rc = -9999;
        return r;
    }
    r.rc = fs_restore(img_fd, fds[1], ro, job);
    close(fds[1]);
    pthread_join(th, NULL);
    r.got = c.got;
    r.mismatch = c.mismatch;
    r.bad_at = c.bad_at;
    return r;
}

/* ------------------------------------------------------------------ */
/* Directories and files                                               */

static char g_tmp_path[64], g_var_path[64];
static int g_tmp_dir = -1, g_var_dir = -1;

/* Directory streams get their own open file description (not a dup, whose
 * position would be shared with dir_fd). */
static void empty_dir(int dir_fd)
{
    int d2 = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fdopendir(d2);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        if (unlinkat(dir_fd, e->d_name, 0) != 0 && errno == EISDIR)
            unlinkat(dir_fd, e->d_name, AT_REMOVEDIR);
        else if (errno == EPERM)
            unlinkat(dir_fd, e->d_name, AT_REMOVEDIR);
    }
    closedir(d);
}

/* Names in the directory, joined by spaces; returns the count. */
static int list_dir(int dir_fd, char *out, size_t cap)
{
    int n = 0;
    if (out && cap)
        out[0] = 0;
    int d2 = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fdopendir(d2);
    if (!d)
        return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        n++;
        if (out && strlen(out) + strlen(e->d_name) + 2 < cap) {
            strcat(out, e->d_name);
            strcat(out, " ");
        }
    }
    closedir(d);
    return n;
}

static int make_dir(const char *base, char *path, size_t cap)
{
    snprintf(path, cap, "%s/fastsave-test-XXXXXX", base);
    if (!mkdtemp(path))
        return -1;
    return open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
}

static void remove_dir(int dir_fd, const char *path)
{
    if (dir_fd < 0)
        return;
    empty_dir(dir_fd);
    close(dir_fd);
    rmdir(path);
}

static uint8_t *read_all(int fd, size_t *len)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return NULL;
    *len = (size_t)st.st_size;
    uint8_t *b = malloc(*len ? *len : 1);
    if (b && *len && pread(fd, b, *len, 0) != (ssize_t)*len) {
        free(b);
        return NULL;
    }
    return b;
}

static int write_file(int dir_fd, const char *name, const uint8_t *b, size_t n)
{
    int fd = openat(dir_fd, name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    size_t put = 0;
    while (put < n) {
        ssize_t k = write(fd, b + put, n - put);
        if (k <= 0) {
            close(fd);
            return -1;
        }
        put += (size_t)k;
    }
    return fd;
}

/* The image's own description of itself, parsed independently of csrc/. */
struct layout {
    uint64_t size, payload, meta, index, trailer, count;
    uint32_t *raw, *stored, *flags;
    uint64_t *start;            /* file offset of each chunk */
};

static int parse_layout(const uint8_t *img, size_t size, struct layout *L)
{
    memset(L, 0, sizeof *L);
    if (size < LV_HEADER + TRAILER)
        return -1;
    const uint8_t *c = img + size - TRAILER + 8;
    if (memcmp(c + 112, "FSV-TAIL", 8) != 0)
        return -1;
    L->size = size;
    L->payload = get64(c + 8);
    L->meta = get64(c + 16);
    L->index = get64(c + 24);
    L->trailer = get64(c + 32);
    if (L->trailer != size - TRAILER || L->index + 24 > L->trailer)
        return -1;
    L->count = get64(img + L->index + 16);
    if (L->index + 32 + L->count * 24 != L->trailer)
        return -1;
    size_t n = L->count ? L->count : 1;
    L->raw = calloc(n, sizeof *L->raw);
    L->stored = calloc(n, sizeof *L->stored);
    L->flags = calloc(n, sizeof *L->flags);
    L->start = calloc(n, sizeof *L->start);
    uint64_t off = L->payload;
    for (uint64_t i = 0; i < L->count; i++) {
        const uint8_t *e = img + L->index + 24 + i * 24;
        L->raw[i] = get32(e);
        L->stored[i] = get32(e + 4);
        L->flags[i] = get32(e + 8);
        L->start[i] = off;
        off += L->stored[i];
    }
    return off == L->meta ? 0 : -1;
}

static void free_layout(struct layout *L)
{
    free(L->raw);
    free(L->stored);
    free(L->flags);
    free(L->start);
    memset(L, 0, sizeof *L);
}

/* ------------------------------------------------------------------ */
/* Round trips                                                         */

static char g_xml_long[6001];

struct rt {
    size_t len;
    int content;
    int mode;
    int direct;
    int threads;
    int splice;
    uint32_t chunk;
    int in_kind;
    int out_kind;
    int level;
    uint32_t slots;
    int xml_kind;               /* 0 none, 1 short, 2 long (> 4 KiB) */
    int seq;
};

static const char *mode_name(int m) { return m == FS_MODE_RAW ? "raw" : m == FS_MODE_ZSTD ? "zstd" : "auto"; }

static void check_inspect(int img_fd, const struct fs_save_opts *o, size_t len,
                          const struct layout *L, struct fs_image_info *info)
{
    struct fs_job job;
    memset(&job, 0, sizeof job);
    int rc = fs_inspect(img_fd, info, &job);
    EXPECT(rc == 0, "fs_inspect rc %d kind %s: %s", rc, kind_name(job.error.kind), job.error.msg);
    if (rc != 0)
        return;
    uint64_t count = (len + o->chunk_size - 1) / o->chunk_size;
    struct stat st;
    fstat(img_fd, &st);
    int raw = o->mode == FS_MODE_RAW;
    EXPECT(info->major == FS_FORMAT_MAJOR && info->minor == FS_FORMAT_MINOR, "version %u.%u",
           info->major, info->minor);
    EXPECT(info->libvirt_format == (raw ? 0u : 5u), "libvirt_format %u", info->libvirt_format);
    EXPECT(info->codec == (raw ? (uint32_t)FS_CODEC_RAW : (uint32_t)FS_CODEC_ZSTD), "codec %u", info->codec);
    EXPECT(info->level == (raw ? 0 : o->level), "level %d want %d", info->level, o->level);
    EXPECT(info->chunk_size == o->chunk_size, "chunk_size %u", info->chunk_size);
    EXPECT(info->was_running == (o->was_running ? 1u : 0u), "was_running %u", info->was_running);
    EXPECT(info->auto_mode == (o->mode == FS_MODE_AUTO), "auto_mode %u", info->auto_mode);
    EXPECT(info->stream_len == len, "stream_len %llu want %zu", (unsigned long long)info->stream_len, len);
    EXPECT(info->chunk_count == count, "chunk_count %llu want %llu",
           (unsigned long long)info->chunk_count, (unsigned long long)count);
    EXPECT(info->chunks_compressed <= count, "chunks_compressed %llu", (unsigned long long)info->chunks_compressed);
    if (raw)
        EXPECT(info->chunks_compressed == 0, "raw image with compressed chunks");
    uint64_t poff = align_up(LV_HEADER + o->xml_len + 1, 4096);
    EXPECT(info->payload_offset == poff, "payload_offset %llu want %llu",
           (unsigned long long)info->payload_offset, (unsigned long long)poff);
    EXPECT(info->payload_len == L->meta - L->payload, "payload_len %llu",
           (unsigned long long)info->payload_len);
    if (raw)
        EXPECT(info->payload_len == len, "raw payload_len %llu want %zu",
               (unsigned long long)info->payload_len, len);
    EXPECT(info->file_size == (uint64_t)st.st_size, "file_size %llu vs %lld",
           (unsigned long long)info->file_size, (long long)st.st_size);
    EXPECT(info->xml_offset == LV_HEADER, "xml_offset %llu", (unsigned long long)info->xml_offset);
    EXPECT(info->xml_len == o->xml_len, "xml_len %llu want %llu", (unsigned long long)info->xml_len,
           (unsigned long long)o->xml_len);
    EXPECT(info->created_ns == o->created_ns, "created_ns %lld", (long long)info->created_ns);
    EXPECT(memcmp(info->uuid, o->uuid, 16) == 0, "uuid differs");
    EXPECT(info->name_len == o->name_len && memcmp(info->name, o->name, o->name_len) == 0 &&
               info->name[o->name_len] == 0,
           "name '%s'", info->name);
    EXPECT(strcmp(info->version, o->version ? o->version : "") == 0, "version '%s'", info->version);
}

/* Header, XML region and payload checked against the stream, without csrc/. */
static void check_image_bytes(const uint8_t *img, size_t size, const struct fs_save_opts *o,
                              const uint8_t *data, size_t len, const struct layout *L)
{
    int raw = o->mode == FS_MODE_RAW;
    uint64_t poff = align_up(LV_HEADER + o->xml_len + 1, 4096);
    EXPECT(memcmp(img, "LibvirtQemudSave", 16) == 0, "libvirt magic");
    uint32_t w[5];
    memcpy(w, img + 16, sizeof w);
    EXPECT(w[0] == 2 && w[1] == poff - LV_HEADER && w[2] == (o->was_running ? 1u : 0u) &&
               w[3] == (raw ? 0u : 5u) && w[4] == 0,
           "libvirt header words %u %u %u %u %u", w[0], w[1], w[2], w[3], w[4]);
    int zeros = 1;
    for (size_t i = 16 + 20; i < LV_HEADER; i++)
        zeros &= img[i] == 0;
    EXPECT(zeros, "unused libvirt header words not zero");
    EXPECT(o->xml_len == 0 || memcmp(img + LV_HEADER, o->xml, o->xml_len) == 0, "XML differs");
    zeros = 1;
    for (size_t i = LV_HEADER + o->xml_len; i < poff; i++)
        zeros &= img[i] == 0;
    EXPECT(zeros, "XML region not NUL padded");
    EXPECT(L->payload == poff, "trailer payload offset %llu", (unsigned long long)L->payload);
    uint64_t total = 0;
    for (uint64_t i = 0; i < L->count; i++) {
        uint32_t want = i + 1 < L->count ? o->chunk_size : (uint32_t)(len - (L->count - 1) * o->chunk_size);
        EXPECT(L->raw[i] == want, "chunk %llu raw_len %u want %u", (unsigned long long)i, L->raw[i], want);
        total += L->raw[i];
        if (raw) {
            EXPECT(L->stored[i] == L->raw[i] && L->flags[i] == 0, "raw chunk %llu stored %u flags %u",
                   (unsigned long long)i, L->stored[i], L->flags[i]);
        } else if (L->flags[i] & 1) {
            EXPECT(L->stored[i] + L->raw[i] / 64 < L->raw[i], "compressed chunk %llu saves too little (%u of %u)",
                   (unsigned long long)i, L->stored[i], L->raw[i]);
        } else {
            uint32_t blocks = (L->raw[i] + 128 * KIB - 1) / (128 * KIB);
            EXPECT(L->stored[i] == 9 + L->raw[i] + 3 * blocks, "stored chunk %llu size %u",
                   (unsigned long long)i, L->stored[i]);
        }
    }
    EXPECT(total == len, "index covers %llu bytes, stream has %zu", (unsigned long long)total, len);
    if (raw) {
        EXPECT(L->meta - L->payload == len && memcmp(img + L->payload, data, len) == 0,
               "raw payload is not the stream");
    } else {
        /* Everything from the payload on is a valid zstd stream (own frames are
         * skippable) that plain libzstd decodes to the original stream. */
        uint8_t *dst = malloc(len + 1);
        size_t n = ZSTD_decompress(dst, len + 1, img + L->payload, size - L->payload);
        EXPECT(!ZSTD_isError(n) && n == len && memcmp(dst, data, len) == 0,
               "libzstd decode of payload..end: %s (%zu bytes)",
               ZSTD_isError(n) ? ZSTD_getErrorName(n) : "ok", ZSTD_isError(n) ? 0 : n);
        free(dst);
    }
}

static void fill_opts(struct fs_save_opts *o, int seq, int mode, int level, int threads, int direct,
                      uint32_t chunk, int splice, uint32_t slots, int xml_kind, char *name_buf)
{
    static const char *xml_short = "<domain type='kvm'><name>fastsave-test</name><memory unit='KiB'>65536</memory></domain>";
    memset(o, 0, sizeof *o);
    o->mode = mode;
    o->level = level;
    o->threads = threads;
    o->direct = direct;
    o->chunk_size = chunk;
    o->slots = slots;
    o->allow_splice = (uint32_t)splice;
    o->was_running = (uint32_t)(seq & 1);
    if (xml_kind == 1) {
        o->xml = xml_short;
        o->xml_len = strlen(xml_short);
    } else if (xml_kind == 2) {
        o->xml = g_xml_long;
        o->xml_len = strlen(g_xml_long);
    }
    snprintf(name_buf, 64, "vm-%d", seq);
    o->name = name_buf;
    o->name_len = strlen(name_buf);
    for (int i = 0; i < 16; i++)
        o->uuid[i] = (uint8_t)(seq * 31 + i);
    o->version = "0.1.0-ctest";
    o->created_ns = 1700000000123456789LL + seq;
}

static void roundtrip(const struct rt *t)
{
    int dir_fd = t->direct ? g_var_dir : g_tmp_dir;
    const uint8_t *data = g_content[t->content];
    char name[64], dom[64], listing[512];
    struct fs_save_opts o;
    struct fs_job job;
    struct fs_image_info info;
    struct layout L = {0};
    uint8_t *img = NULL;
    int img_fd = -1;
    size_t size = 0;

    case_begin("rt#%d len=%zu %s %s direct=%d threads=%d splice=%d chunk=%uK in=%s out=%s level=%d slots=%u xml=%d",
               t->seq, t->len, content_name[t->content], mode_name(t->mode), t->direct, t->threads,
               t->splice, t->chunk / KIB,
               (t->in_kind & KIND_MASK) == IN_SOCK ? "sock" : t->in_kind & NONBLOCK ? "pipe-nonblock"
                                                           : t->in_kind & SLOW ? "pipe-slow" : "pipe",
               out_name[t->out_kind & KIND_MASK], t->level, t->slots, t->xml_kind);
    fill_opts(&o, t->seq, t->mode, t->level, t->threads, t->direct, t->chunk, t->splice, t->slots,
              t->xml_kind, dom);
    snprintf(name, sizeof name, "image-%d.sav", t->seq);
    memset(&job, 0, sizeof job);
    int rc = run_save(data, t->len, t->in_kind, dir_fd, name, &o, &job, (uint64_t)t->seq);
    EXPECT(rc == 0, "fs_save rc %d kind %s: %s", rc, kind_name(job.error.kind), job.error.msg);
    if (rc != 0)
        goto out;
    uint64_t count = (t->len + t->chunk - 1) / t->chunk;
    EXPECT(job.error.kind == FS_ERR_NONE, "kind %d after success", job.error.kind);
    EXPECT(job.stats.done == 1, "stats.done %u", job.stats.done);
    EXPECT(job.stats.bytes_in == t->len, "save bytes_in %llu", (unsigned long long)job.stats.bytes_in);
    EXPECT(job.stats.chunks == count, "save chunks %llu want %llu", (unsigned long long)job.stats.chunks,
           (unsigned long long)count);
    EXPECT(job.stats.chunks_compressed + job.stats.chunks_stored == count, "save compressed %llu + stored %llu",
           (unsigned long long)job.stats.chunks_compressed, (unsigned long long)job.stats.chunks_stored);
    if (t->direct)
        EXPECT(job.stats.direct == 1, "O_DIRECT was not used on ext4");
    else
        EXPECT(job.stats.direct == 0, "O_DIRECT used without asking");
    int want_splice = t->mode == FS_MODE_RAW && t->splice && !t->direct && (t->in_kind & KIND_MASK) == IN_PIPE;
    EXPECT(job.stats.spliced == (uint32_t)want_splice, "spliced %u want %d", job.stats.spliced, want_splice);

    int n = list_dir(dir_fd, listing, sizeof listing);
    EXPECT(n == 1 && strncmp(listing, name, strlen(name)) == 0, "directory holds: %s", listing);

    img_fd = openat(dir_fd, name, O_RDONLY | O_CLOEXEC);
    SETUP(img_fd >= 0);
    img = read_all(img_fd, &size);
    SETUP(img != NULL);
    EXPECT(job.stats.bytes_out == size, "save bytes_out %llu, file has %zu",
           (unsigned long long)job.stats.bytes_out, size);
    rc = parse_layout(img, size, &L);
    EXPECT(rc == 0, "image layout does not parse");
    if (rc != 0)
        goto out;
    check_image_bytes(img, size, &o, data, t->len, &L);
    check_inspect(img_fd, &o, t->len, &L, &info);
    EXPECT(job.stats.chunks_compressed == info.chunks_compressed, "stats compressed %llu, image %llu",
           (unsigned long long)job.stats.chunks_compressed, (unsigned long long)info.chunks_compressed);
    if (t->mode == FS_MODE_ZSTD && (t->content == C_ZEROS || t->content == C_TEXT)) {
        uint64_t want = 0;  /* every chunk but a tiny tail compresses */
        for (uint64_t i = 0; i < L.count; i++)
            want += L.raw[i] >= 1024;
        EXPECT(info.chunks_compressed >= want, "compressible stream: %llu of %llu chunks compressed",
               (unsigned long long)info.chunks_compressed, (unsigned long long)count);
    }
    if (t->content == C_RANDOM)
        EXPECT(info.chunks_compressed == 0, "random data kept compressed");

    struct fs_restore_opts ro = {.threads = t->threads, .direct = t->direct, .slots = t->slots};
    struct rres r = run_restore(img_fd, data, t->len, t->out_kind, &ro, &job);
    EXPECT(r.rc == 0, "fs_restore rc %d kind %s: %s", r.rc, kind_name(job.error.kind), job.error.msg);
    if ((t->out_kind & KIND_MASK) != OUT_NONE)
        EXPECT(r.got == t->len && !r.mismatch, "restored %zu of %zu bytes, mismatch %d at %zu", r.got,
               t->len, r.mismatch, r.bad_at);
    EXPECT(job.stats.bytes_out == t->len && job.stats.stream_total == t->len && job.stats.chunks == count,
           "restore stats out %llu total %llu chunks %llu", (unsigned long long)job.stats.bytes_out,
           (unsigned long long)job.stats.stream_total, (unsigned long long)job.stats.chunks);
    EXPECT(job.stats.done == 1, "restore stats.done");
    if (t->direct)
        EXPECT(job.stats.direct == 1, "restore did not use O_DIRECT");

    /* and verify-only, with the other thread count */
    struct fs_restore_opts ro2 = {.threads = t->threads == 1 ? 2 : 1, .direct = !t->direct};
    r = run_restore(img_fd, data, t->len, OUT_NONE, &ro2, &job);
    EXPECT(r.rc == 0, "verify rc %d kind %s: %s", r.rc, kind_name(job.error.kind), job.error.msg);
    EXPECT(job.stats.bytes_out == t->len, "verify bytes_out %llu", (unsigned long long)job.stats.bytes_out);
out:
    if (img_fd >= 0)
        close(img_fd);
    free(img);
    free_layout(&L);
    unlinkat(dir_fd, name, 0);
    case_end();
}

static void group_roundtrip(void)
{
    static const size_t sizes[] = {0, 1, 4095, CH - 1, CH, CH + 1, 5 * (size_t)CH + 123};
    static const int levels[] = {1, 3, -1, 1, 5};
    int seq = 0;
    double t0 = now_s();
    int p0 = g_pass, f0 = g_fail;
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++)
        for (int c = 0; c < C_COUNT; c++)
            for (int mode = FS_MODE_RAW; mode <= FS_MODE_AUTO; mode++)
                for (int direct = 0; direct < 2; direct++)
                    for (int th = 0; th < 2; th++)
                        for (int sp = 0; sp < 2; sp++) {
                            struct rt t = {
                                .len = sizes[si], .content = c, .mode = mode, .direct = direct,
                                .threads = th ? 3 : 1, .splice = sp, .chunk = CH,
                                .in_kind = seq % 7 == 3    ? IN_SOCK
                                           : seq % 19 == 4 ? IN_PIPE | NONBLOCK
                                           : seq % 23 == 6 ? IN_PIPE | SLOW
                                                           : IN_PIPE,
                                .out_kind = seq % 11 == 5   ? OUT_SOCK
                                            : seq % 13 == 7 ? OUT_FILE
                                            : seq % 17 == 8 ? OUT_PIPE | NONBLOCK
                                                            : OUT_PIPE,
                                .level = levels[seq % 5],
                                .slots = seq % 5 == 2 ? 1 : 0,  /* 1 is raised to the minimum */
                                .xml_kind = seq % 3, .seq = seq,
                            };
                            roundtrip(&t);
                            seq++;
                        }
    printf("roundtrip: %d cases (%d passed, %d failed) in %.1f s\n", seq, g_pass - p0, g_fail - f0,
           now_s() - t0);
}

static void group_big(void)
{
    static const size_t sizes[] = {1, BIG_CH - 1, BIG_CH, BIG_CH + 1, 5 * (size_t)BIG_CH + 123};
    int seq = 10000, n = 0;
    double t0 = now_s();
    int p0 = g_pass, f0 = g_fail;
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++)
        for (int c = 0; c < C_COUNT; c++)
            for (int mode = FS_MODE_RAW; mode <= FS_MODE_AUTO; mode++)
                for (int direct = 0; direct < 2; direct++) {
                    uint64_t h = (uint64_t)(n + 1) * 0x9E3779B97F4A7C15ULL;  /* threads, splice: independent */
                    struct rt t = {
                        .len = sizes[si], .content = c, .mode = mode, .direct = direct,
                        .threads = (h >> 40) & 1 ? 3 : 1, .splice = (int)((h >> 45) & 1), .chunk = BIG_CH,
                        .in_kind = n % 5 == 4 ? IN_SOCK : IN_PIPE,
                        .out_kind = n % 4 == 3 ? OUT_FILE : OUT_PIPE,
                        .level = 1, .slots = 0, .xml_kind = n % 3, .seq = seq++,
                    };
                    roundtrip(&t);
                    n++;
                }
    printf("big: %d cases (%d passed, %d failed) in %.1f s\n", n, g_pass - p0, g_fail - f0, now_s() - t0);
}

/* ------------------------------------------------------------------ */
/* Corruption                                                          */

enum { R_MAGIC, R_LVHDR, R_XML, R_PAYLOAD, R_META, R_INDEX, R_TRAILER, R_COUNT };
static const char *region_name[] = {"libvirt magic", "libvirt header", "XML region", "payload",
                                    "metadata", "index", "trailer"};

struct corrupt_ctx {
    const char *label;
    int dir_fd;
    int fd;                     /* the image, read-write */
    const uint8_t *orig;
    size_t size;
    const uint8_t *stream;
    size_t len;
    struct layout L;
    int it;
    int zstd;
    uint32_t chunk;
    int mutations;
    int benign;                 /* zstd payload flips that decode to the same stream */
    char benign_list[512];
};

static int region_of(const struct corrupt_ctx *x, uint64_t off, int64_t *chunk)
{
    *chunk = -1;
    if (off < 16)
        return R_MAGIC;
    if (off < LV_HEADER)
        return R_LVHDR;
    if (off < x->L.payload)
        return R_XML;
    if (off < x->L.meta) {
        for (uint64_t i = 0; i < x->L.count; i++)
            if (off >= x->L.start[i] && off < x->L.start[i] + x->L.stored[i])
                *chunk = (int64_t)i;
        return R_PAYLOAD;
    }
    if (off < x->L.index)
        return R_META;
    if (off < x->L.trailer)
        return R_INDEX;
    return R_TRAILER;
}

/* Restores the (damaged) image in `fd` and checks it fails the right way
 * without ever emitting a wrong byte. */
static void expect_rejected(struct corrupt_ctx *x, int fd, int region, int64_t chunk, const char *what)
{
    int it = x->it++;
    int out = it % 2 ? OUT_PIPE : OUT_NONE;
    struct fs_restore_opts ro = {.threads = it % 3 == 0 ? 3 : 1, .direct = it % 29 == 0};
    struct fs_job job;
    struct rres r = run_restore(fd, x->stream, x->len, out, &ro, &job);
    int k = job.error.kind;
    x->mutations++;
    if (r.rc == 0 && region == R_PAYLOAD && x->zstd) {
        /* zstd has bits a decoder ignores (e.g. the frame header's unused
         * bit, padding in entropy tables). A flip there leaves the stream
         * intact: acceptable only if the whole stream comes out identical. */
        if (out == OUT_NONE)
            r = run_restore(fd, x->stream, x->len, OUT_PIPE, &ro, &job);
        EXPECT(r.rc == 0 && r.got == x->len && !r.mismatch,
               "%s: accepted but the stream differs (rc %d, %zu of %zu bytes, mismatch %d at %zu)", what,
               r.rc, r.got, x->len, r.mismatch, r.bad_at);
        x->benign++;
        size_t used = strlen(x->benign_list);
        if (used + 40 < sizeof x->benign_list)
            snprintf(x->benign_list + used, sizeof x->benign_list - used, " %s",
                     strstr(what, "byte ") ? strstr(what, "byte ") + 5 : what);
        return;
    }
    if (r.rc == 0) {
        fail_at(__LINE__, "rc < 0", "%s: %s accepted (restore rc 0, out=%s, wrote %zu of %zu, mismatch %d)",
                what, region_name[region], out_name[out], r.got, x->len, r.mismatch);
        return;
    }
    if (region == R_MAGIC)
        EXPECT(k == FS_ERR_NOT_IMAGE || k == FS_ERR_CORRUPT, "%s: kind %s: %s", what, kind_name(k), job.error.msg);
    else if (region == -FS_ERR_VERSION)
        EXPECT(k == FS_ERR_VERSION, "%s: kind %s: %s", what, kind_name(k), job.error.msg);
    else
        EXPECT(k == FS_ERR_CORRUPT || k == FS_ERR_TRUNCATED, "%s (%s): rc %d kind %s: %s", what,
               region_name[region < 0 ? R_TRAILER : region], r.rc, kind_name(k), job.error.msg);
    EXPECT(r.rc == -job.error.err && r.rc < 0, "%s: rc %d but err %d", what, r.rc, job.error.err);
    EXPECT(!r.mismatch, "%s: restore wrote a wrong byte at stream offset %zu", what, r.bad_at);
    if (chunk >= 0) {
        EXPECT(job.error.chunk == chunk, "%s: error names chunk %lld, damage is in chunk %lld: %s", what,
               (long long)job.error.chunk, (long long)chunk, job.error.msg);
        if (out != OUT_NONE)
            EXPECT(r.got == (size_t)chunk * x->chunk, "%s: wrote %zu bytes before failing, want %zu", what,
                   r.got, (size_t)chunk * x->chunk);
    } else {
        EXPECT(r.got == 0, "%s: %zu bytes written from an image that fails its checks", what, r.got);
    }
    /* fs_inspect reads everything but the chunk data */
    if (it % 4 == 1) {
        struct fs_image_info info;
        memset(&job, 0, sizeof job);
        int rc = fs_inspect(fd, &info, &job);
        if (region == R_PAYLOAD)
            EXPECT(rc == 0, "%s: inspect of an image with damaged chunk data: rc %d %s", what, rc, job.error.msg);
        else
            EXPECT(rc < 0 && job.error.kind != FS_ERR_NONE, "%s: inspect accepted it (rc %d)", what, rc);
    }
}

static void flip(struct corrupt_ctx *x, uint64_t off, uint8_t mask)
{
    int64_t chunk;
    int region = region_of(x, off, &chunk);
    uint64_t tmaj = x->L.trailer + 8 + 104;
    int expect_region = region;
    if (region == R_TRAILER && (off == tmaj || off == tmaj + 1))
        expect_region = -FS_ERR_VERSION;  /* a damaged major version reads as a newer format */
    uint8_t b = x->orig[off] ^ mask;
    char what[96];
    snprintf(what, sizeof what, "%s: byte %llu ^ 0x%02x", x->label, (unsigned long long)off, mask);
    if (pwrite(x->fd, &b, 1, (off_t)off) != 1) {
        fail_at(__LINE__, "pwrite", "%s", strerror(errno));
        return;
    }
    expect_rejected(x, x->fd, expect_region, chunk, what);
    if (pwrite(x->fd, &x->orig[off], 1, (off_t)off) != 1)
        fail_at(__LINE__, "pwrite", "%s", strerror(errno));
}

static void flip_range(struct corrupt_ctx *x, uint64_t from, uint64_t to, uint64_t stride, int all_bits)
{
    for (uint64_t off = from; off < to; off += stride) {
        if (all_bits) {
            for (int bit = 0; bit < 8; bit++)
                flip(x, off, (uint8_t)(1u << bit));
        } else {
            flip(x, off, (uint8_t)(1u << (off % 8)));
            flip(x, off, 0xff);
        }
    }
}

/* Writes a mutated copy as its own file and expects it to be refused. */
static void expect_file_rejected(struct corrupt_ctx *x, const uint8_t *b, size_t n, int region,
                                 int64_t chunk, const char *what)
{
    int fd = write_file(x->dir_fd, "mutant", b, n);
    if (fd < 0) {
        fail_at(__LINE__, "write_file", "%s", strerror(errno));
        return;
    }
    expect_rejected(x, fd, region, chunk, what);
    close(fd);
    unlinkat(x->dir_fd, "mutant", 0);
}

/* Stream for the corruption cases: even chunks are the same text but for one
 * byte (they compress to the same size), odd chunks are noise (stored in a
 * zstd image), and a short text chunk ends it. */
static uint8_t *corruption_stream(uint32_t chunk, int full, size_t *len)
{
    *len = (size_t)full * chunk + 123;
    uint8_t *s = malloc(*len);
    gen_text(s, chunk, 99);
    for (int i = 0; i < full; i++) {
        uint8_t *c = s + (size_t)i * chunk;
        if (i % 2) {
            gen_random(c, chunk, 1000 + (uint64_t)i);
        } else {
            if (i)
                memcpy(c, s, chunk);
            c[777] = (uint8_t)('A' + i);
        }
    }
    gen_text(s + (size_t)full * chunk, 123, 5);
    return s;
}

static void swap_chunks(const struct corrupt_ctx *x, uint8_t *b, uint64_t i, uint64_t j)
{
    uint32_t n = x->L.stored[i];
    uint8_t *t = malloc(n);
    memcpy(t, b + x->L.start[i], n);
    memcpy(b + x->L.start[i], b + x->L.start[j], n);
    memcpy(b + x->L.start[j], t, n);
    free(t);
}

/* Two chunks of equal stored size and codec but different content. */
static int find_twins(const struct corrupt_ctx *x, uint32_t flags, uint64_t *a, uint64_t *b)
{
    for (uint64_t i = 0; i < x->L.count; i++)
        for (uint64_t j = i + 1; j < x->L.count; j++)
            if (x->L.stored[i] == x->L.stored[j] && x->L.flags[i] == flags && x->L.flags[j] == flags &&
                x->L.raw[i] == x->L.raw[j] &&
                memcmp(x->stream + i * x->chunk, x->stream + j * x->chunk, x->L.raw[i]) != 0) {
                *a = i;
                *b = j;
                return 1;
            }
    return 0;
}

/* `full`: number of whole chunks; `all_regions`: also damage header,
 * metadata, index and trailer (the same for every chunk size). */
static void corruption_suite(int mode, uint32_t chunk, int full, int all_regions)
{
    struct corrupt_ctx x;
    memset(&x, 0, sizeof x);
    char label[32];
    snprintf(label, sizeof label, "%s/%uK", mode == FS_MODE_RAW ? "raw" : "zstd", chunk / KIB);
    x.label = label;
    x.zstd = mode != FS_MODE_RAW;
    x.chunk = chunk;
    x.dir_fd = g_tmp_dir;
    x.fd = -1;
    uint8_t *orig = NULL, *m = NULL;
    uint8_t *stream = corruption_stream(chunk, full, &x.len);
    x.stream = stream;
    char dom[64];
    struct fs_save_opts o;
    struct fs_job job;
    double t0 = now_s();

    case_begin("corrupt %s: build image", x.label);
    fill_opts(&o, 777, mode, 3, 2, 0, chunk, 0, 0, 1, dom);
    memset(&job, 0, sizeof job);
    int rc = run_save(stream, x.len, IN_PIPE, g_tmp_dir, "victim", &o, &job, 5);
    EXPECT(rc == 0, "save rc %d: %s", rc, job.error.msg);
    SETUP(rc == 0);
    x.fd = openat(g_tmp_dir, "victim", O_RDWR | O_CLOEXEC);
    SETUP(x.fd >= 0);
    orig = read_all(x.fd, &x.size);
    SETUP(orig != NULL);
    x.orig = orig;
    SETUP(parse_layout(orig, x.size, &x.L) == 0);
    SETUP(x.L.count == (uint64_t)full + 1);
    if (x.zstd)
        for (int i = 0; i < full; i++)
            EXPECT(x.L.flags[i] == (uint32_t)(i % 2 == 0), "chunk %d codec flag %u", i, x.L.flags[i]);
    {
        struct fs_restore_opts ro = {.threads = 2};
        struct rres r = run_restore(x.fd, stream, x.len, OUT_PIPE, &ro, &job);
        EXPECT(r.rc == 0 && r.got == x.len && !r.mismatch, "intact image does not restore: %s", job.error.msg);
    }
    case_end();

    /* single-byte damage in every region */
    const struct layout *L = &x.L;
    uint64_t xml_end = LV_HEADER + o.xml_len;
    uint64_t stride = all_regions ? chunk / 128 - 3 : chunk / 24 - 5;  /* places in each chunk */
    uint64_t head_max = all_regions ? 16 : 6;
    for (int reg = 0; reg < R_COUNT; reg++) {
        if (!all_regions && reg != R_PAYLOAD)
            continue;
        int before = x.mutations;
        case_begin("corrupt %s: flips in %s", x.label, region_name[reg]);
        switch (reg) {
        case R_MAGIC: flip_range(&x, 0, 16, 1, 0); break;
        case R_LVHDR: flip_range(&x, 16, LV_HEADER, 1, 0); break;
        case R_XML:
            flip_range(&x, LV_HEADER, L->payload, 37, 0);
            flip_range(&x, xml_end - 2, xml_end + 3, 1, 1);
            flip_range(&x, L->payload - 1, L->payload, 1, 0);
            break;
        case R_PAYLOAD:
            for (uint64_t i = 0; i < L->count; i++) {
                uint64_t a = L->start[i], e = a + L->stored[i];
                uint64_t head = L->stored[i] < 2 * head_max ? L->stored[i] : head_max;
                flip_range(&x, a, a + head, 1, 1);                  /* frame header, first bytes */
                flip_range(&x, a + head, e - head, stride, 0);      /* spread through the middle */
                flip_range(&x, e - head > a + head ? e - head : a + head, e, 1, 1); /* last bytes */
                if (x.zstd && !L->flags[i])                         /* block headers of a stored frame */
                    for (uint64_t b = a + 9 + 128 * KIB + 3; b + 3 <= e; b += 128 * KIB + 3)
                        flip_range(&x, b, b + 3, 1, 1);
            }
            break;
        case R_META: flip_range(&x, L->meta, L->index, 1, 0); break;
        case R_INDEX: flip_range(&x, L->index, L->trailer, 1, 0); break;
        case R_TRAILER: flip_range(&x, L->trailer, L->size, 1, 0); break;
        }
        case_end();
        printf("  %s %s: %d flips\n", x.label, region_name[reg], x.mutations - before);
        if (reg == R_PAYLOAD && x.benign)
            printf("  %s payload: %d flips decode to the identical stream and restore fine:%s\n", x.label,
                   x.benign, x.benign_list);
    }

    /* truncation at a spread of lengths */
    {
        int before = x.mutations;
        case_begin("corrupt %s: truncation", x.label);
        uint64_t cuts[64];
        int nc = 0;
        uint64_t fixed[] = {0, 1, 15, 16, 17, 91, 92, 93, 100, L->payload - 1, L->payload, L->payload + 1,
                            L->meta - 1, L->meta, L->meta + 1, L->index - 1, L->index, L->index + 1,
                            L->trailer - 1, L->trailer, L->trailer + 1, L->size - 9, L->size - 8,
                            L->size - 1};
        for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++)
            cuts[nc++] = fixed[i];
        for (uint64_t i = 0; i < L->count && nc + 2 <= 64; i++) {
            cuts[nc++] = L->start[i] + 1;
            cuts[nc++] = L->start[i] + L->stored[i] / 2;
        }
        for (int i = 0; i < nc; i++) {
            char what[96];
            snprintf(what, sizeof what, "%s: truncated to %llu bytes", x.label, (unsigned long long)cuts[i]);
            if (ftruncate(x.fd, (off_t)cuts[i]) != 0) {
                fail_at(__LINE__, "ftruncate", "%s", strerror(errno));
                continue;
            }
            expect_rejected(&x, x.fd, R_TRAILER, -1, what);
            if (pwrite(x.fd, orig, x.size, 0) != (ssize_t)x.size)
                fail_at(__LINE__, "pwrite", "%s", strerror(errno));
        }
        case_end();
        printf("  %s truncation: %d lengths\n", x.label, x.mutations - before);
    }

    /* bytes added at the end */
    case_begin("corrupt %s: extension", x.label);
    m = malloc(2 * x.size + 8192);
    SETUP(m != NULL);
    memcpy(m, orig, x.size);
    memset(m + x.size, 0, 4096);
    expect_file_rejected(&x, m, x.size + 1, R_TRAILER, -1, "one zero byte appended");
    expect_file_rejected(&x, m, x.size + 4096, R_TRAILER, -1, "4096 zero bytes appended");
    memcpy(m + x.size, orig + L->trailer, TRAILER);
    expect_file_rejected(&x, m, x.size + TRAILER, R_TRAILER, -1, "trailer appended twice");
    memcpy(m + x.size, orig, x.size);
    expect_file_rejected(&x, m, 2 * x.size, R_TRAILER, -1, "image concatenated with itself");
    case_end();

    /* reordered and duplicated chunks */
    case_begin("corrupt %s: swapped and duplicated chunks", x.label);
    {
        char what[96];
        uint64_t a, b;
        int kinds = 0;
        for (uint32_t fl = 0; fl < 2; fl++) {
            if (!find_twins(&x, fl, &a, &b))
                continue;
            kinds++;
            const char *codec = !x.zstd ? "raw" : fl ? "compressed" : "stored";
            memcpy(m, orig, x.size);
            swap_chunks(&x, m, a, b);
            snprintf(what, sizeof what, "%s chunks %llu and %llu swapped", codec, (unsigned long long)a,
                     (unsigned long long)b);
            expect_file_rejected(&x, m, x.size, R_PAYLOAD, (int64_t)a, what);

            memcpy(m, orig, x.size);
            memcpy(m + L->start[b], orig + L->start[a], L->stored[a]);
            snprintf(what, sizeof what, "%s chunk %llu duplicated over chunk %llu", codec,
                     (unsigned long long)a, (unsigned long long)b);
            expect_file_rejected(&x, m, x.size, R_PAYLOAD, (int64_t)b, what);

            memcpy(m, orig, x.size);
            memcpy(m + L->start[a], orig + L->start[b], L->stored[b]);
            snprintf(what, sizeof what, "%s chunk %llu duplicated over chunk %llu", codec,
                     (unsigned long long)b, (unsigned long long)a);
            expect_file_rejected(&x, m, x.size, R_PAYLOAD, (int64_t)a, what);

            /* the chunks and their index entries swapped: index checksum */
            memcpy(m, orig, x.size);
            swap_chunks(&x, m, a, b);
            uint8_t e[24];
            memcpy(e, m + L->index + 24 + a * 24, 24);
            memcpy(m + L->index + 24 + a * 24, m + L->index + 24 + b * 24, 24);
            memcpy(m + L->index + 24 + b * 24, e, 24);
            snprintf(what, sizeof what, "%s chunks and index entries %llu and %llu swapped", codec,
                     (unsigned long long)a, (unsigned long long)b);
            expect_file_rejected(&x, m, x.size, R_INDEX, -1, what);
        }
        EXPECT(kinds == (x.zstd ? 2 : 1), "found %d kinds of equal-sized chunk pairs", kinds);

        /* chunk 1 inserted again after itself */
        uint64_t at = L->start[2];
        memcpy(m, orig, at);
        memcpy(m + at, orig + L->start[1], L->stored[1]);
        memcpy(m + at + L->stored[1], orig + at, x.size - at);
        expect_file_rejected(&x, m, x.size + L->stored[1], R_TRAILER, -1, "chunk 1 inserted twice");
        /* last chunk dropped */
        uint64_t last = L->count - 1;
        memcpy(m, orig, L->start[last]);
        memcpy(m + L->start[last], orig + L->meta, x.size - L->meta);
        expect_file_rejected(&x, m, x.size - L->stored[last], R_TRAILER, -1, "last chunk removed");
        /* the payload of an image of another stream of the same shape */
        memcpy(m, orig, x.size);
        memcpy(m + L->start[0], orig + L->start[1], L->stored[0] < L->stored[1] ? L->stored[0] : L->stored[1]);
        expect_file_rejected(&x, m, x.size, R_PAYLOAD, 0, "chunk 0 overwritten with chunk 1's bytes");
    }
    case_end();
    printf("corrupt %s: %d damaged images, %d refused, %d decode identically, in %.1f s\n", x.label,
           x.mutations, x.mutations - x.benign, x.benign, now_s() - t0);
out:
    if (g_case_open)
        case_end();
    if (x.fd >= 0)
        close(x.fd);
    unlinkat(g_tmp_dir, "victim", 0);
    free_layout(&x.L);
    free(orig);
    free(m);
    free(stream);
}

static void group_corrupt(void)
{
    corruption_suite(FS_MODE_ZSTD, CH, 5, 1);
    corruption_suite(FS_MODE_RAW, CH, 5, 1);
    corruption_suite(FS_MODE_ZSTD, BIG_CH, 4, 0);
    corruption_suite(FS_MODE_RAW, BIG_CH, 4, 0);
}

/* ------------------------------------------------------------------ */
/* Cancellation                                                        */

struct canceller {
    struct fs_job *job;
    int delay_ms;
};

static void *canceller_main(void *arg)
{
    struct canceller *c = arg;
    sleep_ms(c->delay_ms);
    __atomic_store_n(&c->job->cancel, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void cancel_save_case(int mode, int splice, int idle, int preset)
{
    char path[64], dom[64], listing[256];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    int fds[2] = {-1, -1};
    pthread_t pth, cth;
    int have_p = 0, have_c = 0;
    struct producer p = {0};
    struct fs_job job;
    struct fs_save_opts o;
    struct canceller cc = {.job = &job, .delay_ms = 150};

    case_begin("cancel save %s splice=%d %s", mode_name(mode), splice,
               preset ? "preset" : idle ? "idle producer" : "trickling producer");
    SETUP(dir_fd >= 0);
    SETUP(pipe2(fds, O_CLOEXEC) == 0);
    fill_opts(&o, 5, mode, 1, 2, 0, CH, splice, 0, 1, dom);
    p.fd = fds[1];
    p.trickle = !idle;
    p.idle = idle;
    SETUP(pthread_create(&pth, NULL, producer_main, &p) == 0);
    have_p = 1;
    memset(&job, 0, sizeof job);
    if (preset)
        job.cancel = 1;
    else {
        SETUP(pthread_create(&cth, NULL, canceller_main, &cc) == 0);
        have_c = 1;
    }
    double t0 = now_s();
    int rc = fs_save(fds[0], dir_fd, "cancelled.sav", &o, &job);
    double dt = now_s() - t0;
    EXPECT(rc == -ECANCELED, "rc %d (%s) kind %s: %s", rc, strerror(-rc), kind_name(job.error.kind), job.error.msg);
    EXPECT(job.error.kind == FS_ERR_CANCELLED, "kind %s", kind_name(job.error.kind));
    EXPECT(dt < 3.0, "took %.2f s to notice the cancel", dt);
    EXPECT(job.stats.done == 1, "stats.done");
    int n = list_dir(dir_fd, listing, sizeof listing);
    EXPECT(n == 0, "left behind: %s", listing);
    if (!preset && !idle)
        EXPECT(job.stats.bytes_in > 0, "no data moved before the cancel");
out:
    if (have_c)
        pthread_join(cth, NULL);
    __atomic_store_n(&p.stop, 1, __ATOMIC_RELEASE);
    if (fds[0] >= 0)
        close(fds[0]);
    if (have_p)
        pthread_join(pth, NULL);
    else if (fds[1] >= 0)
        close(fds[1]);
    remove_dir(dir_fd, path);
    case_end();
}

/* A restore whose consumer does not read: it blocks on output until cancelled. */
static void cancel_restore_case(int threads, int out_kind, size_t pre_read)
{
    char dom[64];
    struct fs_save_opts o;
    struct fs_job job;
    size_t len = 4 * (size_t)BIG_CH;
    const uint8_t *data = g_content[C_MIXED];
    int img_fd = -1, fds[2] = {-1, -1};
    pthread_t th, cth;
    int have_t = 0;
    struct consumer c = {0};
    struct canceller cc = {.job = &job, .delay_ms = 200};

    case_begin("cancel restore threads=%d out=%s consumer stalls after %zu bytes", threads,
               out_name[out_kind], pre_read);
    fill_opts(&o, 6, FS_MODE_ZSTD, 1, 2, 0, CH, 0, 0, 0, dom);
    memset(&job, 0, sizeof job);
    int rc = run_save(data, len, IN_PIPE, g_tmp_dir, "to-cancel.sav", &o, &job, 6);
    SETUP(rc == 0);
    img_fd = openat(g_tmp_dir, "to-cancel.sav", O_RDONLY | O_CLOEXEC);
    SETUP(img_fd >= 0);
    SETUP(make_channel(out_kind == OUT_SOCK ? IN_SOCK : IN_PIPE, fds) == 0);
    c.fd = fds[0];
    c.expect = data;
    c.len = len;
    c.gate = 1;
    c.pre_read = pre_read;
    SETUP(pthread_create(&th, NULL, consumer_main, &c) == 0);
    have_t = 1;
    memset(&job, 0, sizeof job);
    SETUP(pthread_create(&cth, NULL, canceller_main, &cc) == 0);
    struct fs_restore_opts ro = {.threads = threads};
    double t0 = now_s();
    rc = fs_restore(img_fd, fds[1], &ro, &job);
    double dt = now_s() - t0;
    pthread_join(cth, NULL);
    close(fds[1]);
    fds[1] = -1;
    __atomic_store_n(&c.gate, 0, __ATOMIC_RELEASE);
    pthread_join(th, NULL);
    have_t = 0;
    EXPECT(rc == -ECANCELED, "rc %d kind %s: %s", rc, kind_name(job.error.kind), job.error.msg);
    EXPECT(job.error.kind == FS_ERR_CANCELLED, "kind %s", kind_name(job.error.kind));
    EXPECT(dt < 3.0, "took %.2f s", dt);
    EXPECT(!c.mismatch && c.got < len, "consumer got %zu of %zu, mismatch %d at %zu", c.got, len, c.mismatch,
           c.bad_at);
out:
    if (have_t) {
        if (fds[1] >= 0)
            close(fds[1]);
        __atomic_store_n(&c.gate, 0, __ATOMIC_RELEASE);
        pthread_join(th, NULL);
    }
    if (img_fd >= 0)
        close(img_fd);
    unlinkat(g_tmp_dir, "to-cancel.sav", 0);
    case_end();
}

static void group_cancel(void)
{
    double t0 = now_s();
    cancel_save_case(FS_MODE_RAW, 0, 0, 0);
    cancel_save_case(FS_MODE_RAW, 1, 0, 0);
    cancel_save_case(FS_MODE_ZSTD, 0, 0, 0);
    cancel_save_case(FS_MODE_AUTO, 0, 0, 0);
    cancel_save_case(FS_MODE_ZSTD, 0, 1, 0);
    cancel_save_case(FS_MODE_RAW, 1, 1, 0);
    cancel_save_case(FS_MODE_ZSTD, 0, 0, 1);
    cancel_save_case(FS_MODE_RAW, 1, 0, 1);
    cancel_restore_case(1, OUT_PIPE, 0);
    cancel_restore_case(3, OUT_PIPE, 0);
    cancel_restore_case(2, OUT_PIPE, 4096 + 100);
    cancel_restore_case(2, OUT_SOCK, 0);
    printf("cancel: %.1f s\n", now_s() - t0);
}

/* ------------------------------------------------------------------ */
/* Cleanup                                                             */

static int fresh_cleanup(int dir_fd, struct fs_job *job)
{
    int fd = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    memset(job, 0, sizeof *job);
    int rc = fs_cleanup(fd, job);
    close(fd);
    return rc;
}

struct busy_cleanup {
    int dir_fd, rc, saw_tmp;
};

static void *busy_cleanup_main(void *arg)
{
    struct busy_cleanup *c = arg;
    sleep_ms(200);
    char l[512];
    list_dir(c->dir_fd, l, sizeof l);
    c->saw_tmp = strstr(l, ".busy.sav.fastsave-tmp-") != NULL;
    struct fs_job j;
    c->rc = fresh_cleanup(c->dir_fd, &j);
    return NULL;
}

/* fs_cleanup called again on the same directory fd (a long-lived daemon's). */
static void cleanup_twice_same_fd(void)
{
    char path[64];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    struct fs_job job;
    case_begin("cleanup twice on one directory fd");
    SETUP(dir_fd >= 0);
    int fd = openat(dir_fd, ".a.sav.fastsave-tmp-1-0", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(fd >= 0);
    close(fd);
    memset(&job, 0, sizeof job);
    int rc = fs_cleanup(dir_fd, &job);
    EXPECT(rc == 1, "first fs_cleanup returned %d", rc);
    fd = openat(dir_fd, ".b.sav.fastsave-tmp-2-0", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(fd >= 0);
    close(fd);
    memset(&job, 0, sizeof job);
    rc = fs_cleanup(dir_fd, &job);
    EXPECT(rc == 1, "second fs_cleanup on the same dir fd returned %d", rc);
    EXPECT(faccessat(dir_fd, ".b.sav.fastsave-tmp-2-0", F_OK, 0) != 0, "stale temp file kept by the second call");
out:
    remove_dir(dir_fd, path);
    case_end();
}

static void group_cleanup(void)
{
    cleanup_twice_same_fd();
    char path[64], listing[512];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    int held = -1, fd;
    struct fs_job job;

    case_begin("cleanup");
    SETUP(dir_fd >= 0);
    fd = openat(dir_fd, ".vm.sav.fastsave-tmp-123-0", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(fd >= 0 && write(fd, "junk", 4) == 4);
    close(fd);
    held = openat(dir_fd, ".vm2.sav.fastsave-tmp-124-0", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(held >= 0 && flock(held, LOCK_EX | LOCK_NB) == 0);
    fd = openat(dir_fd, "vm.sav", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(fd >= 0);
    close(fd);
    fd = openat(dir_fd, ".hidden", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(fd >= 0);
    close(fd);
    fd = openat(dir_fd, "x.fastsave-tmp-1-1", O_CREAT | O_WRONLY | O_CLOEXEC, 0600); /* no leading dot */
    SETUP(fd >= 0);
    close(fd);
    SETUP(mkdirat(dir_fd, ".d.fastsave-tmp-1-2", 0700) == 0);
    SETUP(symlinkat("/etc/hostname", dir_fd, ".l.fastsave-tmp-1-3") == 0);

    int rc = fresh_cleanup(dir_fd, &job);
    EXPECT(rc == 1, "fs_cleanup returned %d (%s)", rc, job.error.msg);
    EXPECT(faccessat(dir_fd, ".vm.sav.fastsave-tmp-123-0", F_OK, AT_SYMLINK_NOFOLLOW) != 0,
           "stale temp file kept");
    EXPECT(faccessat(dir_fd, ".vm2.sav.fastsave-tmp-124-0", F_OK, AT_SYMLINK_NOFOLLOW) == 0,
           "locked temp file removed");
    EXPECT(faccessat(dir_fd, "vm.sav", F_OK, 0) == 0, "image removed");
    EXPECT(faccessat(dir_fd, ".hidden", F_OK, 0) == 0, "unrelated dot file removed");
    EXPECT(faccessat(dir_fd, "x.fastsave-tmp-1-1", F_OK, 0) == 0, "name without leading dot removed");
    EXPECT(faccessat(dir_fd, ".d.fastsave-tmp-1-2", F_OK, 0) == 0, "directory removed");
    EXPECT(faccessat(dir_fd, ".l.fastsave-tmp-1-3", F_OK, AT_SYMLINK_NOFOLLOW) == 0, "symlink removed");
    EXPECT(faccessat(dir_fd, "/etc/hostname", F_OK, 0) == 0 || errno == ENOENT, "symlink target");

    /* the lock is still ours after the cleanup looked at the file */
    int other = openat(dir_fd, ".vm2.sav.fastsave-tmp-124-0", O_RDONLY | O_CLOEXEC);
    EXPECT(other >= 0 && flock(other, LOCK_EX | LOCK_NB) != 0, "the test lost its lock");
    if (other >= 0)
        close(other);

    /* once released, the next cleanup takes it */
    close(held);
    held = -1;
    rc = fresh_cleanup(dir_fd, &job);
    EXPECT(rc == 1, "second fs_cleanup returned %d", rc);
    EXPECT(faccessat(dir_fd, ".vm2.sav.fastsave-tmp-124-0", F_OK, 0) != 0, "released temp file kept");
    rc = fresh_cleanup(dir_fd, &job);
    EXPECT(rc == 0, "third fs_cleanup returned %d", rc);
    int n = list_dir(dir_fd, listing, sizeof listing);
    EXPECT(n == 5, "left: %s", listing);

    /* a cleanup during a running save does not touch its temp file */
    {
        int fds[2];
        SETUP(pipe2(fds, O_CLOEXEC) == 0);
        struct producer p = {.fd = fds[1], .trickle = 1};
        pthread_t th;
        SETUP(pthread_create(&th, NULL, producer_main, &p) == 0);
        struct fs_job sj;
        memset(&sj, 0, sizeof sj);
        struct canceller cc = {.job = &sj, .delay_ms = 400};
        pthread_t cth;
        pthread_create(&cth, NULL, canceller_main, &cc);
        struct fs_save_opts o;
        char dom[64];
        fill_opts(&o, 9, FS_MODE_RAW, 1, 1, 0, CH, 0, 0, 0, dom);
        /* run the cleanup from a helper while fs_save is busy in this thread */
        struct busy_cleanup cl = {dir_fd, -1, 0};
        pthread_t clt;
        pthread_create(&clt, NULL, busy_cleanup_main, &cl);
        int src = fs_save(fds[0], dir_fd, "busy.sav", &o, &sj);
        pthread_join(clt, NULL);
        pthread_join(cth, NULL);
        __atomic_store_n(&p.stop, 1, __ATOMIC_RELEASE);
        close(fds[0]);
        pthread_join(th, NULL);
        EXPECT(cl.saw_tmp, "no temp file visible during the save");
        EXPECT(cl.rc == 0, "cleanup during a save removed %d files", cl.rc);
        EXPECT(src == -ECANCELED, "save rc %d: %s", src, sj.error.msg);
        n = list_dir(dir_fd, listing, sizeof listing);
        EXPECT(n == 5, "left: %s", listing);
    }
out:
    if (held >= 0)
        close(held);
    remove_dir(dir_fd, path);
    case_end();
}

/* ------------------------------------------------------------------ */
/* Invalid arguments                                                   */

static void bad_arg_case(const char *what, const char *name, void (*tweak)(struct fs_save_opts *))
{
    char path[64], dom[64], listing[256];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    struct fs_save_opts o;
    struct fs_job job;
    case_begin("bad argument: %s", what);
    SETUP(dir_fd >= 0);
    fill_opts(&o, 3, FS_MODE_ZSTD, 1, 1, 0, CH, 0, 0, 1, dom);
    tweak(&o);
    memset(&job, 0, sizeof job);
    int rc = run_save(g_content[C_TEXT], 1000, IN_PIPE, dir_fd, name, &o, &job, 1);
    EXPECT(rc == -EINVAL, "rc %d (%s)", rc, job.error.msg);
    EXPECT(job.error.kind == FS_ERR_ARG, "kind %s: %s", kind_name(job.error.kind), job.error.msg);
    EXPECT(job.error.msg[0] != 0, "no message");
    EXPECT(list_dir(dir_fd, listing, sizeof listing) == 0, "left: %s", listing);
out:
    remove_dir(dir_fd, path);
    case_end();
}

static void t_none(struct fs_save_opts *o) { (void)o; }
static void t_chunk1000(struct fs_save_opts *o) { o->chunk_size = 1000; }
static void t_chunk_unaligned(struct fs_save_opts *o) { o->chunk_size = CH + 1; }
static void t_chunk_small(struct fs_save_opts *o) { o->chunk_size = 60 * KIB; }
static void t_chunk_huge(struct fs_save_opts *o) { o->chunk_size = 128u << 20; }
static void t_xml_nul(struct fs_save_opts *o)
{
    static const char x[] = "<domain>\0</domain>";
    o->xml = x;
    o->xml_len = sizeof x - 1;
}
static void t_xml_null(struct fs_save_opts *o)
{
    o->xml = NULL;
    o->xml_len = 10;
}
static void t_mode(struct fs_save_opts *o) { o->mode = 3; }
static void t_mode_neg(struct fs_save_opts *o) { o->mode = -1; }
static void t_threads0(struct fs_save_opts *o) { o->threads = 0; }
static void t_threads257(struct fs_save_opts *o) { o->threads = 257; }
static void t_level(struct fs_save_opts *o) { o->level = 1000; }
static void t_version(struct fs_save_opts *o)
{
    o->version = "0123456789012345678901234567890123456789012345678901234567890123";
}
static void t_dom_name(struct fs_save_opts *o) { o->name_len = FS_NAME_MAX; }

static void group_args(void)
{
    char long_name[202];
    memset(long_name, 'n', 201);
    long_name[201] = 0;
    bad_arg_case("chunk_size 1000", "a.sav", t_chunk1000);
    bad_arg_case("chunk_size 64K+1", "a.sav", t_chunk_unaligned);
    bad_arg_case("chunk_size 60K", "a.sav", t_chunk_small);
    bad_arg_case("chunk_size 128M", "a.sav", t_chunk_huge);
    bad_arg_case("name with /", "sub/a.sav", t_none);
    bad_arg_case("name ..", "..", t_none);
    bad_arg_case("name .", ".", t_none);
    bad_arg_case("empty name", "", t_none);
    bad_arg_case("NULL name", NULL, t_none);
    bad_arg_case("201-byte name", long_name, t_none);
    bad_arg_case("temp-file-like name", "x.fastsave-tmp-1-2", t_none);
    bad_arg_case("xml with NUL", "a.sav", t_xml_nul);
    bad_arg_case("xml NULL with length", "a.sav", t_xml_null);
    bad_arg_case("mode 3", "a.sav", t_mode);
    bad_arg_case("mode -1", "a.sav", t_mode_neg);
    bad_arg_case("threads 0", "a.sav", t_threads0);
    bad_arg_case("threads 257", "a.sav", t_threads257);
    bad_arg_case("level 1000", "a.sav", t_level);
    bad_arg_case("version 64 bytes", "a.sav", t_version);
    bad_arg_case("domain name 1024 bytes", "a.sav", t_dom_name);

    /* the limits themselves are accepted */
    char path[64], dom[64];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    case_begin("arguments at their limits");
    SETUP(dir_fd >= 0);
    struct fs_save_opts o;
    struct fs_job job;
    long_name[200] = 0;
    fill_opts(&o, 4, FS_MODE_AUTO, 1, 1, 0, 4096 * 16, 0, 0, 0, dom);
    o.level = -7;
    o.version = "012345678901234567890123456789012345678901234567890123456789012";
    static char dname[FS_NAME_MAX];
    memset(dname, 'd', FS_NAME_MAX - 1);
    o.name = dname;
    o.name_len = FS_NAME_MAX - 1;
    memset(&job, 0, sizeof job);
    int rc = run_save(g_content[C_TEXT], 5000, IN_PIPE, dir_fd, long_name, &o, &job, 1);
    EXPECT(rc == 0, "rc %d: %s", rc, job.error.msg);
    if (rc == 0) {
        int fd = openat(dir_fd, long_name, O_RDONLY | O_CLOEXEC);
        struct fs_image_info info;
        memset(&job, 0, sizeof job);
        rc = fs_inspect(fd, &info, &job);
        EXPECT(rc == 0 && info.name_len == FS_NAME_MAX - 1 && strlen(info.name) == FS_NAME_MAX - 1 &&
                   strcmp(info.version, o.version) == 0 && info.level == -7,
               "inspect rc %d name_len %u version '%s' level %d", rc, info.name_len, info.version, info.level);
        struct fs_restore_opts ro = {.threads = 1};
        struct rres r = run_restore(fd, g_content[C_TEXT], 5000, OUT_PIPE, &ro, &job);
        EXPECT(r.rc == 0 && r.got == 5000 && !r.mismatch, "restore rc %d got %zu", r.rc, r.got);
        close(fd);
    }
out:
    remove_dir(dir_fd, path);
    case_end();
}

/* ------------------------------------------------------------------ */
/* Miscellaneous                                                       */

static void misc_not_images(void)
{
    char path[64];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    struct fs_restore_opts ro = {.threads = 1};
    struct fs_job job;
    struct fs_image_info info;
    int fd, rc;

    case_begin("restore of things that are not images");
    SETUP(dir_fd >= 0);
    fd = write_file(dir_fd, "empty", (const uint8_t *)"", 0);
    SETUP(fd >= 0);
    memset(&job, 0, sizeof job);
    rc = fs_restore(fd, -1, &ro, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_TRUNCATED, "empty file: rc %d kind %s", rc, kind_name(job.error.kind));
    close(fd);

    fd = write_file(dir_fd, "noise", g_content[C_RANDOM], 10000);
    SETUP(fd >= 0);
    memset(&job, 0, sizeof job);
    rc = fs_restore(fd, -1, &ro, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_NOT_IMAGE, "noise: rc %d kind %s", rc, kind_name(job.error.kind));
    memset(&job, 0, sizeof job);
    rc = fs_inspect(fd, &info, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_NOT_IMAGE, "inspect noise: rc %d kind %s", rc, kind_name(job.error.kind));
    close(fd);

    fd = write_file(dir_fd, "short", g_content[C_RANDOM], 50);
    SETUP(fd >= 0);
    memset(&job, 0, sizeof job);
    rc = fs_restore(fd, -1, &ro, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_NOT_IMAGE, "50 noise bytes: rc %d kind %s", rc, kind_name(job.error.kind));
    close(fd);

    uint8_t part[8192] = "LibvirtQemudPart";
    fd = write_file(dir_fd, "partial", part, sizeof part);
    SETUP(fd >= 0);
    memset(&job, 0, sizeof job);
    rc = fs_restore(fd, -1, &ro, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_CORRUPT, "libvirt partial: rc %d kind %s", rc, kind_name(job.error.kind));
    close(fd);

    /* a libvirt save of another tool: right magic, no trailer */
    uint8_t other[8192] = "LibvirtQemudSave";
    uint32_t w[5] = {2, 4096 - LV_HEADER, 1, 0, 0};
    memcpy(other + 16, w, sizeof w);
    fd = write_file(dir_fd, "foreign", other, sizeof other);
    SETUP(fd >= 0);
    memset(&job, 0, sizeof job);
    rc = fs_restore(fd, -1, &ro, &job);
    EXPECT(rc < 0 && (job.error.kind == FS_ERR_TRUNCATED || job.error.kind == FS_ERR_CORRUPT),
           "foreign libvirt save: rc %d kind %s", rc, kind_name(job.error.kind));
    close(fd);

    int fds[2];
    SETUP(pipe2(fds, O_CLOEXEC) == 0);
    memset(&job, 0, sizeof job);
    rc = fs_restore(fds[0], -1, &ro, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_NOT_IMAGE, "pipe: rc %d kind %s", rc, kind_name(job.error.kind));
    close(fds[0]);
    close(fds[1]);
    memset(&job, 0, sizeof job);
    rc = fs_restore(-1, -1, &ro, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_IO, "fd -1: rc %d kind %s", rc, kind_name(job.error.kind));
out:
    remove_dir(dir_fd, path);
    case_end();
}

/* XML lengths around the 4 KiB boundary of the payload offset. */
static void misc_xml_edges(void)
{
    static const uint64_t lens[] = {0, 1, 4002, 4003, 4004, 8099, 8100};
    static char xml[8200];
    for (size_t i = 0; i < sizeof xml; i++)
        xml[i] = "<domain/> "[i % 10];
    for (size_t i = 0; i < sizeof lens / sizeof *lens; i++) {
        char dom[64];
        struct fs_save_opts o;
        struct fs_job job;
        struct fs_image_info info;
        case_begin("xml_len %llu", (unsigned long long)lens[i]);
        fill_opts(&o, 20 + (int)i, FS_MODE_ZSTD, 1, 1, 0, CH, 0, 0, 0, dom);
        o.xml = lens[i] ? xml : NULL;
        o.xml_len = lens[i];
        memset(&job, 0, sizeof job);
        int rc = run_save(g_content[C_MIXED], 3 * CH, IN_PIPE, g_tmp_dir, "xml.sav", &o, &job, 2);
        EXPECT(rc == 0, "save rc %d: %s", rc, job.error.msg);
        int fd = openat(g_tmp_dir, "xml.sav", O_RDONLY | O_CLOEXEC);
        if (rc == 0 && fd >= 0) {
            memset(&job, 0, sizeof job);
            rc = fs_inspect(fd, &info, &job);
            uint64_t want = align_up(LV_HEADER + lens[i] + 1, 4096);
            EXPECT(rc == 0 && info.xml_len == lens[i] && info.payload_offset == want,
                   "inspect rc %d xml_len %llu payload %llu want %llu", rc, (unsigned long long)info.xml_len,
                   (unsigned long long)info.payload_offset, (unsigned long long)want);
            struct fs_restore_opts ro = {.threads = 2, .direct = 1};
            struct rres r = run_restore(fd, g_content[C_MIXED], 3 * CH, OUT_PIPE, &ro, &job);
            EXPECT(r.rc == 0 && r.got == 3 * CH && !r.mismatch, "restore rc %d got %zu: %s", r.rc, r.got,
                   job.error.msg);
        }
        if (fd >= 0)
            close(fd);
        unlinkat(g_tmp_dir, "xml.sav", 0);
        case_end();
    }
}

struct concurrent {
    int content;
    int rc;
    struct fs_job job;
};

static void *concurrent_main(void *arg)
{
    struct concurrent *c = arg;
    char dom[64];
    struct fs_save_opts o;
    fill_opts(&o, 30 + c->content, c->content == C_TEXT ? FS_MODE_ZSTD : FS_MODE_RAW, 1, 2, 0, CH, 1, 0, 1, dom);
    memset(&c->job, 0, sizeof c->job);
    c->rc = run_save(g_content[c->content], 3 * (size_t)BIG_CH, IN_PIPE, g_var_dir, "same.sav", &o, &c->job,
                     (uint64_t)c->content);
    return NULL;
}

/* Two saves to one name at once: both succeed, the survivor is whole. */
static void misc_concurrent_same_name(void)
{
    struct concurrent a = {.content = C_TEXT}, b = {.content = C_RANDOM};
    pthread_t ta, tb;
    char listing[256];
    case_begin("concurrent saves to the same name");
    pthread_create(&ta, NULL, concurrent_main, &a);
    pthread_create(&tb, NULL, concurrent_main, &b);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    EXPECT(a.rc == 0 && b.rc == 0, "rc %d (%s) and %d (%s)", a.rc, a.job.error.msg, b.rc, b.job.error.msg);
    int n = list_dir(g_var_dir, listing, sizeof listing);
    EXPECT(n == 1, "directory holds: %s", listing);
    int fd = openat(g_var_dir, "same.sav", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        struct fs_image_info info;
        struct fs_job job;
        memset(&job, 0, sizeof job);
        int rc = fs_inspect(fd, &info, &job);
        EXPECT(rc == 0, "inspect: %s", job.error.msg);
        const uint8_t *want = info.codec == FS_CODEC_ZSTD ? g_content[C_TEXT] : g_content[C_RANDOM];
        struct fs_restore_opts ro = {.threads = 2};
        struct rres r = run_restore(fd, want, 3 * (size_t)BIG_CH, OUT_PIPE, &ro, &job);
        EXPECT(r.rc == 0 && r.got == 3 * (size_t)BIG_CH && !r.mismatch, "survivor restore rc %d got %zu mismatch %d",
               r.rc, r.got, r.mismatch);
        close(fd);
    } else {
        EXPECT(fd >= 0, "no image");
    }
    unlinkat(g_var_dir, "same.sav", 0);
    case_end();
}

/* The consumer goes away mid-restore: EPIPE, no hang, no crash. */
static void misc_consumer_gone(void)
{
    char dom[64];
    struct fs_save_opts o;
    struct fs_job job;
    size_t len = 4 * (size_t)BIG_CH;
    case_begin("restore into a pipe whose reader closed");
    fill_opts(&o, 40, FS_MODE_AUTO, 1, 2, 0, CH, 0, 0, 0, dom);
    memset(&job, 0, sizeof job);
    int rc = run_save(g_content[C_MIXED], len, IN_PIPE, g_tmp_dir, "epipe.sav", &o, &job, 3);
    EXPECT(rc == 0, "save: %s", job.error.msg);
    int fd = openat(g_tmp_dir, "epipe.sav", O_RDONLY | O_CLOEXEC);
    int fds[2];
    if (rc == 0 && fd >= 0 && pipe2(fds, O_CLOEXEC) == 0) {
        close(fds[0]);
        struct fs_restore_opts ro = {.threads = 2};
        memset(&job, 0, sizeof job);
        rc = fs_restore(fd, fds[1], &ro, &job);
        EXPECT(rc == -EPIPE && job.error.kind == FS_ERR_IO, "rc %d kind %s: %s", rc, kind_name(job.error.kind),
               job.error.msg);
        close(fds[1]);
    }
    if (fd >= 0)
        close(fd);
    unlinkat(g_tmp_dir, "epipe.sav", 0);
    case_end();
}

/* Save fails when the stream cannot be read: no file is left. */
static void misc_bad_input(void)
{
    char path[64], dom[64], listing[256];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    struct fs_save_opts o;
    struct fs_job job;
    case_begin("save from an unreadable input");
    SETUP(dir_fd >= 0);
    fill_opts(&o, 50, FS_MODE_ZSTD, 1, 1, 0, CH, 0, 0, 0, dom);
    int wfd = openat(dir_fd, "wo", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(wfd >= 0);
    memset(&job, 0, sizeof job);
    int rc = fs_save(wfd, dir_fd, "bad.sav", &o, &job);
    close(wfd);
    unlinkat(dir_fd, "wo", 0);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_IO, "rc %d kind %s: %s", rc, kind_name(job.error.kind), job.error.msg);
    EXPECT(list_dir(dir_fd, listing, sizeof listing) == 0, "left: %s", listing);
out:
    remove_dir(dir_fd, path);
    case_end();
}

/* The image cannot be written (file size limit): the save fails cleanly. */
static void write_error_case(int mode, int splice, int direct, int threads)
{
    char path[64], dom[64], listing[256];
    int dir_fd = make_dir(direct ? "/var/tmp" : "/tmp", path, sizeof path);
    struct fs_save_opts o;
    struct fs_job job;
    struct rlimit old, lim;
    int limited = 0;
    case_begin("write error (EFBIG) %s splice=%d direct=%d threads=%d", mode_name(mode), splice, direct, threads);
    SETUP(dir_fd >= 0);
    fill_opts(&o, 60, mode, 1, threads, direct, CH, splice, 0, 1, dom);
    SETUP(getrlimit(RLIMIT_FSIZE, &old) == 0);
    lim = old;
    lim.rlim_cur = 300 * KIB;
    SETUP(setrlimit(RLIMIT_FSIZE, &lim) == 0);
    limited = 1;
    memset(&job, 0, sizeof job);
    double t0 = now_s();
    int rc = run_save(g_content[C_RANDOM], 4 * (size_t)BIG_CH, IN_PIPE, dir_fd, "big.sav", &o, &job, 7);
    double dt = now_s() - t0;
    setrlimit(RLIMIT_FSIZE, &old);
    limited = 0;
    EXPECT(rc == -EFBIG && job.error.kind == FS_ERR_IO, "rc %d kind %s: %s", rc, kind_name(job.error.kind),
           job.error.msg);
    EXPECT(dt < 5.0, "took %.1f s", dt);
    EXPECT(list_dir(dir_fd, listing, sizeof listing) == 0, "left: %s", listing);
out:
    if (limited)
        setrlimit(RLIMIT_FSIZE, &old);
    remove_dir(dir_fd, path);
    case_end();
}

static void group_errors(void)
{
    double t0 = now_s();
    signal(SIGXFSZ, SIG_IGN);
    write_error_case(FS_MODE_RAW, 0, 0, 1);
    write_error_case(FS_MODE_RAW, 1, 0, 1);
    write_error_case(FS_MODE_RAW, 0, 1, 1);
    write_error_case(FS_MODE_ZSTD, 0, 0, 3);
    write_error_case(FS_MODE_ZSTD, 0, 1, 2);
    write_error_case(FS_MODE_AUTO, 0, 0, 2);
    printf("errors: %.1f s\n", now_s() - t0);
}

/* Thread counts beyond the cores, big slot rings, tmpfs (O_DIRECT may be refused). */
static void misc_odd_settings(void)
{
    static const struct {
        const char *base;
        int mode, threads, direct, rthreads;
        uint32_t slots;
    } cases[] = {
        {"/tmp", FS_MODE_ZSTD, 16, 0, 16, 0},
        {"/tmp", FS_MODE_AUTO, 8, 0, 0, 64},
        {"/tmp", FS_MODE_AUTO, 1, 0, 0, 2},
        {"/dev/shm", FS_MODE_ZSTD, 2, 1, 2, 0},
        {"/dev/shm", FS_MODE_RAW, 1, 1, 1, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char path[64], dom[64];
        int dir_fd = make_dir(cases[i].base, path, sizeof path);
        struct fs_save_opts o;
        struct fs_job job;
        size_t len = 3 * (size_t)BIG_CH + 5;
        case_begin("%s %s threads=%d direct=%d restore threads=%d slots=%u", cases[i].base,
                   mode_name(cases[i].mode), cases[i].threads, cases[i].direct, cases[i].rthreads, cases[i].slots);
        SETUP(dir_fd >= 0);
        fill_opts(&o, 70 + (int)i, cases[i].mode, 1, cases[i].threads, cases[i].direct, CH, 1, cases[i].slots, 1, dom);
        memset(&job, 0, sizeof job);
        int rc = run_save(g_content[C_MIXED], len, IN_PIPE, dir_fd, "odd.sav", &o, &job, 8);
        EXPECT(rc == 0, "save rc %d: %s", rc, job.error.msg);
        char listing[256];
        int n = list_dir(dir_fd, listing, sizeof listing);
        EXPECT(n == 1, "the directory holds: %s", listing);
        if (rc == 0) {
            int fd = openat(dir_fd, "odd.sav", O_RDONLY | O_CLOEXEC);
            struct fs_restore_opts ro = {.threads = cases[i].rthreads, .direct = cases[i].direct,
                                         .slots = cases[i].slots};
            struct rres r = run_restore(fd, g_content[C_MIXED], len, OUT_PIPE, &ro, &job);
            EXPECT(r.rc == 0 && r.got == len && !r.mismatch, "restore rc %d got %zu: %s", r.rc, r.got,
                   job.error.msg);
            close(fd);
        }
    out:
        remove_dir(dir_fd, path);
        case_end();
    }
}

/* direct=1 where O_DIRECT is refused (ramfs): the save falls back to the
 * page cache and leaves nothing but the image. Runs in a child with its own
 * mount namespace so the mount vanishes with it; skipped without privileges. */
static int g_skipped;

static void misc_no_odirect(void)
{
    char path[96];
    snprintf(path, sizeof path, "%s/ramfs", g_tmp_path);
    case_begin("direct=1 on a filesystem without O_DIRECT (ramfs)");
    if (mkdir(path, 0700) != 0) {
        fail_at(__LINE__, "mkdir", "%s", strerror(errno));
        case_end();
        return;
    }
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        if (unshare(CLONE_NEWNS) != 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0 ||
            mount("none", path, "ramfs", 0, "mode=0700") != 0)
            _exit(77);
        int dir_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        char dom[64], listing[512];
        struct fs_save_opts o;
        struct fs_job job;
        size_t len = 2 * (size_t)CH + 17;
        for (int mode = FS_MODE_RAW; mode <= FS_MODE_ZSTD; mode++) {
            fill_opts(&o, 80 + mode, mode, 1, 2, 1, CH, 1, 0, 1, dom);
            memset(&job, 0, sizeof job);
            int rc = run_save(g_content[C_TEXT], len, IN_PIPE, dir_fd, "ram.sav", &o, &job, 9);
            EXPECT(rc == 0, "%s save rc %d: %s", mode_name(mode), rc, job.error.msg);
            EXPECT(job.stats.direct == 0, "%s: stats.direct %u on ramfs", mode_name(mode), job.stats.direct);
            int n = list_dir(dir_fd, listing, sizeof listing);
            EXPECT(n == 1, "%s: the directory holds %d entries: %s", mode_name(mode), n, listing);
            int fd = openat(dir_fd, "ram.sav", O_RDONLY | O_CLOEXEC);
            struct fs_restore_opts ro = {.threads = 1, .direct = 1};
            struct rres r = run_restore(fd, g_content[C_TEXT], len, OUT_PIPE, &ro, &job);
            EXPECT(r.rc == 0 && r.got == len && !r.mismatch, "%s restore rc %d got %zu: %s", mode_name(mode),
                   r.rc, r.got, job.error.msg);
            close(fd);
            empty_dir(dir_fd);
        }
        fflush(stderr);
        _exit(g_case_failed ? 1 : 0);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid)
        fail_at(__LINE__, "fork", "%s", strerror(errno));
    else if (WIFEXITED(status) && WEXITSTATUS(status) == 77) {
        printf("  SKIP %s: cannot mount ramfs here\n", g_case);
        g_skipped++;
        rmdir(path);
        g_case_open = 0;
        return;
    } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_at(__LINE__, "child", "failed (status 0x%x)", status);
    rmdir(path);
    case_end();
}

static void group_misc(void)
{
    double t0 = now_s();
    misc_not_images();
    misc_xml_edges();
    misc_concurrent_same_name();
    misc_consumer_gone();
    misc_bad_input();
    misc_odd_settings();
    misc_no_odirect();
    printf("misc: %.1f s\n", now_s() - t0);
}

/* ------------------------------------------------------------------ */
/* Limits                                                              */

/* A refused option: FS_ERR_ARG, -EINVAL, nothing left behind, and a message
 * naming both the value and the limit. */
static void limit_arg_case(const char *what, void (*tweak)(struct fs_save_opts *), const char *value,
                           const char *limit)
{
    char path[64], dom[64], listing[256];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    struct fs_save_opts o;
    struct fs_job job;
    case_begin("limit: save %s", what);
    SETUP(dir_fd >= 0);
    fill_opts(&o, 5, FS_MODE_ZSTD, 1, 1, 0, CH, 0, 0, 1, dom);
    tweak(&o);
    memset(&job, 0, sizeof job);
    int rc = run_save(g_content[C_TEXT], 1000, IN_PIPE, dir_fd, "a.sav", &o, &job, 1);
    EXPECT(rc == -EINVAL && job.error.kind == FS_ERR_ARG, "rc %d kind %s: %s", rc,
           kind_name(job.error.kind), job.error.msg);
    EXPECT(strstr(job.error.msg, value) && strstr(job.error.msg, limit),
           "message does not name %s and %s: %s", value, limit, job.error.msg);
    EXPECT(list_dir(dir_fd, listing, sizeof listing) == 0, "left: %s", listing);
out:
    remove_dir(dir_fd, path);
    case_end();
}

static void t_threads_huge(struct fs_save_opts *o) { o->threads = 100000; }
static void t_chunk_max1(struct fs_save_opts *o) { o->chunk_size = FS_CHUNK_SIZE_MAX + 4096; }
static void t_slots_huge(struct fs_save_opts *o) { o->slots = 100000; }
static void t_slots_memory(struct fs_save_opts *o)
{
    o->chunk_size = FS_CHUNK_SIZE_MAX;
    o->slots = 64;                    /* 64 x (64 MiB + its compress bound) */
}
static void t_level_memory(struct fs_save_opts *o)
{
    o->chunk_size = FS_CHUNK_SIZE_MAX;
    o->level = 22;                    /* ~640 MiB of zstd state besides three 128 MiB slots */
}
static void t_level_value(struct fs_save_opts *o) { o->level = 1000; }
static void t_xml_huge(struct fs_save_opts *o)
{
    o->xml = g_xml_long;              /* the length is refused before the bytes are read */
    o->xml_len = (uint64_t)FS_XML_MAX + 1;
}

/* Saves `len` bytes with these settings and restores them with `ro`;
 * returns the save's and the restore's worker counts through the pointers. */
static void big_chunk_roundtrip(const char *what, int mode, int threads, uint32_t slots,
                                const struct fs_restore_opts *ro, uint32_t *saved_threads,
                                uint32_t *restored_threads)
{
    char path[64], dom[64];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    struct fs_save_opts o;
    struct fs_job job;
    size_t len = 2 * (size_t)BIG_CH + 77;
    case_begin("limit: %s", what);
    SETUP(dir_fd >= 0);
    fill_opts(&o, 6, mode, 1, threads, 0, FS_CHUNK_SIZE_MAX, 0, slots, 1, dom);
    memset(&job, 0, sizeof job);
    int rc = run_save(g_content[C_MIXED], len, IN_PIPE, dir_fd, "big.sav", &o, &job, 2);
    EXPECT(rc == 0, "save rc %d: %s", rc, job.error.msg);
    *saved_threads = job.stats.threads;
    if (rc == 0) {
        int fd = openat(dir_fd, "big.sav", O_RDONLY | O_CLOEXEC);
        struct rres r = run_restore(fd, g_content[C_MIXED], len, OUT_PIPE, ro, &job);
        EXPECT(r.rc == 0 && r.got == len && !r.mismatch, "restore rc %d got %zu: %s", r.rc, r.got,
               job.error.msg);
        *restored_threads = job.stats.threads;
        close(fd);
    }
out:
    remove_dir(dir_fd, path);
    case_end();
}

/* Writes a copy of `img` whose metadata claims `count` chunks of CH bytes,
 * with an index frame of the size that count implies, as a sparse file.
 * Header, metadata and trailer checksums are right, so only a limit (or the
 * checksum of the all-zero index) can refuse it. Returns the fd or -1. */
static int craft_sparse(int dir_fd, const char *name, const uint8_t *img, const struct layout *L,
                        uint64_t count)
{
    uint64_t index_len = 24 + count * 24 + 8;
    uint64_t trailer_at = L->index + index_len;
    uint8_t *head = malloc(L->index);
    uint8_t idx[24], tail[TRAILER];
    if (!head)
        return -1;
    memcpy(head, img, L->index);
    uint8_t *c = head + L->meta + 8;
    uint32_t clen = get32(head + L->meta + 4);
    uint64_t stream_len = count * CH;
    for (int i = 0; i < 8; i++)
        c[40 + i] = (uint8_t)(stream_len >> (8 * i));
    uint64_t h = XXH3_64bits(c, clen - 8);
    for (int i = 0; i < 8; i++)
        c[clen - 8 + i] = (uint8_t)(h >> (8 * i));
    fs_put32(idx, 0x184D2A5Eu);
    fs_put32(idx + 4, (uint32_t)(index_len - 8));
    memcpy(idx + 8, "FSV-INDX", 8);
    fs_put64(idx + 16, count);
    memcpy(tail, img + L->trailer, TRAILER);
    fs_put64(tail + 8 + 32, trailer_at);
    fs_put64(tail + 8, XXH3_64bits(tail + 16, TRAILER - 16));
    int fd = openat(dir_fd, name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int ok = fd >= 0 && pwrite(fd, head, L->index, 0) == (ssize_t)L->index &&
             pwrite(fd, idx, sizeof idx, (off_t)L->index) == (ssize_t)sizeof idx &&
             ftruncate(fd, (off_t)(trailer_at + TRAILER)) == 0 &&
             pwrite(fd, tail, TRAILER, (off_t)trailer_at) == TRAILER;
    free(head);
    if (!ok && fd >= 0) {
        close(fd);
        fd = -1;
    }
    return fd;
}

static void limits_sparse_index(void)
{
    char path[64], dom[64];
    int dir_fd = make_dir("/var/tmp", path, sizeof path);
    struct fs_save_opts o;
    struct fs_job job;
    struct layout L = {0};
    uint8_t *img = NULL;
    size_t size = 0;
    case_begin("limit: sparse images claiming too many chunks");
    SETUP(dir_fd >= 0);
    fill_opts(&o, 7, FS_MODE_ZSTD, 1, 1, 0, CH, 0, 0, 1, dom);
    memset(&job, 0, sizeof job);
    SETUP(run_save(g_content[C_TEXT], 3 * CH, IN_PIPE, dir_fd, "seed.sav", &o, &job, 3) == 0);
    int seed_fd = openat(dir_fd, "seed.sav", O_RDONLY | O_CLOEXEC);
    SETUP(seed_fd >= 0);
    img = read_all(seed_fd, &size);
    close(seed_fd);
    SETUP(img && parse_layout(img, size, &L) == 0);

    /* far beyond the limit (4 GB of index in a sparse file), just beyond it */
    static const uint64_t over[] = {170000000ull, (uint64_t)FS_CHUNKS_MAX + 1};
    for (size_t i = 0; i < sizeof over / sizeof *over; i++) {
        int fd = craft_sparse(dir_fd, "sparse.sav", img, &L, over[i]);
        SETUP(fd >= 0);
        char count[32];
        snprintf(count, sizeof count, "%llu", (unsigned long long)over[i]);
        struct fs_image_info info;
        double t0 = now_s();
        memset(&job, 0, sizeof job);
        int rc = fs_inspect(fd, &info, &job);
        EXPECT(rc == -EBADMSG && job.error.kind == FS_ERR_CORRUPT, "inspect of %s chunks: rc %d kind %s: %s",
               count, rc, kind_name(job.error.kind), job.error.msg);
        EXPECT(strstr(job.error.msg, count) && strstr(job.error.msg, "16777216"),
               "message names neither %s chunks nor the limit: %s", count, job.error.msg);
        struct fs_restore_opts ro = {.threads = 2};
        memset(&job, 0, sizeof job);
        rc = fs_restore(fd, -1, &ro, &job);
        EXPECT(rc == -EBADMSG && job.error.kind == FS_ERR_CORRUPT && strstr(job.error.msg, "16777216"),
               "verify of %s chunks: rc %d kind %s: %s", count, rc, kind_name(job.error.kind), job.error.msg);
        /* refused from the metadata alone: no 400 MB .. 4 GB of index read */
        EXPECT(now_s() - t0 < 2.0, "took %.1f s", now_s() - t0);
        close(fd);
        unlinkat(dir_fd, "sparse.sav", 0);
    }

    /* at the limit the index is read (and its zeros fail their checksum) */
    int fd = craft_sparse(dir_fd, "sparse.sav", img, &L, FS_CHUNKS_MAX);
    SETUP(fd >= 0);
    struct fs_image_info info;
    memset(&job, 0, sizeof job);
    int rc = fs_inspect(fd, &info, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_CORRUPT && strstr(job.error.msg, "index checksum"),
           "inspect at the limit: rc %d kind %s: %s", rc, kind_name(job.error.kind), job.error.msg);
    close(fd);
    unlinkat(dir_fd, "sparse.sav", 0);
out:
    free(img);
    free_layout(&L);
    remove_dir(dir_fd, path);
    case_end();
}

/* Values the reader finds in metadata (behind a valid checksum) that no
 * writer writes: named in the error. */
static void limits_meta_values(void)
{
    char path[64], dom[64];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    struct fs_save_opts o;
    struct fs_job job;
    struct layout L = {0};
    uint8_t *img = NULL;
    size_t size = 0;
    case_begin("limit: metadata chunk size and level out of range");
    SETUP(dir_fd >= 0);
    fill_opts(&o, 8, FS_MODE_ZSTD, 3, 1, 0, CH, 0, 0, 1, dom);
    memset(&job, 0, sizeof job);
    SETUP(run_save(g_content[C_TEXT], 1000, IN_PIPE, dir_fd, "seed.sav", &o, &job, 3) == 0);
    int seed_fd = openat(dir_fd, "seed.sav", O_RDONLY | O_CLOEXEC);
    SETUP(seed_fd >= 0);
    img = read_all(seed_fd, &size);
    close(seed_fd);
    SETUP(img && parse_layout(img, size, &L) == 0);
    static const struct {
        uint32_t at, value;
        const char *want;
    } cases[] = {
        {24, 128u << 20, "chunk size 134217728"},
        {24, 1000, "chunk size 1000"},
        {20, 1000, "level 1000"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        uint8_t *copy = malloc(size);
        SETUP(copy != NULL);
        memcpy(copy, img, size);
        uint8_t *c = copy + L.meta + 8;
        uint32_t clen = get32(copy + L.meta + 4);
        fs_put32(c + cases[i].at, cases[i].value);
        fs_put64(c + clen - 8, XXH3_64bits(c, clen - 8));
        int fd = write_file(dir_fd, "bad.sav", copy, size);
        free(copy);
        SETUP(fd >= 0);
        struct fs_image_info info;
        memset(&job, 0, sizeof job);
        int rc = fs_inspect(fd, &info, &job);
        EXPECT(rc == -EBADMSG && job.error.kind == FS_ERR_CORRUPT && strstr(job.error.msg, cases[i].want),
               "%s: rc %d kind %s: %s", cases[i].want, rc, kind_name(job.error.kind), job.error.msg);
        close(fd);
    }
out:
    free(img);
    free_layout(&L);
    remove_dir(dir_fd, path);
    case_end();
}

static void limits_restore_args(void)
{
    char path[64], dom[64];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    struct fs_save_opts o;
    struct fs_job job;
    case_begin("limit: restore threads and slots");
    SETUP(dir_fd >= 0);
    fill_opts(&o, 9, FS_MODE_ZSTD, 1, 1, 0, CH, 0, 0, 1, dom);
    memset(&job, 0, sizeof job);
    SETUP(run_save(g_content[C_TEXT], 1000, IN_PIPE, dir_fd, "a.sav", &o, &job, 3) == 0);
    int fd = openat(dir_fd, "a.sav", O_RDONLY | O_CLOEXEC);
    SETUP(fd >= 0);
    static const struct {
        int threads;
        uint32_t slots;
        const char *value, *limit;
    } cases[] = {
        {-3, 0, "-3", "256"},
        {257, 0, "257", "256"},
        {1, 100000, "100000", "4096"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        struct fs_restore_opts ro = {.threads = cases[i].threads, .slots = cases[i].slots};
        memset(&job, 0, sizeof job);
        int rc = fs_restore(fd, -1, &ro, &job);
        EXPECT(rc == -EINVAL && job.error.kind == FS_ERR_ARG && strstr(job.error.msg, cases[i].value) &&
                   strstr(job.error.msg, cases[i].limit),
               "threads %d slots %u: rc %d kind %s: %s", cases[i].threads, cases[i].slots, rc,
               kind_name(job.error.kind), job.error.msg);
    }
    close(fd);
out:
    remove_dir(dir_fd, path);
    case_end();
}

/* The index builder stops at its limit with -EFBIG and a message naming it. */
static void limits_index_builder(void)
{
    struct fs_index_build b;
    struct fs_job job;
    case_begin("limit: index builder at FS_CHUNKS_MAX");
    fs_index_init(&b);
    EXPECT(b.max == FS_CHUNKS_MAX, "max %llu", (unsigned long long)b.max);
    b.max = 3;
    for (int i = 0; i < 3; i++)
        EXPECT(fs_index_add(&b, CH, CH, 0, 0, (uint64_t)i) == 0, "add %d", i);
    EXPECT(fs_index_add(&b, CH, CH, 0, 0, 9) == -EFBIG, "a fourth chunk was accepted");
    EXPECT(b.count == 3 && b.cap <= 3, "count %llu cap %llu", (unsigned long long)b.count,
           (unsigned long long)b.cap);
    memset(&job, 0, sizeof job);
    int rc = fs_index_fail(&b, -EFBIG, CH, &job);
    EXPECT(rc == -EFBIG && job.error.kind == FS_ERR_ARG && strstr(job.error.msg, "3 chunks of 65536"),
           "rc %d kind %s: %s", rc, kind_name(job.error.kind), job.error.msg);
    fs_index_free(&b);
    case_end();
}

static void group_limits(void)
{
    double t0 = now_s();
    limit_arg_case("threads 100000", t_threads_huge, "100000", "256");
    limit_arg_case("chunk_size 64 MiB + 4096", t_chunk_max1, "67112960", "67108864");
    limit_arg_case("slots 100000", t_slots_huge, "100000", "4096");
    limit_arg_case("64 slots of 64 MiB", t_slots_memory, "slots 64", "1024 MiB");
    limit_arg_case("level 22 with 64 MiB chunks", t_level_memory, "level 22", "1024 MiB");
    limit_arg_case("level 1000", t_level_value, "1000", "22");
    limit_arg_case("XML over 64 MiB", t_xml_huge, "67108865", "67108864");

    /* many threads with the largest chunks: fewer workers, within the budget */
    uint32_t saved = 0, restored = 0;
    struct fs_restore_opts ro = {.threads = FS_THREADS_MAX};
    big_chunk_roundtrip("256 threads with 64 MiB chunks (zstd)", FS_MODE_ZSTD, FS_THREADS_MAX, 0, &ro,
                        &saved, &restored);
    case_begin("limit: worker counts within FS_BUFFERS_MAX");
    EXPECT(saved >= 1 && saved <= 6, "save used %u workers", saved);
    EXPECT(restored >= 1 && restored <= 6, "restore used %u workers", restored);
    case_end();
    ro.threads = 4;
    ro.direct = 1;
    big_chunk_roundtrip("auto, 64 MiB chunks, O_DIRECT restore", FS_MODE_AUTO, 4, 0, &ro, &saved, &restored);
    ro.direct = 0;
    big_chunk_roundtrip("raw, 64 MiB chunks, 8 explicit slots", FS_MODE_RAW, 2, 8, &ro, &saved, &restored);

    limits_restore_args();
    limits_meta_values();
    limits_index_builder();
    limits_sparse_index();
    printf("limits: %.1f s\n", now_s() - t0);
}

/* ------------------------------------------------------------------ */

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "\nwatchdog: the tests hung, giving up\n";
    ssize_t k = write(2, msg, sizeof msg - 1);
    (void)k;
    _exit(3);
}

static const struct {
    const char *name;
    void (*fn)(void);
} groups[] = {
    {"args", group_args},         {"cleanup", group_cleanup}, {"misc", group_misc},
    {"cancel", group_cancel},     {"corrupt", group_corrupt}, {"roundtrip", group_roundtrip},
    {"big", group_big},           {"errors", group_errors},   {"limits", group_limits},
};

int main(int argc, char **argv)
{
    size_t ng = sizeof groups / sizeof *groups;
    for (int i = 1; i < argc; i++) {
        size_t g = 0;
        while (g < ng && strcmp(argv[i], groups[g].name) != 0)
            g++;
        if (g == ng) {
            fprintf(stderr, "usage: %s [group...]\ngroups:", argv[0]);
            for (g = 0; g < ng; g++)
                fprintf(stderr, " %s", groups[g].name);
            fprintf(stderr, "\n");
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    const char *to = getenv("FASTSAVE_TEST_TIMEOUT");
    alarm(to ? (unsigned)atoi(to) : 300);
    setvbuf(stdout, NULL, _IOLBF, 0);

    for (size_t i = 0; i < sizeof g_xml_long - 1; i++)
        g_xml_long[i] = "<domain type='kvm'><devices/></domain>\n"[i % 39];
    make_contents();
    g_tmp_dir = make_dir("/tmp", g_tmp_path, sizeof g_tmp_path);
    g_var_dir = make_dir("/var/tmp", g_var_path, sizeof g_var_path);
    if (g_tmp_dir < 0 || g_var_dir < 0) {
        perror("mkdtemp");
        return 2;
    }
    printf("fastsave C core tests, zstd %u\n", fs_zstd_version());
    double t0 = now_s();
    for (size_t g = 0; g < ng; g++) {
        int run = argc == 1;
        for (int i = 1; i < argc; i++)
            run |= strcmp(argv[i], groups[g].name) == 0;
        if (run)
            groups[g].fn();
    }
    remove_dir(g_tmp_dir, g_tmp_path);
    remove_dir(g_var_dir, g_var_path);
    for (int c = 0; c < C_COUNT; c++)
        free(g_content[c]);
    printf("total %.1f s\n", now_s() - t0);
    if (g_skipped)
        printf("%d skipped\n", g_skipped);
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
