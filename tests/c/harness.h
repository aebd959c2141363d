/* Shared harness of the C core's tests (csrc/): bookkeeping, assertions,
 * the group registry and main (harness.c), and the fixtures several groups
 * use: generated streams, producer and consumer threads, save and restore
 * runners, temp directories, an independent parser of the image layout.
 *
 * Streams are generated in memory, fed to fs_save by a producer thread
 * through a pipe or socket, written back by fs_restore into a pipe (or a
 * socket or a file) and compared byte by byte by a consumer thread.
 *
 * One program runs every group, or only those named on its command line
 * (any other argument prints the list). The last line printed is
 * "N passed, N failed"; the exit status is non-zero when anything failed.
 *
 * Adding a group: create tests/c/test_<name>.c that includes "harness.h",
 * write its cases as case_begin(...) / EXPECT(...) / case_end() (SETUP for
 * the test's own setup, jumping to a label `out:`), and end the file with
 *     TEST_GROUP("<name>", <rank>, <function running the cases>);
 * The Makefile builds every tests/c/test_*.c into the one program, so there
 * is nothing else to edit. The rank orders the groups (run order and the
 * usage list): take one above the highest in use. Helpers only one group
 * needs stay static in its file; move one here when a second group needs it.
 */
#ifndef FASTSAVE_TEST_HARNESS_H
#define FASTSAVE_TEST_HARNESS_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* fastsave.h, through the header that guards it against a second inclusion;
 * also the index builder and fs_put* for the limits group */
#include "fs_internal.h"

#define KIB 1024u
#define CH (64u * KIB)          /* chunk size of most cases */
#define BIG_CH (1024u * KIB)    /* chunk size of the "big" group */
#define MAX_LEN ((size_t)5 * BIG_CH + 123)
#define LV_HEADER 92u
#define TRAILER 128u

/* ------------------------------------------------------------------ */
/* Groups                                                              */

struct test_group {
    const char *name;
    int rank;
    void (*run)(void);
};

void test_group_register(const struct test_group *g);

/* Registers `fn` as the group `name` before main runs. */
#define TEST_GROUP(name, rank, fn)                                                  \
    static const struct test_group test_group_##fn = {name, rank, fn};              \
    __attribute__((constructor)) static void test_group_register_##fn(void)         \
    {                                                                               \
        test_group_register(&test_group_##fn);                                      \
    }                                                                               \
    extern int test_group_semicolon_##fn

/* ------------------------------------------------------------------ */
/* Bookkeeping                                                         */

extern int g_pass, g_fail, g_case_failed, g_case_open, g_msgs, g_skipped;
extern char g_case[256];

void case_begin(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void case_end(void);
void fail_at(int line, const char *cond, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

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

static inline double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static inline const char *kind_name(int k)
{
    static const char *names[] = {"NONE", "IO", "CORRUPT", "TRUNCATED", "VERSION",
                                  "CANCELLED", "ARG", "NOMEM", "NOT_IMAGE"};
    return k >= 0 && k <= 8 ? names[k] : "?";
}

static inline const char *mode_name(int m)
{
    return m == FS_MODE_RAW ? "raw" : m == FS_MODE_ZSTD ? "zstd" : "auto";
}

static inline uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

/* ------------------------------------------------------------------ */
/* Stream contents (MAX_LEN bytes each, made before the groups run)    */

enum { C_ZEROS, C_RANDOM, C_TEXT, C_MIXED, C_COUNT };
extern const char *const content_name[C_COUNT];
extern uint8_t *g_content[C_COUNT];
extern char g_xml_long[6001];   /* an XML region over 4 KiB */

uint64_t xorshift(uint64_t *s);
void gen_random(uint8_t *b, size_t n, uint64_t seed);
void gen_text(uint8_t *b, size_t n, uint64_t seed);

/* Options of a valid save, varied by `seq`; `name_buf` (64 bytes) holds the
 * domain name. xml_kind: 0 none, 1 short, 2 g_xml_long. */
void fill_opts(struct fs_save_opts *o, int seq, int mode, int level, int threads, int direct,
               uint32_t chunk, int splice, uint32_t slots, int xml_kind, char *name_buf);

/* ------------------------------------------------------------------ */
/* Producer, consumer and canceller threads                            */

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

/* Sets job->cancel after delay_ms. */
struct canceller {
    struct fs_job *job;
    int delay_ms;
};

void *producer_main(void *arg);
void *consumer_main(void *arg);
void *canceller_main(void *arg);

/* ------------------------------------------------------------------ */
/* Running saves and restores                                          */

enum { IN_PIPE, IN_SOCK };
enum { OUT_NONE, OUT_PIPE, OUT_SOCK, OUT_FILE };
#define KIND_MASK 3
#define NONBLOCK 4              /* or'ed into a kind: O_NONBLOCK on fs_*'s end */
#define SLOW 8                  /* or'ed into an input kind: the producer pauses */
extern const char *const out_name[4];

int make_channel(int kind, int fds[2]);

/* `job` is initialised by the caller (so a test can preset cancel). */
int run_save(const uint8_t *data, size_t len, int in_kind, int dir_fd, const char *name,
             const struct fs_save_opts *o, struct fs_job *job, uint64_t seed);

struct rres {
    int rc;
    size_t got;
    int mismatch;
    size_t bad_at;
};

struct rres run_restore(int img_fd, const uint8_t *expect, size_t len, int out_kind,
                        const struct fs_restore_opts *ro, struct fs_job *job);

/* ------------------------------------------------------------------ */
/* Directories and files                                               */

/* Made by main for the run: /tmp (tmpfs or not) and /var/tmp (O_DIRECT). */
extern char g_tmp_path[64], g_var_path[64];
extern int g_tmp_dir, g_var_dir;

void empty_dir(int dir_fd);
int list_dir(int dir_fd, char *out, size_t cap);
int make_dir(const char *base, char *path, size_t cap);
void remove_dir(int dir_fd, const char *path);
uint8_t *read_all(int fd, size_t *len);
int write_file(int dir_fd, const char *name, const uint8_t *b, size_t n);

/* The image's own description of itself, parsed independently of csrc/. */
struct layout {
    uint64_t size, payload, meta, index, trailer, count;
    uint32_t *raw, *stored, *flags;
    uint64_t *start;            /* file offset of each chunk */
};

int parse_layout(const uint8_t *img, size_t size, struct layout *L);
void free_layout(struct layout *L);

#endif
