/* The index built while saving: 24 bytes per chunk (24 KiB per GiB of stream
 * at 1 MiB chunks), the only state that grows with the stream, bounded by
 * FS_CHUNKS_MAX chunks (384 MiB). */
#include "fs_internal.h"

#include <stdlib.h>

void fs_index_init(struct fs_index_build *b, uint32_t channels)
{
    memset(b, 0, sizeof *b);
    b->max = FS_CHUNKS_MAX;
    b->channels = channels;
    b->major = channels > 1 ? FS_FORMAT_MAJOR_CHANNELS : FS_FORMAT_MAJOR;
    b->chain = FS_CHAIN_SEED;
    b->image_chain = FS_CHAIN_SEED;
    for (uint32_t c = 0; c < channels && c < FS_CHANNELS_MAX; c++)
        b->channel_chain[c] = fs_channel_seed(b->major, c);
}

/* Called in file order by the one thread that writes the image. */
int fs_index_add(struct fs_index_build *b, uint32_t channel, uint32_t raw_len, uint32_t stored_len,
                 uint32_t flags, uint32_t check, uint64_t digest)
{
    if (b->count >= b->max)
        return -EFBIG;
    if (b->count == b->cap) {
        uint64_t cap = b->cap ? b->cap * 2 : 1024;
        if (cap > b->max)
            cap = b->max;
        struct fs_entry *grown = realloc(b->e, cap * sizeof *grown);
        if (!grown)
            return -ENOMEM;
        b->e = grown;
        if (b->channels > 1) {
            uint8_t *of = realloc(b->channel_of, cap);
            if (!of)
                return -ENOMEM;
            b->channel_of = of;
        }
        b->cap = cap;
    }
    uint64_t chain = fs_chain(b->channel_chain[channel], b->channel_count[channel], digest, raw_len);
    b->channel_chain[channel] = chain;
    b->channel_count[channel]++;
    b->channel_len[channel] += raw_len;
    if (b->channels > 1) {
        b->channel_of[b->count] = (uint8_t)channel;
        b->image_chain = fs_image_chain(b->image_chain, b->count, chain, channel);
    }
    b->chain = chain;
    b->e[b->count++] = (struct fs_entry){raw_len, stored_len, flags, check, chain};
    b->stream_len += raw_len;
    return 0;
}

void fs_index_free(struct fs_index_build *b)
{
    free(b->e);
    free(b->channel_of);
    b->e = NULL;
    b->channel_of = NULL;
}

/* Records a failure of fs_index_add as the job's error. */
int fs_index_fail(const struct fs_index_build *b, int rc, uint32_t chunk_size, struct fs_job *job)
{
    if (rc == -EFBIG)
        return fs_fail(job, FS_ERR_ARG, EFBIG, (int64_t)b->count, -1,
                       "the stream is longer than %llu chunks of %u bytes, the most an image holds; "
                       "use a larger chunk size",
                       (unsigned long long)b->max, chunk_size);
    return fs_fail(job, FS_ERR_NOMEM, ENOMEM, (int64_t)b->count, -1, "out of memory for the index");
}
