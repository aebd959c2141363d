/* Chunk digests and the chain that ties every chunk to all before it. */
#include "fs_internal.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

uint64_t fs_digest(const void *data, size_t len)
{
    return XXH3_64bits(data, len);
}

/* Digests are computed in parallel; the chain is folded in order by one
 * thread, so a reordered, dropped or duplicated chunk changes every later link. */
uint64_t fs_chain(uint64_t prev, uint64_t seq, uint64_t digest, uint32_t raw_len)
{
    uint8_t rec[20];
    fs_put64(rec, seq);
    fs_put64(rec + 8, digest);
    fs_put32(rec + 16, raw_len);
    return XXH3_64bits_withSeed(rec, sizeof rec, prev);
}
