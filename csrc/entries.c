/* The index built while saving: 24 bytes per chunk (24 KiB per GiB of stream
 * at 1 MiB chunks), the only state that grows with the stream, bounded by
 * FS_CHUNKS_MAX chunks (384 MiB). */
#include "fs_internal.h"

#include <stdlib.h>

void fs_index_init(struct fs_index_build *b)
{
    memset(b, 0, sizeof *b);
    b->max = FS_CHUNKS_MAX;
    b->chain = FS_CHAIN_SEED;
}

int fs_index_add(struct fs_index_build *b, uint32_t raw_len, uint32_t stored_len, uint32_t flags,
                 uint32_t check, uint64_t digest)
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
        b->cap = cap;
    }
    b->chain = fs_chain(b->chain, b->count, digest, raw_len);
    b->e[b->count++] = (struct fs_entry){raw_len, stored_len, flags, check, b->chain};
    b->stream_len += raw_len;
    return 0;
}

void fs_index_free(struct fs_index_build *b)
{
    free(b->e);
    b->e = NULL;
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
