/* Opening an image: every check that does not need the chunk data, so a
 * restore refuses a damaged image before it writes a single byte. */
#include "fs_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

_Static_assert(sizeof(((struct fs_image_info *)0)->channel_len) / sizeof(uint64_t) == FS_CHANNELS_MAX,
               "fs_image_info has a length per channel");

#define INDEX_BATCH 4096
#define PREFIX_PIECE (1u << 20)        /* the header and XML region are hashed in pieces */

static int refuse(struct fs_job *job, int kind, int64_t off, const char *what)
{
    return fs_fail(job, kind, kind == FS_ERR_IO ? EIO : EBADMSG, -1, off, "%s", what);
}

/* A decoder's refusal; `base` is the file offset of the decoded bytes. */
static int refuse_decoded(struct fs_job *job, int rc, const struct fs_why *why, uint64_t base)
{
    return fs_fail(job, why->kind, -rc, -1, (int64_t)(base + (uint64_t)(why->at > 0 ? why->at : 0)),
                   "%s", why->what);
}

static int read_at(int fd, void *buf, size_t n, uint64_t off, struct fs_job *job)
{
    int r = fs_pread_exact(fd, buf, n, off);
    if (r == -ENODATA)
        return refuse(job, FS_ERR_TRUNCATED, (int64_t)off, "image ends early");
    if (r < 0)
        return fs_fail(job, FS_ERR_IO, -r, -1, (int64_t)off, "reading the image at offset %llu: %s",
                       (unsigned long long)off, strerror(-r));
    return 0;
}

static int check_header(struct fs_image *img, const uint8_t *header, struct fs_job *job)
{
    struct fs_lv_header lv;
    struct fs_why why;
    int r = fs_decode_lv_header(header, &lv, &why);
    if (r < 0)
        return refuse_decoded(job, r, &why, 0);
    img->lv_format = lv.format;
    img->trailer.payload_offset = FS_LV_HEADER_SIZE + (uint64_t)lv.data_len;
    return 0;
}

static int check_layout(struct fs_image *img, struct fs_job *job)
{
    const struct fs_trailer *t = &img->trailer;
    uint64_t meta_len = t->index_offset - t->meta_offset;
    if (t->trailer_offset != img->file_size - FS_TRAILER_SIZE)
        return refuse(job, FS_ERR_CORRUPT, (int64_t)t->trailer_offset,
                   "trailer does not match the file size (bytes added or removed)");
    if (t->payload_offset > fs_payload_offset(FS_XML_MAX) || t->payload_offset % FS_ALIGN ||
        t->meta_offset < t->payload_offset ||
        t->index_offset <= t->meta_offset || t->index_offset >= t->trailer_offset ||
        meta_len > FS_META_MAX)
        return refuse(job, FS_ERR_CORRUPT, (int64_t)t->trailer_offset, "trailer offsets are inconsistent");
    return 0;
}

