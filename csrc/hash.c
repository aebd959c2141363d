/* Every hash of the format: chunk digests, the chain that ties every chunk to
 * all before it, and whole-frame hashes (one call or in pieces). XXH3-64. */
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

struct fs_hash {
    XXH3_state_t state;
};

struct fs_hash *fs_hash_new(void)
{
    struct fs_hash *h = (struct fs_hash *)XXH3_createState();
    if (h)
        XXH3_64bits_reset(&h->state);
    return h;
}

void fs_hash_update(struct fs_hash *h, const void *data, size_t len)
{
    XXH3_64bits_update(&h->state, data, len);
}

uint64_t fs_hash_digest(const struct fs_hash *h)
{
    return XXH3_64bits_digest(&h->state);
}

void fs_hash_free(struct fs_hash *h)
{
    XXH3_freeState((XXH3_state_t *)h);
}
