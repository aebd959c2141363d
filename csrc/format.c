/* Encoding and decoding of the image's parts; layout in docs/image-format.md. */
#include "fs_internal.h"

static const char LV_MAGIC[16] = "LibvirtQemudSave";
static const char LV_PARTIAL_MAGIC[16] = "LibvirtQemudPart";
static const char META_TAG[8] = "FSV-META";
static const char INDEX_TAG[8] = "FSV-INDX";
static const char TAIL_TAG[8] = "FSV-TAIL";
static const char GUARD_TAG[8] = "FSV-CHAN";

#define META_FIXED 72u                /* major 1 */
#define META_FIXED2 80u               /* major 2: and the channel count */
#define CHANNEL_REC 16u               /* major 2 metadata: u64 length, u64 last chain value */
#define TRAILER_CONTENT (FS_TRAILER_SIZE - 8u)

static void put_skip_header(uint8_t *p, uint32_t content_len)
{
    fs_put32(p, FS_SKIP_MAGIC);
    fs_put32(p + 4, content_len);
}

/* The stream starts on an FS_ALIGN boundary so O_DIRECT can write it as is. */
uint64_t fs_payload_offset(uint64_t xml_len)
{
    return fs_align_up(FS_LV_HEADER_SIZE + xml_len + 1, FS_ALIGN);
}

/* libvirt's QEMU save header v2 (native endian, as libvirt writes it) and the
 * XML region: XML, NUL, zero padding. `buf` holds payload_offset zero bytes. */
void fs_encode_prefix(uint8_t *buf, uint64_t payload_offset, uint32_t lv_format,
                      uint32_t was_running, const char *xml, uint64_t xml_len)
{
    uint32_t words[6] = {2, (uint32_t)(payload_offset - FS_LV_HEADER_SIZE), was_running ? 1 : 0,
                         lv_format, 0, 0};
    memcpy(buf, LV_MAGIC, 16);
    memcpy(buf + 16, words, 5 * sizeof(uint32_t));
    if (xml_len)
        memcpy(buf + FS_LV_HEADER_SIZE, xml, xml_len);
}

static int refuse(struct fs_why *why, int kind, int64_t at, const char *what)
{
    why->kind = kind;
    why->at = at;
    why->what = what;
    return kind == FS_ERR_VERSION ? -EPROTONOSUPPORT : -EBADMSG;
}

/* 1 when the n < FS_LV_HEADER_SIZE bytes of a short file could be the start
 * of an image (a truncated one), 0 when they cannot. */
int fs_lv_header_prefix(const uint8_t *buf, size_t n)
{
    return memcmp(buf, LV_MAGIC, n < 16 ? n : 16) == 0;
}

/* `buf` holds the header's FS_LV_HEADER_SIZE bytes. */
int fs_decode_lv_header(const uint8_t *buf, struct fs_lv_header *h, struct fs_why *why)
{
    uint32_t words[5];
    if (memcmp(buf, LV_PARTIAL_MAGIC, 16) == 0)
        return refuse(why, FS_ERR_CORRUPT, 0, "the image is marked partial (an unfinished libvirt save)");
    if (memcmp(buf, LV_MAGIC, 16) != 0)
        return refuse(why, FS_ERR_NOT_IMAGE, 0, "not a save image (no libvirt QEMU save header)");
    memcpy(words, buf + 16, sizeof words);
    if (words[0] != 2)
        return refuse(why, FS_ERR_CORRUPT, 16, "libvirt header version is not 2");
    h->data_len = words[1];
    h->was_running = words[2];
    h->format = words[3];
    if (h->format != FS_LV_FORMAT_RAW && h->format != FS_LV_FORMAT_ZSTD)
        return refuse(why, FS_ERR_CORRUPT, 28, "libvirt header names a format fastsave does not write");
    if (FS_LV_HEADER_SIZE + (uint64_t)h->data_len > fs_payload_offset(FS_XML_MAX))
        return refuse(why, FS_ERR_CORRUPT, 20,
                      "libvirt header declares an XML region larger than the 64 MiB limit");
    return 0;
}

static uint32_t meta_major(const struct fs_meta *m)
{
    return m->channels > 1 ? FS_FORMAT_MAJOR_CHANNELS : FS_FORMAT_MAJOR;
}

size_t fs_meta_size(const struct fs_meta *m)
{
    if (meta_major(m) == FS_FORMAT_MAJOR)
        return 8 + fs_align_up(META_FIXED + m->name_len + m->version_len, 8) + 8;
    return 8 + fs_align_up(META_FIXED2 + m->name_len + m->version_len, 8) + CHANNEL_REC * m->channels + 8;
}

