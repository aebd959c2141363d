/* The index built while saving: 24 bytes per chunk (24 KiB per GiB of stream
 * at 1 MiB chunks), the only state that grows with the stream. */
#include "fs_internal.h"

#include <stdlib.h>

void fs_index_init(struct fs_index_build *b)
{
    memset(b, 0, sizeof *b);
    b->chain = FS_CHAIN_SEED;
}

int fs_index_add(struct fs_index_build *b, uint32_t raw_len, uint32_t stored_len, uint32_t flags,
                 uint32_t check, uint64_t digest)
{
    if (b->count == b->cap) {
        uint64_t ncap = b->cap ? b->cap * 2 : 1024;
        struct fs_entry *n = realloc(b->e, ncap * sizeof *n);
        if (!n)
            return -ENOMEM;
        b->e = n;
        b->cap = ncap;
    }
    b->chain = fs_chain(b->chain, b->count, digest, raw_len);
    b->e[b->count++] = (struct fs_entry){raw_len, stored_len, flags, check, b->chain};
    b->stream_len += raw_len;
    b->compressed += (flags & FS_ENTRY_COMPRESSED) != 0;
    return 0;
}

void fs_index_free(struct fs_index_build *b)
{
    free(b->e);
    b->e = NULL;
}