/* The header and XML region, read in pieces: memory does not grow with the XML. */
static int check_prefix(struct fs_image *img, uint64_t payload_offset, struct fs_job *job)
{
    if (img->trailer.payload_offset != payload_offset)
        return refuse(job, FS_ERR_CORRUPT, 20, "libvirt header and trailer disagree on the payload offset");
    uint8_t *buf = malloc(PREFIX_PIECE);
    struct fs_hash *hash = fs_hash_new();
    int r = 0;
    if (!buf || !hash)
        r = fs_fail(job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory");
    uint64_t xml_len = 0;
    int nul_seen = 0;
    for (uint64_t off = 0; r == 0 && off < payload_offset; off += PREFIX_PIECE) {
        size_t n = payload_offset - off < PREFIX_PIECE ? (size_t)(payload_offset - off) : PREFIX_PIECE;
        r = read_at(img->fd, buf, n, off, job);
        if (r < 0)
            break;
        fs_hash_update(hash, buf, n);
        size_t from = off < FS_LV_HEADER_SIZE ? FS_LV_HEADER_SIZE - (size_t)off : 0;
        if (!nul_seen && from < n) {
            const uint8_t *nul = memchr(buf + from, 0, n - from);
            nul_seen = nul != NULL;
            xml_len += nul ? (uint64_t)(nul - (buf + from)) : n - from;
        }
    }
    if (r == 0 && fs_hash_digest(hash) != img->trailer.prefix_hash)
        r = refuse(job, FS_ERR_CORRUPT, 0, "header or domain XML checksum mismatch");
    if (r == 0 && !nul_seen)
        r = refuse(job, FS_ERR_CORRUPT, FS_LV_HEADER_SIZE, "domain XML is not NUL-terminated");
    img->xml_len = xml_len;
    free(buf);
    if (hash)
        fs_hash_free(hash);
    return r;
}

static int check_meta(struct fs_image *img, struct fs_job *job)
{
    const struct fs_trailer *t = &img->trailer;
    size_t len = t->index_offset - t->meta_offset;
    struct fs_why why;
    img->meta_buf = malloc(len);
    if (!img->meta_buf)
        return fs_fail(job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory");
    int r = read_at(img->fd, img->meta_buf, len, t->meta_offset, job);
    if (r < 0)
        return r;
    r = fs_decode_meta(img->meta_buf, len, &img->meta, &why);
    if (r < 0)
        return refuse_decoded(job, r, &why, t->meta_offset);
    const struct fs_meta *m = &img->meta;
    uint32_t want = img->lv_format == FS_LV_FORMAT_RAW ? FS_CODEC_RAW : FS_CODEC_ZSTD;
    int64_t at = (int64_t)t->meta_offset;
    if (m->codec != want)
        return refuse(job, FS_ERR_CORRUPT, at, "metadata codec does not match the header");
    if (m->chunk_size < FS_CHUNK_MIN || m->chunk_size > FS_CHUNK_MAX || m->chunk_size % FS_ALIGN)
        return fs_fail(job, FS_ERR_CORRUPT, EBADMSG, -1, at,
                       "metadata chunk size %u out of range (a multiple of %u from %u to %u)",
                       m->chunk_size, FS_ALIGN, FS_CHUNK_MIN, FS_CHUNK_MAX);
    if (m->codec == FS_CODEC_RAW ? m->level != 0
                                 : m->level < ZSTD_minCLevel() || m->level > ZSTD_maxCLevel())
        return fs_fail(job, FS_ERR_CORRUPT, EBADMSG, -1, at, "metadata zstd level %d out of range",
                       m->level);
    if (m->major != t->major || m->channels != t->channels)
        return refuse(job, FS_ERR_CORRUPT, at, "metadata and trailer disagree on the format or the channels");
    /* Every channel is restored by its own pipeline: their least buffers
     * must fit the limit together (a writer never writes an image where
     * they do not). */
    uint64_t least = (uint64_t)m->channels * FS_RESTORE_MIN_SLOTS *
                     fs_restore_slot_size(m->chunk_size, m->codec == FS_CODEC_ZSTD);
    if (least > FS_BUFFERS_MAX)
        return fs_fail(job, FS_ERR_CORRUPT, EBADMSG, -1, at,
                       "%u channels of chunk size %u need %llu MiB of buffers to restore, more than "
                       "the limit of %llu MiB", m->channels, m->chunk_size,
                       (unsigned long long)(least >> 20), (unsigned long long)(FS_BUFFERS_MAX >> 20));
    return 0;
}

/* Major 2: the guard block that makes QEMU refuse the payload as one stream. */
static int check_guard(struct fs_image *img, struct fs_job *job)
{
    const struct fs_trailer *t = &img->trailer;
    img->chunks_offset = t->payload_offset;
    if (t->major == FS_FORMAT_MAJOR)
        return 0;
    if (t->meta_offset - t->payload_offset < FS_GUARD_SIZE)
        return refuse(job, FS_ERR_CORRUPT, (int64_t)t->payload_offset, "payload too short for its guard block");
    uint8_t want[FS_GUARD_SIZE], got[FS_GUARD_SIZE];
    fs_encode_guard(want, img->meta.codec);
    int r = read_at(img->fd, got, FS_GUARD_SIZE, t->payload_offset, job);
    if (r < 0)
        return r;
    if (memcmp(want, got, FS_GUARD_SIZE) != 0)
        return refuse(job, FS_ERR_CORRUPT, (int64_t)t->payload_offset, "payload guard block damaged");
    img->chunks_offset = t->payload_offset + FS_GUARD_SIZE;
    return 0;
}

/* One entry against the rules of its position; returns a reason or NULL. */
static const char *check_entry(const struct fs_image *img, const struct fs_entry *e, uint64_t i,
                               uint64_t count, uint64_t len)
{
    const struct fs_meta *m = &img->meta;
    if (i >= count)
        return "more chunks than its channel's length";
    uint64_t want = i + 1 < count ? m->chunk_size : len - (count - 1) * m->chunk_size;
    if (e->raw_len != want)
        return "chunk length does not match the stream length";
    if (e->flags & ~FS_ENTRY_COMPRESSED)
        return "unknown chunk flags";
    if (!(e->flags & FS_ENTRY_COMPRESSED) && e->check)
        return "check value on an uncompressed chunk";
    if (img->lv_format == FS_LV_FORMAT_RAW)
        return e->stored_len == e->raw_len && !e->flags ? NULL : "raw chunk stored with a codec";
    if (e->flags)
        return e->stored_len >= 9 && e->stored_len <= ZSTD_compressBound(e->raw_len)
                   ? NULL : "compressed chunk size out of range";
    return e->stored_len == fs_raw_frame_size(e->raw_len) ? NULL : "stored chunk size is wrong";
}

static int check_index(struct fs_image *img, struct fs_job *job)
{
    const struct fs_trailer *t = &img->trailer;
    const struct fs_meta *m = &img->meta;
    uint64_t len = t->trailer_offset - t->index_offset;
    uint32_t esize = fs_entry_size(t->major);
    /* not (stream_len + chunk_size - 1) / chunk_size: that wraps for a stream_len
     * near 2^64 and makes a huge stream look like an empty one */
    uint64_t count = 0;
    for (uint32_t c = 0; c < m->channels; c++) {
        uint64_t n = m->channel_len[c] / m->chunk_size + (m->channel_len[c] % m->chunk_size != 0);
        img->channel_count[c] = n;
        count += n; /* no wrap: n <= 2^48 (chunk_size >= 2^16), channels <= 64 */
    }
    /* The index is held in memory: its size is bounded before anything is
     * allocated, whatever the (possibly sparse) file's size allows. */
    if (count > FS_CHUNKS_MAX)
        return fs_fail(job, FS_ERR_CORRUPT, EBADMSG, -1, (int64_t)t->meta_offset,
                       "stream length %llu in chunks of %u bytes is %llu chunks, more than the "
                       "limit of %u chunks per image",
                       (unsigned long long)m->stream_len, m->chunk_size, (unsigned long long)count,
                       (unsigned)FS_CHUNKS_MAX);
    if (len < FS_INDEX_HEAD_SIZE + 8 || (len - FS_INDEX_HEAD_SIZE - 8) % esize ||
        (len - FS_INDEX_HEAD_SIZE - 8) / esize != count)
        return refuse(job, FS_ERR_CORRUPT, (int64_t)t->index_offset,
                      "index size does not match the stream length");
    uint8_t head[FS_INDEX_HEAD_SIZE];
    struct fs_why why;
    int r = read_at(img->fd, head, sizeof head, t->index_offset, job);
    if (r < 0)
        return r;
    r = fs_decode_index_head(head, len, count, &why);
    if (r < 0)
        return refuse_decoded(job, r, &why, t->index_offset);
    img->entries = malloc((count ? count : 1) * sizeof *img->entries);
    if (t->major != FS_FORMAT_MAJOR)
        img->channel_of = malloc(count ? count : 1);
    uint8_t *batch = malloc(INDEX_BATCH * esize);
    struct fs_hash *hash = fs_hash_new();
    if (!img->entries || !batch || !hash || (t->major != FS_FORMAT_MAJOR && !img->channel_of))
        r = fs_fail(job, FS_ERR_NOMEM, ENOMEM, -1, -1, "out of memory for the index");
    if (r == 0)
        fs_hash_update(hash, head + 8, FS_INDEX_HEAD_SIZE - 8);
    for (uint64_t i = 0; r == 0 && i < count; i += INDEX_BATCH) {
        uint64_t n = count - i < INDEX_BATCH ? count - i : INDEX_BATCH;
        r = read_at(img->fd, batch, n * esize, t->index_offset + FS_INDEX_HEAD_SIZE + i * esize, job);
        if (r == 0)
            fs_hash_update(hash, batch, n * esize);
        for (uint64_t j = 0; r == 0 && j < n; j++) {
            uint32_t channel;
            int bad = fs_decode_entry(batch + j * esize, &img->entries[i + j], t->major, &channel);
            if (bad || channel >= m->channels)
                channel = FS_CHANNELS_MAX; /* refused below, once the checksum passed */
            if (img->channel_of)
                img->channel_of[i + j] = (uint8_t)channel;
        }
    }
    uint8_t sum[8];
    if (r == 0)
        r = read_at(img->fd, sum, 8, t->trailer_offset - 8, job);
    if (r == 0 && fs_get64(sum) != fs_hash_digest(hash))
        r = refuse(job, FS_ERR_CORRUPT, (int64_t)t->index_offset, "index checksum mismatch");
    free(batch);
    if (hash)
        fs_hash_free(hash);
    if (r < 0)
        return r;

    uint64_t stored = 0, seen[FS_CHANNELS_MAX] = {0}, image_chain = FS_CHAIN_SEED;
    uint64_t last[FS_CHANNELS_MAX];
    for (uint32_t c = 0; c < m->channels; c++)
        last[c] = fs_channel_seed(t->major, c);
    for (uint64_t i = 0; i < count; i++) {
        uint32_t c = img->channel_of ? img->channel_of[i] : 0;
        const struct fs_entry *e = &img->entries[i];
        const char *why = c >= m->channels ? "channel out of range or reserved bytes set"
                          : check_entry(img, e, seen[c], img->channel_count[c], m->channel_len[c]);
        if (why)
            return fs_fail(job, FS_ERR_CORRUPT, EBADMSG, (int64_t)i,
                           (int64_t)(t->index_offset + FS_INDEX_HEAD_SIZE + i * esize),
                           "index entry of chunk %llu: %s", (unsigned long long)i, why);
        seen[c]++;
        last[c] = e->chain;
        image_chain = fs_image_chain(image_chain, i, e->chain, c);
        stored += e->stored_len;
        img->compressed += e->flags & FS_ENTRY_COMPRESSED;
    }
    if (stored != t->meta_offset - img->chunks_offset)
        return refuse(job, FS_ERR_CORRUPT, (int64_t)t->meta_offset, "chunk sizes do not add up to the payload");
    if (t->major == FS_FORMAT_MAJOR) {
        if (last[0] != t->final_chain)
            return refuse(job, FS_ERR_CORRUPT, (int64_t)t->trailer_offset,
                          "index does not end in the trailer's chain value");
    } else {
        /* each channel has all its chunks (check_entry refused any beyond) */
        for (uint32_t c = 0; c < m->channels; c++)
            if (seen[c] != img->channel_count[c] || last[c] != m->channel_chain[c])
                return fs_fail(job, FS_ERR_CORRUPT, EBADMSG, -1, (int64_t)t->meta_offset,
                               "channel %u: the index does not end in the metadata's chain value", c);
        if (image_chain != t->final_chain)
            return refuse(job, FS_ERR_CORRUPT, (int64_t)t->trailer_offset,
                          "index does not end in the trailer's image chain value");
    }
    img->count = count;
    return 0;
}

int fs_image_open(int fd, struct fs_image *img, struct fs_job *job)
{
    struct stat st;
    uint8_t header[FS_LV_HEADER_SIZE], tail[FS_TRAILER_SIZE];
    memset(img, 0, sizeof *img);
    img->fd = fd;
    if (fstat(fd, &st) != 0)
        return fs_fail(job, FS_ERR_IO, errno, -1, -1, "stat of the image: %s", strerror(errno));
    if (!S_ISREG(st.st_mode))
        return refuse(job, FS_ERR_NOT_IMAGE, -1, "the image is not a regular file");
    img->file_size = (uint64_t)st.st_size;
    if (img->file_size < FS_LV_HEADER_SIZE) {
        if (img->file_size && read_at(fd, header, img->file_size, 0, job) < 0)
            return -EIO;
        int partial = img->file_size == 0 || fs_lv_header_prefix(header, img->file_size);
        return refuse(job, partial ? FS_ERR_TRUNCATED : FS_ERR_NOT_IMAGE, (int64_t)img->file_size,
                   partial ? "image ends inside its header" : "not a save image");
    }
    int r = read_at(fd, header, sizeof header, 0, job);
    if (r == 0)
        r = check_header(img, header, job);
    if (r < 0)
        return r;
    uint64_t payload_offset = img->trailer.payload_offset;
    if (img->file_size < payload_offset + FS_TRAILER_SIZE)
        return refuse(job, FS_ERR_TRUNCATED, (int64_t)img->file_size, "image ends before its trailer");
    r = read_at(fd, tail, sizeof tail, img->file_size - FS_TRAILER_SIZE, job);
    if (r < 0)
        return r;
    struct fs_why why;
    r = fs_decode_trailer(tail, &img->trailer, &why);
    if (r < 0)
        return refuse_decoded(job, r, &why, img->file_size - FS_TRAILER_SIZE);
    r = check_layout(img, job);
    if (r == 0)
        r = check_prefix(img, payload_offset, job);
    if (r == 0)
        r = check_meta(img, job);
    if (r == 0)
        r = check_guard(img, job);
    if (r == 0)
        r = check_index(img, job);
    return r;
}

void fs_image_close(struct fs_image *img)
{
    free(img->meta_buf);
    free(img->entries);
    free(img->channel_of);
    img->meta_buf = NULL;
    img->entries = NULL;
    img->channel_of = NULL;
}

int fs_inspect(int image_fd, struct fs_image_info *info, struct fs_job *job)
{
    struct fs_image img;
    memset(info, 0, sizeof *info);
    int r = fs_image_open(image_fd, &img, job);
    if (r == 0) {
        const struct fs_meta *m = &img.meta;
        info->major = m->major;
        info->minor = m->minor;
        info->libvirt_format = img.lv_format;
        info->codec = m->codec;
        info->level = m->level;
        info->chunk_size = m->chunk_size;
        info->was_running = m->was_running;
        info->auto_mode = m->auto_mode;
        info->stream_len = m->stream_len;
        info->channels = m->channels;
        for (uint32_t c = 0; c < m->channels; c++)
            info->channel_len[c] = m->channel_len[c];
        info->chunk_count = img.count;
        info->chunks_compressed = img.compressed;
        info->payload_offset = img.trailer.payload_offset;
        info->payload_len = img.trailer.meta_offset - img.trailer.payload_offset;
        info->file_size = img.file_size;
        info->xml_offset = FS_LV_HEADER_SIZE;
        info->xml_len = img.xml_len;
        info->created_ns = m->created_ns;
        memcpy(info->uuid, m->uuid, 16);
        info->name_len = m->name_len;
        memcpy(info->name, m->name, m->name_len);
        memcpy(info->version, m->version, m->version_len);
    }
    fs_image_close(&img);
    return r;
}