void fs_encode_meta(uint8_t *buf, const struct fs_meta *m)
{
    size_t total = fs_meta_size(m);
    uint8_t *c = buf + 8;
    size_t hash_at = total - 8 - 8;
    uint32_t major = meta_major(m);
    uint32_t fixed = major == FS_FORMAT_MAJOR ? META_FIXED : META_FIXED2;
    memset(buf, 0, total);
    put_skip_header(buf, (uint32_t)(total - 8));
    memcpy(c, META_TAG, 8);
    fs_put16(c + 8, (uint16_t)major);
    fs_put16(c + 10, FS_FORMAT_MINOR);
    fs_put32(c + 12, fixed);
    fs_put32(c + 16, m->codec);
    fs_put32(c + 20, (uint32_t)m->level);
    fs_put32(c + 24, m->chunk_size);
    fs_put32(c + 28, m->was_running);
    fs_put32(c + 32, m->auto_mode ? 1 : 0);
    fs_put16(c + 36, (uint16_t)m->name_len);
    fs_put16(c + 38, (uint16_t)m->version_len);
    fs_put64(c + 40, m->stream_len);
    fs_put64(c + 48, (uint64_t)m->created_ns);
    memcpy(c + 56, m->uuid, 16);
    if (m->name_len)
        memcpy(c + fixed, m->name, m->name_len);
    if (m->version_len)
        memcpy(c + fixed + m->name_len, m->version, m->version_len);
    if (major == FS_FORMAT_MAJOR_CHANNELS) {
        fs_put32(c + 72, m->channels);
        uint8_t *table = c + fs_align_up(fixed + m->name_len + m->version_len, 8);
        for (uint32_t i = 0; i < m->channels; i++) {
            fs_put64(table + CHANNEL_REC * i, m->channel_len[i]);
            fs_put64(table + CHANNEL_REC * i + 8, m->channel_chain[i]);
        }
    }
    fs_put64(c + hash_at, fs_digest(c, hash_at));
}

/* `buf` is the whole frame, `len` its size as located by the trailer. */
int fs_decode_meta(const uint8_t *buf, size_t len, struct fs_meta *m, struct fs_why *why)
{
    const uint8_t *c = buf + 8;
    size_t clen, fixed;
    if (len < 8 + META_FIXED + 8 || fs_get32(buf) != FS_SKIP_MAGIC)
        return refuse(why, FS_ERR_CORRUPT, 0, "metadata frame missing");
    clen = fs_get32(buf + 4);
    if (clen != len - 8 || memcmp(c, META_TAG, 8) != 0 || clen % 8 != 0)
        return refuse(why, FS_ERR_CORRUPT, 0, "metadata frame malformed");
    if (fs_get64(c + clen - 8) != fs_digest(c, clen - 8))
        return refuse(why, FS_ERR_CORRUPT, 0, "metadata checksum mismatch");
    m->major = fs_get16(c + 8);
    m->minor = fs_get16(c + 10);
    if (m->major != FS_FORMAT_MAJOR && m->major != FS_FORMAT_MAJOR_CHANNELS)
        return refuse(why, FS_ERR_VERSION, 0, "metadata has an unsupported major version");
    fixed = fs_get32(c + 12);
    m->codec = fs_get32(c + 16);
    m->level = (int32_t)fs_get32(c + 20);
    m->chunk_size = fs_get32(c + 24);
    m->was_running = fs_get32(c + 28);
    m->auto_mode = fs_get32(c + 32) & 1;
    m->name_len = fs_get16(c + 36);
    m->version_len = fs_get16(c + 38);
    m->stream_len = fs_get64(c + 40);
    m->created_ns = (int64_t)fs_get64(c + 48);
    memcpy(m->uuid, c + 56, 16);
    if (fixed < META_FIXED || fixed % 8 != 0 || m->name_len > FS_NAME_MAX - 1 ||
        m->version_len > FS_VERSION_MAX - 1 ||
        fixed + m->name_len + m->version_len > clen - 8)
        return refuse(why, FS_ERR_CORRUPT, 0, "metadata field lengths out of range");
    m->name = (const char *)c + fixed;
    m->version = (const char *)c + fixed + m->name_len;
    m->channels = 1;
    if (m->major == FS_FORMAT_MAJOR) {
        m->channel_len[0] = m->stream_len;
        return 0;
    }
    if (fixed < META_FIXED2)
        return refuse(why, FS_ERR_CORRUPT, 12, "metadata too short for a multi-channel image");
    m->channels = fs_get32(c + 72);
    /* one channel is always a major 1 image */
    if (m->channels < 2 || m->channels > FS_CHANNELS_MAX || fs_get32(c + 76) != 0)
        return refuse(why, FS_ERR_CORRUPT, 8 + 72, "metadata channel count out of range 2..64");
    size_t table_at = fs_align_up(fixed + m->name_len + m->version_len, 8);
    if (table_at + (size_t)CHANNEL_REC * m->channels + 8 != clen)
        return refuse(why, FS_ERR_CORRUPT, 0, "metadata channel table does not fit its frame");
    uint64_t total = 0;
    for (uint32_t i = 0; i < m->channels; i++) {
        m->channel_len[i] = fs_get64(c + table_at + CHANNEL_REC * i);
        m->channel_chain[i] = fs_get64(c + table_at + CHANNEL_REC * i + 8);
        if (m->channel_len[i] > UINT64_MAX - total)
            return refuse(why, FS_ERR_CORRUPT, 0, "metadata channel lengths overflow");
        total += m->channel_len[i];
    }
    if (total != m->stream_len)
        return refuse(why, FS_ERR_CORRUPT, 0, "metadata channel lengths do not add up to the stream length");
    return 0;
}

