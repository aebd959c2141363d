/* libFuzzer target: the decoders of fastsave's own frames, on raw bytes.
 *
 * Every decoder returns 0 or -EBADMSG / -EPROTONOSUPPORT (the latter exactly
 * for a version refusal) with a known kind and a reason.
 *
 *   fs_decode_meta     the whole input as a metadata frame (exact-size buffer,
 *                      so any read past `len` is caught); a decoded frame must
 *                      point its strings inside the buffer, and encoding the
 *                      decoded fields and decoding that again gives the same fields
 *   fs_decode_trailer  the last 128 bytes (copied to a 128-byte buffer);
 *                      decode(encode(t)) == t for a decoded trailer
 *   fs_decode_lv_header  the first 92 bytes; an accepted header names format
 *                      0 or 5 and an XML region within the limit
 *   fs_decode_index_head the first 24 bytes against the frame size and count
 *                      in the last 16 bytes
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

/* A decoder's refusal: -EBADMSG, or -EPROTONOSUPPORT exactly for a version
 * refusal, with a known kind and a reason. */
static void check_refusal(const char *fn, int rc, const struct fs_why *why)
{
    CHECK(rc == -EBADMSG || rc == -EPROTONOSUPPORT, "%s returned %d", fn, rc);
    CHECK(known_kind(why->kind), "%s kind %d", fn, why->kind);
    CHECK((rc == -EPROTONOSUPPORT) == (why->kind == FS_ERR_VERSION), "%s: rc %d with kind %d", fn, rc,
          why->kind);
    CHECK(why->what != NULL && why->what[0], "%s failed without a reason", fn);
}

static void same_meta(const struct fs_meta *a, const struct fs_meta *b)
{
    CHECK(a->major == b->major && a->codec == b->codec && a->level == b->level &&
              a->chunk_size == b->chunk_size && a->was_running == b->was_running &&
              a->auto_mode == b->auto_mode && a->stream_len == b->stream_len &&
              a->created_ns == b->created_ns && memcmp(a->uuid, b->uuid, 16) == 0 &&
              a->name_len == b->name_len && a->version_len == b->version_len &&
              memcmp(a->name, b->name, a->name_len) == 0 &&
              memcmp(a->version, b->version, a->version_len) == 0 && a->channels == b->channels &&
              memcmp(a->channel_len, b->channel_len, a->channels * sizeof a->channel_len[0]) == 0 &&
              (a->channels == 1 ||
               memcmp(a->channel_chain, b->channel_chain, a->channels * sizeof a->channel_chain[0]) == 0),
          "metadata changed across encode/decode");
}

static void meta(const uint8_t *data, size_t size)
{
    uint8_t *buf = malloc(size ? size : 1);
    CHECK(buf != NULL, "out of memory");
    memcpy(buf, data, size);
    struct fs_meta m;
    struct fs_why why = {0, 0, NULL};
    memset(&m, 0, sizeof m);
    int rc = fs_decode_meta(buf, size, &m, &why);
    if (rc) {
        check_refusal("fs_decode_meta", rc, &why);
        free(buf);
        return;
    }
    CHECK(m.major == FS_FORMAT_MAJOR ? m.channels == 1
                                     : m.major == FS_FORMAT_MAJOR_CHANNELS && m.channels >= 2 &&
                                           m.channels <= FS_CHANNELS_MAX,
          "major %u with %u channels", m.major, m.channels);
    CHECK(m.name_len < FS_NAME_MAX && m.version_len < FS_VERSION_MAX, "string lengths");
    const uint8_t *nm = (const uint8_t *)m.name, *ver = (const uint8_t *)m.version;
    CHECK(nm >= buf + 8 && nm + m.name_len <= buf + size - 8, "name outside the frame content");
    CHECK(ver >= buf + 8 && ver + m.version_len <= buf + size - 8, "version outside the frame content");

    /* what an encoder makes of these fields decodes to the same fields;
     * the encoder writes minor 0, the major of its channel count and
     * auto_mode as 0/1 */
    struct fs_meta m2;
    m.minor = FS_FORMAT_MINOR;
    size_t len = fs_meta_size(&m);
    uint8_t *enc = malloc(len);
    CHECK(enc != NULL, "out of memory");
    fs_encode_meta(enc, &m);
    memset(&m2, 0, sizeof m2);
    rc = fs_decode_meta(enc, len, &m2, &why);
    CHECK(rc == 0, "re-encoded metadata does not decode: %s", why.what);
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
    struct fs_why why = {0, 0, NULL};
    memset(&t, 0, sizeof t);
    int rc = fs_decode_trailer(buf, &t, &why);
    if (rc < 0) {
        check_refusal("fs_decode_trailer", rc, &why);
    } else {
        CHECK(rc == 0, "fs_decode_trailer returned %d", rc);
        CHECK(t.major == FS_FORMAT_MAJOR ? t.channels == 1
                                         : t.major == FS_FORMAT_MAJOR_CHANNELS && t.channels >= 2 &&
                                               t.channels <= FS_CHANNELS_MAX,
              "major %u with %u channels", t.major, t.channels);
        fs_encode_trailer(buf, &t);
        memset(&t2, 0, sizeof t2);
        CHECK(fs_decode_trailer(buf, &t2, &why) == 0, "re-encoded trailer does not decode: %s", why.what);
        t.minor = FS_FORMAT_MINOR;  /* the encoder writes its own version */
        CHECK(memcmp(&t, &t2, sizeof t) == 0, "trailer changed across encode/decode");
    }
    free(buf);
}

