/* libFuzzer target: the decoders of fastsave's own frames, on raw bytes.
 *
 *   fs_decode_meta     the whole input as a metadata frame (exact-size buffer,
 *                      so any read past `len` is caught); a decoded frame must
 *                      point its strings inside the buffer, and encoding the
 *                      decoded fields and decoding that again gives the same fields
 *   fs_decode_trailer  the last 128 bytes (copied to a 128-byte buffer);
 *                      decode(encode(t)) == t for a decoded trailer
 *   fs_decode_entry    every 24-byte slice; encode(decode(b)) == b
 *   fs_raw_frame_decode  the input as a stored (raw-block) zstd frame of the
 *                      size its header declares, when the input has that size
 */
#include "fs_internal.h"

#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "fuzz_meta: check failed: %s: ", #cond);           \
            fprintf(stderr, __VA_ARGS__);                                      \
            fputc('\n', stderr);                                               \
            abort();                                                           \
        }                                                                      \
    } while (0)

static int known_kind(int k)
{
    return k >= FS_ERR_IO && k <= FS_ERR_NOT_IMAGE;
}

static void same_meta(const struct fs_meta *a, const struct fs_meta *b)
{
    CHECK(a->major == b->major && a->codec == b->codec && a->level == b->level &&
              a->chunk_size == b->chunk_size && a->was_running == b->was_running &&
              a->auto_mode == b->auto_mode && a->stream_len == b->stream_len &&
              a->created_ns == b->created_ns && memcmp(a->uuid, b->uuid, 16) == 0 &&
              a->name_len == b->name_len && a->version_len == b->version_len &&
              memcmp(a->name, b->name, a->name_len) == 0 &&
              memcmp(a->version, b->version, a->version_len) == 0,
          "metadata changed across encode/decode");
}

static void meta(const uint8_t *data, size_t size)
{
    uint8_t *buf = malloc(size ? size : 1);
    CHECK(buf != NULL, "out of memory");
    memcpy(buf, data, size);
    struct fs_meta m;
    const char *why = NULL;
    memset(&m, 0, sizeof m);
    int kind = fs_decode_meta(buf, size, &m, &why);
    if (kind) {
        CHECK(known_kind(kind), "fs_decode_meta kind %d", kind);
        CHECK(why != NULL && why[0], "fs_decode_meta failed without a reason");
        free(buf);
        return;
    }
    CHECK(m.major == FS_FORMAT_MAJOR, "major %u", m.major);
    CHECK(m.name_len < FS_NAME_MAX && m.version_len < FS_VERSION_MAX, "string lengths");
    const uint8_t *nm = (const uint8_t *)m.name, *ver = (const uint8_t *)m.version;
    CHECK(nm >= buf + 8 && nm + m.name_len <= buf + size - 8, "name outside the frame content");
    CHECK(ver >= buf + 8 && ver + m.version_len <= buf + size - 8, "version outside the frame content");

    /* what an encoder makes of these fields decodes to the same fields;
     * the encoder writes major/minor 1.0 and auto_mode as 0/1 */
    struct fs_meta m2;
    m.minor = FS_FORMAT_MINOR;
    size_t len = fs_meta_size(&m);
    uint8_t *enc = malloc(len);
    CHECK(enc != NULL, "out of memory");
    fs_encode_meta(enc, &m);
    memset(&m2, 0, sizeof m2);
    kind = fs_decode_meta(enc, len, &m2, &why);
    CHECK(kind == 0, "re-encoded metadata does not decode: %s", why);
    same_meta(&m, &m2);
    free(enc);
    free(buf);
}

static void trailer(const uint8_t *data, size_t size)
{
    if (size < FS_TRAILER_SIZE)
        return;
    uint8_t *buf = malloc(FS_TRAILER_SIZE);
    CHECK(buf != NULL, "out of memory");
    memcpy(buf, data + size - FS_TRAILER_SIZE, FS_TRAILER_SIZE);
    struct fs_trailer t, t2;
    int kind = 0;
    const char *why = NULL;
    memset(&t, 0, sizeof t);
    if (fs_decode_trailer(buf, &t, &kind, &why) < 0) {
        CHECK(known_kind(kind), "fs_decode_trailer kind %d", kind);
        CHECK(why != NULL && why[0], "fs_decode_trailer failed without a reason");
    } else {
        CHECK(kind == 0, "fs_decode_trailer succeeded and set kind %d", kind);
        CHECK(t.major == FS_FORMAT_MAJOR, "major %u", t.major);
        fs_encode_trailer(buf, &t);
        memset(&t2, 0, sizeof t2);
        CHECK(fs_decode_trailer(buf, &t2, &kind, &why) == 0, "re-encoded trailer does not decode: %s", why);
        t.minor = FS_FORMAT_MINOR;  /* the encoder writes its own version */
        CHECK(memcmp(&t, &t2, sizeof t) == 0, "trailer changed across encode/decode");
    }
    free(buf);
}

static void entries(const uint8_t *data, size_t size)
{
    uint8_t buf[FS_INDEX_ENTRY_SIZE];
    for (size_t off = 0; off + FS_INDEX_ENTRY_SIZE <= size && off < 64 * FS_INDEX_ENTRY_SIZE;
         off += FS_INDEX_ENTRY_SIZE) {
        struct fs_entry e;
        fs_decode_entry(data + off, &e);
        fs_encode_entry(buf, &e);
        CHECK(memcmp(buf, data + off, FS_INDEX_ENTRY_SIZE) == 0, "entry changed across decode/encode");
    }
}

static void raw_frame(const uint8_t *data, size_t size)
{
    if (size < 9)
        return;
    size_t raw_len = fs_get32(data + 5);
    if (raw_len > (1u << 20) || fs_raw_frame_size(raw_len) != size)
        return;
    uint8_t *src = malloc(size), *dst = malloc(raw_len ? raw_len : 1);
    CHECK(src && dst, "out of memory");
    memcpy(src, data, size);
    if (fs_raw_frame_decode(src, size, dst, raw_len) == 0) {
        /* a frame that decodes is exactly the one fastsave writes for its data */
        uint8_t *again = malloc(size);
        CHECK(again != NULL, "out of memory");
        size_t at = fs_raw_frame_header(again, raw_len), left = raw_len;
        const uint8_t *p = dst;
        while (left) {
            size_t k = left < FS_RAW_BLOCK_MAX ? left : FS_RAW_BLOCK_MAX;
            fs_raw_block_header(again + at, k, k == left);
            memcpy(again + at + 3, p, k);
            at += 3 + k;
            p += k;
            left -= k;
        }
        CHECK(at == size && memcmp(again, src, size) == 0, "decoded raw frame does not re-encode to itself");
        free(again);
    }
    free(src);
    free(dst);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    meta(data, size);
    trailer(data, size);
    entries(data, size);
    raw_frame(data, size);
    return 0;
}