uint32_t fs_entry_size(uint32_t major)
{
    return major == FS_FORMAT_MAJOR ? FS_INDEX_ENTRY_SIZE : FS_INDEX_ENTRY2_SIZE;
}

size_t fs_index_size(uint64_t count, uint32_t major)
{
    return 8 + 16 + count * fs_entry_size(major) + 8;
}

/* The frame's content_len field is 32 bits: an index of more than 4 GiB
 * (impossible within FS_CHUNKS_MAX) would not be describable. */
void fs_encode_index_head(uint8_t *buf, uint64_t count, uint32_t major)
{
    put_skip_header(buf, (uint32_t)(fs_index_size(count, major) - 8));
    memcpy(buf + 8, INDEX_TAG, 8);
    fs_put64(buf + 16, count);
}

/* `buf` holds the frame's first FS_INDEX_HEAD_SIZE bytes; `frame_len` is the
 * frame's size as located by the trailer, `count` the chunk count the
 * metadata implies. */
int fs_decode_index_head(const uint8_t *buf, uint64_t frame_len, uint64_t count, struct fs_why *why)
{
    if (fs_get32(buf) != FS_SKIP_MAGIC || fs_get32(buf + 4) != frame_len - 8 ||
        memcmp(buf + 8, INDEX_TAG, 8) != 0 || fs_get64(buf + 16) != count)
        return refuse(why, FS_ERR_CORRUPT, 0, "index frame malformed");
    return 0;
}

size_t fs_encode_entry(uint8_t *buf, const struct fs_entry *e, uint32_t major, uint32_t channel)
{
    fs_put32(buf, e->raw_len);
    fs_put32(buf + 4, e->stored_len);
    fs_put32(buf + 8, e->flags);
    fs_put32(buf + 12, e->check);
    fs_put64(buf + 16, e->chain);
    if (major == FS_FORMAT_MAJOR)
        return FS_INDEX_ENTRY_SIZE;
    fs_put32(buf + 24, channel);
    fs_put32(buf + 28, 0);
    return FS_INDEX_ENTRY2_SIZE;
}

/* 0, or -EBADMSG for reserved bytes that are not zero. */
int fs_decode_entry(const uint8_t *buf, struct fs_entry *e, uint32_t major, uint32_t *channel)
{
    e->raw_len = fs_get32(buf);
    e->stored_len = fs_get32(buf + 4);
    e->flags = fs_get32(buf + 8);
    e->check = fs_get32(buf + 12);
    e->chain = fs_get64(buf + 16);
    *channel = 0;
    if (major == FS_FORMAT_MAJOR)
        return 0;
    *channel = fs_get32(buf + 24);
    return fs_get32(buf + 28) == 0 ? 0 : -EBADMSG;
}

void fs_encode_trailer(uint8_t *buf, const struct fs_trailer *t)
{
    uint8_t *c = buf + 8;
    memset(buf, 0, FS_TRAILER_SIZE);
    put_skip_header(buf, TRAILER_CONTENT);
    fs_put64(c + 8, t->payload_offset);
    fs_put64(c + 16, t->meta_offset);
    fs_put64(c + 24, t->index_offset);
    fs_put64(c + 32, t->trailer_offset);
    fs_put64(c + 40, t->prefix_hash);
    fs_put64(c + 48, t->final_chain);
    uint32_t major = t->channels > 1 ? FS_FORMAT_MAJOR_CHANNELS : FS_FORMAT_MAJOR;
    if (major == FS_FORMAT_MAJOR_CHANNELS)
        fs_put32(c + 56, t->channels);
    fs_put16(c + 104, (uint16_t)major);
    fs_put16(c + 106, FS_FORMAT_MINOR);
    fs_put32(c + 108, TRAILER_CONTENT);
    memcpy(c + 112, TAIL_TAG, 8);
    fs_put64(c, fs_digest(c + 8, TRAILER_CONTENT - 8));
}

