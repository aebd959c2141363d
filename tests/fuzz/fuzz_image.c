/* libFuzzer target: the image reader (fs_inspect) and verify-only restore
 * (fs_restore with no output) on arbitrary files.
 *
 * Input layout: one control byte, then the image.
 *   bit 0  restore with 2 worker threads instead of 1
 *   bit 1  "fix-up": before the image is written, recompute every checksum
 *          the reader checks (stored_check of compressed chunks, chunk chain
 *          values where the chunk decodes, index, metadata, prefix and trailer
 *          hashes, trailer's final chain) at the positions the trailer names,
 *          so mutations reach the checks behind the hashes instead of dying at
 *          the first checksum. Best effort: nothing is fixed where the layout
 *          makes no sense.
 *
 * The image is written into a memfd (a regular file), then:
 *   - fs_inspect; fs_restore(out_fd = -1) with a fresh job each;
 *   - both return 0 or a negative errno; on failure the job's error kind is
 *     one of FS_ERR_* (not NONE) and its message is NUL-terminated and not empty;
 *   - inspect and restore open the image the same way: if inspect fails,
 *     restore fails with the same kind and message;
 *   - on success the image's numbers are consistent (chunk count, stream
 *     length, payload inside the file, NUL-terminated name and version) and a
 *     successful restore verified exactly stream_len bytes in chunk_count chunks.
 * Any violation aborts. Restore is skipped when inspect reports a stream over
 * RESTORE_MAX bytes, so a legitimately huge (decompression-bomb) image does
 * not count as a hang.
 *
 * FASTSAVE_FUZZ_WRITE_IMAGE=path writes the image as it was given to the
 * reader (after fix-up) to `path`, to reproduce a finding with other tools.
 */
#include "fs_internal.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zstd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define RESTORE_MAX (64ull << 20)
#define FIX_CHUNK_MAX (4u << 20)       /* fix-up decodes chunks up to this size */
#define FIX_TOTAL_MAX (16ull << 20)    /* and this much stream in all */

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "fuzz_image: check failed: %s: ", #cond);          \
            fprintf(stderr, __VA_ARGS__);                                      \
            fputc('\n', stderr);                                               \
            abort();                                                           \
        }                                                                      \
    } while (0)

/* Recomputes stored_check and chain values of the index entries, the index
 * hash, and returns the last chain value (or the seed). */
static uint64_t fix_index(uint8_t *p, size_t n, uint64_t po, uint64_t io, uint64_t to)
{
    uint64_t chain = FS_CHAIN_SEED, total = 0, off = po;
    int chain_ok = 1;
    int zstd = fs_get32(p + 28) == FS_LV_FORMAT_ZSTD;
    if (!(io < to && to <= n - FS_TRAILER_SIZE + 8 && to - io >= 32))
        return chain;
    uint64_t count = (to - io - 32) / FS_INDEX_ENTRY_SIZE;
    uint8_t *ent = p + io + 24;
    uint8_t *plain = NULL;
    for (uint64_t i = 0; i < count; i++, ent += FS_INDEX_ENTRY_SIZE) {
        struct fs_entry e;
        uint32_t channel;
        fs_decode_entry(ent, &e, FS_FORMAT_MAJOR, &channel); /* fixes up single-channel images */
        int in_file = off <= n && e.stored_len <= n - off;
        if (in_file && (e.flags & FS_ENTRY_COMPRESSED))
            e.check = (uint32_t)fs_digest(p + off, e.stored_len);
        /* the chain needs the chunk's stream bytes */
        const uint8_t *data = NULL;
        if (chain_ok && in_file && e.raw_len <= FIX_CHUNK_MAX && total + e.raw_len <= FIX_TOTAL_MAX) {
            if (!zstd) {
                data = e.stored_len == e.raw_len ? p + off : NULL;
            } else {
                free(plain);
                plain = malloc(e.raw_len ? e.raw_len : 1);
                if (plain && (e.flags & FS_ENTRY_COMPRESSED)) {
                    size_t k = ZSTD_decompress(plain, e.raw_len, p + off, e.stored_len);
                    data = !ZSTD_isError(k) && k == e.raw_len ? plain : NULL;
                } else if (plain && fs_raw_frame_size(e.raw_len) == e.stored_len) {
                    data = fs_raw_frame_decode(p + off, e.stored_len, plain, e.raw_len) == 0 ? plain : NULL;
                }
            }
        }
        if (data) {
            chain = fs_chain(chain, i, fs_digest(data, e.raw_len), e.raw_len);
            e.chain = chain;
            total += e.raw_len;
        } else {
            chain_ok = 0;           /* the restore stops at this chunk anyway */
            chain = e.chain;
        }
        fs_encode_entry(ent, &e, FS_FORMAT_MAJOR, 0);
        off += e.stored_len;
    }
    free(plain);
    fs_put64(p + to - 8, XXH3_64bits(p + io + 8, to - io - 16));
    return count ? fs_get64(p + io + 24 + (count - 1) * FS_INDEX_ENTRY_SIZE + 16) : FS_CHAIN_SEED;
}

