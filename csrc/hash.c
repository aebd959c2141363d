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

/* Major 1 chains its one channel from the plain seed; major 2 gives each
 * channel its own start, so a chunk moved to another channel at the same
 * position with the same bytes still changes that channel's chain. */
uint64_t fs_channel_seed(uint32_t major, uint32_t channel)
{
    return major == FS_FORMAT_MAJOR ? FS_CHAIN_SEED : fs_chain(FS_CHAIN_SEED, UINT64_MAX, channel, 0);
}

/* The whole image's chain (major 2): each index entry in file order, by its
 * channel and its channel's chain value (which covers its data). */
uint64_t fs_image_chain(uint64_t prev, uint64_t i, uint64_t chain, uint32_t channel)
{
    return fs_chain(prev, i, chain, channel);
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
