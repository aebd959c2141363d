/* Memory limits: options beyond FS_*_MAX refused naming value and limit,
 * buffers within FS_BUFFERS_MAX (fewer workers), images claiming more than
 * FS_CHUNKS_MAX chunks (sparse files whose size allows them) refused before
 * the index is allocated. */
#include "harness.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

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
    fs_index_init(&b, 1);
    EXPECT(b.max == FS_CHUNKS_MAX, "max %llu", (unsigned long long)b.max);
    b.max = 3;
    for (int i = 0; i < 3; i++)
        EXPECT(fs_index_add(&b, 0, CH, CH, 0, 0, (uint64_t)i) == 0, "add %d", i);
    EXPECT(fs_index_add(&b, 0, CH, CH, 0, 0, 9) == -EFBIG, "a fourth chunk was accepted");
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

TEST_GROUP("limits", 90, group_limits);
