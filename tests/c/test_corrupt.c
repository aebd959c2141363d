/* Corruption: bit flips in every region, truncation, extension, chunk swaps
 * and duplicates of zstd and raw images (64 KiB and 1 MiB chunks); a restore
 * must fail and never emit a byte that is not the stream's (zstd bits a
 * decoder ignores may leave the stream intact: such flips must then restore
 * the identical stream). */
#include "harness.h"

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

TEST_GROUP("corrupt", 50, group_corrupt);