static void fixup(uint8_t *p, size_t n)
{
    if (n < FS_LV_HEADER_SIZE + FS_TRAILER_SIZE)
        return;
    uint8_t *c = p + n - FS_TRAILER_SIZE + 8;   /* trailer content */
    uint64_t po = fs_get64(c + 8), mo = fs_get64(c + 16), io = fs_get64(c + 24), to = fs_get64(c + 32);
    uint64_t lim = n - FS_TRAILER_SIZE;
    uint64_t last = fix_index(p, n, po, io, to);
    if (mo < io && io <= lim && io - mo >= 24)
        fs_put64(p + io - 8, XXH3_64bits(p + mo + 8, io - mo - 16));
    if (po <= lim)
        fs_put64(c + 40, XXH3_64bits(p, po));
    fs_put64(c + 48, last);
    fs_put64(c, XXH3_64bits(c + 8, FS_TRAILER_SIZE - 16));
}

static int memfd_with(const uint8_t *p, size_t n)
{
    int fd = memfd_create("fastsave-fuzz", MFD_CLOEXEC);
    CHECK(fd >= 0, "memfd_create: %s", strerror(errno));
    size_t put = 0;
    while (put < n) {
        ssize_t k = write(fd, p + put, n - put);
        if (k < 0 && errno == EINTR)
            continue;
        CHECK(k > 0, "write to memfd: %s", strerror(errno));
        put += (size_t)k;
    }
    return fd;
}

static void check_error(const char *call, int rc, const struct fs_job *job)
{
    CHECK(rc <= 0, "%s returned %d", call, rc);
    if (rc == 0) {
        CHECK(job->error.kind == FS_ERR_NONE && !job->claimed,
              "%s succeeded but recorded error kind %d: %.*s", call, job->error.kind,
              (int)sizeof job->error.msg, job->error.msg);
        return;
    }
    CHECK(job->error.kind >= FS_ERR_IO && job->error.kind <= FS_ERR_NOT_IMAGE,
          "%s rc %d with error kind %d", call, rc, job->error.kind);
    CHECK(memchr(job->error.msg, 0, sizeof job->error.msg) != NULL, "%s message not NUL-terminated", call);
    CHECK(job->error.msg[0] != 0, "%s failed (kind %d) with an empty message", call, job->error.kind);
    CHECK(job->error.kind != FS_ERR_CANCELLED, "%s reports a cancel nobody asked for", call);
}

