/* Round trips: size x content x mode x direct x threads x splice with 64 KiB
 * chunks ("roundtrip"), and the same idea with 1 MiB chunks ("big"). Each
 * image is checked byte by byte without csrc/, then inspected and restored. */
#include "harness.h"

#include <zstd.h>

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

TEST_GROUP("roundtrip", 60, group_roundtrip);
TEST_GROUP("big", 70, group_big);