/* The file's last 8 bytes are the tag and the 8 before them say the version,
 * so a reader can tell a truncated file from a newer format. */
int fs_decode_trailer(const uint8_t *buf, struct fs_trailer *t, struct fs_why *why)
{
    const uint8_t *c = buf + 8;
    if (memcmp(c + 112, TAIL_TAG, 8) != 0)
        return refuse(why, FS_ERR_TRUNCATED, 0,
                      "no trailer at the end of the file: the image is truncated or its end is damaged");
    t->major = fs_get16(c + 104);
    t->minor = fs_get16(c + 106);
    if (t->major != FS_FORMAT_MAJOR && t->major != FS_FORMAT_MAJOR_CHANNELS)
        return refuse(why, FS_ERR_VERSION, 0, "unsupported image format major version");
    if (fs_get32(c + 108) != TRAILER_CONTENT || fs_get32(buf) != FS_SKIP_MAGIC ||
        fs_get32(buf + 4) != TRAILER_CONTENT)
        return refuse(why, FS_ERR_CORRUPT, 0, "trailer frame malformed");
    if (fs_get64(c) != fs_digest(c + 8, TRAILER_CONTENT - 8))
        return refuse(why, FS_ERR_CORRUPT, 0, "trailer checksum mismatch");
    t->payload_offset = fs_get64(c + 8);
    t->meta_offset = fs_get64(c + 16);
    t->index_offset = fs_get64(c + 24);
    t->trailer_offset = fs_get64(c + 32);
    t->prefix_hash = fs_get64(c + 40);
    t->final_chain = fs_get64(c + 48);
    t->channels = t->major == FS_FORMAT_MAJOR ? 1 : fs_get32(c + 56);
    if (t->major == FS_FORMAT_MAJOR_CHANNELS && (t->channels < 2 || t->channels > FS_CHANNELS_MAX))
        return refuse(why, FS_ERR_CORRUPT, 8 + 56, "trailer channel count out of range 2..64");
    return 0;
}

/* The first FS_GUARD_SIZE payload bytes of a major 2 image: what libvirt's
 * own restore would hand QEMU first (as is, or decoded by zstd). They are
 * not QEMU's stream magic, so QEMU refuses the interleaved channels at once
 * instead of reading one channel's bytes as the whole stream. */
void fs_encode_guard(uint8_t *buf, uint32_t codec)
{
    memset(buf, 0, FS_GUARD_SIZE);
    uint8_t *content = buf;
    if (codec == FS_CODEC_ZSTD) {
        size_t at = fs_raw_frame_header(buf, FS_GUARD_SIZE - 12);
        fs_raw_block_header(buf + at, FS_GUARD_SIZE - 12, 1);
        content = buf + at + 3;
    }
    memcpy(content, GUARD_TAG, 8);
}

/* A stored chunk inside a zstd image is a zstd frame of raw blocks:
 * any zstd decoder reproduces it at memcpy speed. */
size_t fs_raw_frame_size(size_t raw_len)
{
    size_t blocks = (raw_len + FS_RAW_BLOCK_MAX - 1) / FS_RAW_BLOCK_MAX;
    return 9 + raw_len + 3 * blocks;
}

size_t fs_raw_frame_header(uint8_t *buf, size_t raw_len)
{
    fs_put32(buf, FS_ZSTD_MAGIC);
    buf[4] = 0xA0; /* 4-byte content size, single segment, no checksum */
    fs_put32(buf + 5, (uint32_t)raw_len);
    return 9;
}

void fs_raw_block_header(uint8_t *buf, size_t block_len, int last)
{
    uint32_t v = (uint32_t)(block_len << 3) | (last ? 1u : 0u); /* block type 0: raw */
    buf[0] = (uint8_t)v;
    buf[1] = (uint8_t)(v >> 8);
    buf[2] = (uint8_t)(v >> 16);
}

/* A stored chunk's frame is fully determined by its data: every header byte
 * must be exactly what fastsave writes, so no flipped bit goes unnoticed. */
int fs_raw_frame_decode(const uint8_t *src, size_t stored_len, uint8_t *dst, size_t raw_len)
{
    uint8_t want[9];
    if (stored_len != fs_raw_frame_size(raw_len))
        return -EBADMSG;
    fs_raw_frame_header(want, raw_len);
    if (memcmp(src, want, 9) != 0)
        return -EBADMSG;
    src += 9;
    while (raw_len) {
        size_t k = raw_len < FS_RAW_BLOCK_MAX ? raw_len : FS_RAW_BLOCK_MAX;
        fs_raw_block_header(want, k, k == raw_len);
        if (memcmp(src, want, 3) != 0)
            return -EBADMSG;
        memcpy(dst, src + 3, k);
        src += 3 + k;
        dst += k;
        raw_len -= k;
    }
    return 0;
}