static void check_info(const struct fs_image_info *in)
{
    CHECK(in->chunk_size >= FS_CHUNK_MIN && in->chunk_size <= FS_CHUNK_MAX, "chunk_size %u", in->chunk_size);
    /* chunk_count == the sum of ceil(channel length / chunk_size), without overflow */
    uint64_t want = 0;
    for (uint32_t c = 0; c < in->channels && c < FS_CHANNELS_MAX; c++)
        want += in->channel_len[c] / in->chunk_size + (in->channel_len[c] % in->chunk_size != 0);
    CHECK(in->chunk_count == want, "chunk_count %llu for stream_len %llu and chunk_size %u",
          (unsigned long long)in->chunk_count, (unsigned long long)in->stream_len, in->chunk_size);
    CHECK(in->chunks_compressed <= in->chunk_count, "more compressed chunks than chunks");
    CHECK(in->payload_offset >= FS_LV_HEADER_SIZE && in->payload_offset <= in->file_size &&
              in->payload_len <= in->file_size - in->payload_offset,
          "payload [%llu, +%llu) outside a file of %llu bytes", (unsigned long long)in->payload_offset,
          (unsigned long long)in->payload_len, (unsigned long long)in->file_size);
    CHECK(in->xml_offset == FS_LV_HEADER_SIZE && in->xml_len <= in->payload_offset - FS_LV_HEADER_SIZE,
          "xml_len %llu does not fit the XML region", (unsigned long long)in->xml_len);
    CHECK(in->libvirt_format == FS_LV_FORMAT_RAW || in->libvirt_format == FS_LV_FORMAT_ZSTD, "libvirt format");
    CHECK(in->codec == (in->libvirt_format == FS_LV_FORMAT_ZSTD ? FS_CODEC_ZSTD : FS_CODEC_RAW), "codec");
    CHECK(in->major == FS_FORMAT_MAJOR ? in->channels == 1
                                       : in->major == FS_FORMAT_MAJOR_CHANNELS && in->channels >= 2 &&
                                             in->channels <= FS_CHANNELS_MAX,
          "major %u with %u channels", in->major, in->channels);
    uint64_t total = 0;
    for (uint32_t c = 0; c < in->channels && c < FS_CHANNELS_MAX; c++)
        total += in->channel_len[c];
    CHECK(total == in->stream_len, "channel lengths do not add up to the stream length");
    CHECK(in->name_len < sizeof in->name && in->name[in->name_len] == 0, "name not NUL-terminated");
    CHECK(memchr(in->version, 0, sizeof in->version) != NULL, "version not NUL-terminated");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t ctl = data[0];
    size_t n = size - 1;
    uint8_t *img = malloc(n ? n : 1);
    CHECK(img != NULL, "out of memory");
    memcpy(img, data + 1, n);
    if (ctl & 2)
        fixup(img, n);
    const char *dump = getenv("FASTSAVE_FUZZ_WRITE_IMAGE");
    if (dump) {
        FILE *f = fopen(dump, "wb");
        if (f) {
            fwrite(img, 1, n, f);
            fclose(f);
        }
    }
    int fd = memfd_with(img, n);
    free(img);

    struct fs_job ijob;
    struct fs_image_info info;
    memset(&ijob, 0, sizeof ijob);
    int irc = fs_inspect(fd, &info, &ijob);
    check_error("fs_inspect", irc, &ijob);
    if (irc == 0) {
        check_info(&info);
        CHECK(info.file_size == n, "file_size %llu of %zu", (unsigned long long)info.file_size, n);
    }

    if (irc != 0 || info.stream_len <= RESTORE_MAX) {
        struct fs_job rjob;
        struct fs_restore_opts ro = {.threads = (ctl & 1) ? 2 : 1, .direct = 0, .slots = 0};
        memset(&rjob, 0, sizeof rjob);
        int rrc = fs_restore(fd, -1, &ro, &rjob);
        check_error("fs_restore", rrc, &rjob);
        CHECK(rjob.stats.done == 1, "restore returned without marking the job done");
        if (irc != 0) {
            CHECK(rrc != 0, "restore accepted an image inspect refused (%s)", ijob.error.msg);
            CHECK(rjob.error.kind == ijob.error.kind && strcmp(rjob.error.msg, ijob.error.msg) == 0,
                  "inspect and restore disagree: kind %d '%s' vs kind %d '%s'", ijob.error.kind,
                  ijob.error.msg, rjob.error.kind, rjob.error.msg);
        } else if (rrc == 0) {
            CHECK(rjob.stats.bytes_out == info.stream_len, "restore verified %llu of %llu stream bytes",
                  (unsigned long long)rjob.stats.bytes_out, (unsigned long long)info.stream_len);
            CHECK(rjob.stats.chunks == info.chunk_count, "restore verified %llu of %llu chunks",
                  (unsigned long long)rjob.stats.chunks, (unsigned long long)info.chunk_count);
            CHECK(rjob.stats.stream_total == info.stream_len, "stream_total differs from inspect");
        } else {
            CHECK(rjob.error.kind == FS_ERR_CORRUPT || rjob.error.kind == FS_ERR_TRUNCATED,
                  "a restore of an image inspect accepted failed with kind %d: %s", rjob.error.kind,
                  rjob.error.msg);
        }
    }
    close(fd);
    return 0;
}