/* The libvirt header: the input's first 92 bytes, copied to an exact buffer. */
static void lv_header(const uint8_t *data, size_t size)
{
    if (size < FS_LV_HEADER_SIZE)
        return;
    uint8_t *buf = malloc(FS_LV_HEADER_SIZE);
    CHECK(buf != NULL, "out of memory");
    memcpy(buf, data, FS_LV_HEADER_SIZE);
    struct fs_lv_header h;
    struct fs_why why = {0, 0, NULL};
    int rc = fs_decode_lv_header(buf, &h, &why);
    if (rc < 0) {
        check_refusal("fs_decode_lv_header", rc, &why);
    } else {
        CHECK(rc == 0, "fs_decode_lv_header returned %d", rc);
        CHECK(h.format == FS_LV_FORMAT_RAW || h.format == FS_LV_FORMAT_ZSTD, "format %u", h.format);
        CHECK(FS_LV_HEADER_SIZE + (uint64_t)h.data_len <= fs_payload_offset(FS_XML_MAX),
              "data_len %u beyond the XML limit", h.data_len);
    }
    free(buf);
}

/* The index frame's head against the size and count the input's tail names. */
static void index_head(const uint8_t *data, size_t size)
{
    if (size < FS_INDEX_HEAD_SIZE + 16)
        return;
    uint8_t *buf = malloc(FS_INDEX_HEAD_SIZE);
    CHECK(buf != NULL, "out of memory");
    memcpy(buf, data, FS_INDEX_HEAD_SIZE);
    uint64_t frame_len = fs_get64(data + size - 16), count = fs_get64(data + size - 8);
    struct fs_why why = {0, 0, NULL};
    int rc = fs_decode_index_head(buf, frame_len, count, &why);
    if (rc < 0)
        check_refusal("fs_decode_index_head", rc, &why);
    else
        CHECK(fs_get64(buf + 16) == count && fs_get32(buf + 4) == frame_len - 8, "accepted a head "
              "that does not match");
    free(buf);
}

static void entries(const uint8_t *data, size_t size)
{
    uint8_t buf[FS_INDEX_ENTRY2_SIZE];
    for (uint32_t major = FS_FORMAT_MAJOR; major <= FS_FORMAT_MAJOR_CHANNELS; major++) {
        size_t esize = fs_entry_size(major);
        for (size_t off = 0; off + esize <= size && off < 64 * esize; off += esize) {
            struct fs_entry e;
            uint32_t channel;
            if (fs_decode_entry(data + off, &e, major, &channel) != 0)
                continue; /* reserved bytes set: refused */
            CHECK(fs_encode_entry(buf, &e, major, channel) == esize, "entry size");
            CHECK(memcmp(buf, data + off, esize) == 0, "entry changed across decode/encode");
        }
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
    lv_header(data, size);
    index_head(data, size);
    entries(data, size);
    raw_frame(data, size);
    return 0;
}
