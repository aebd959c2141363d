/* Test guest: keeps a counter and keeps changing its memory, forever.
 *
 * It dirties pages of an 8 MiB working set at 4 MiB, below where tests load
 * bulk memory content (16 MiB and up), so that content stays as loaded.
 * The state page at STATE_ADDR lets the host check from outside (QMP
 * pmemsave) that a restored guest continued instead of booting again:
 * `boot_id` is drawn once per boot, `counter` only grows.
 */
typedef unsigned int u32;
typedef unsigned long long u64;

#define STATE_ADDR 0x00200000u
#define DIRTY_START 0x00400000u
#define DIRTY_PAGES 2048u /* an 8 MiB working set: saves stay comparable over time */
#define STATE_MAGIC 0x46535447u /* "FSTG" */

struct state {
    volatile u32 magic;
    volatile u32 boot_id_lo, boot_id_hi;
    volatile u32 counter_lo, counter_hi;
    volatile u32 mem_bytes;
    volatile u32 writes_lo, writes_hi;
};

struct multiboot_info {
    u32 flags, mem_lower, mem_upper;
};

static u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static u32 xorshift(u32 *s)
{
    u32 x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

void guest_main(u32 magic, const struct multiboot_info *mbi)
{
    struct state *st = (struct state *)STATE_ADDR;
    u64 id = rdtsc();
    u32 mem = 64u << 20;
    if (magic == 0x2BADB002u && (mbi->flags & 1))
        mem = (mbi->mem_upper + 1024u) * 1024u;
    st->boot_id_lo = (u32)id;
    st->boot_id_hi = (u32)(id >> 32) | 1u;
    st->counter_lo = st->counter_hi = 0;
    st->writes_lo = st->writes_hi = 0;
    st->mem_bytes = mem;
    st->magic = STATE_MAGIC;

    u32 seed = (u32)id | 1u;
    u32 pages = (mem - DIRTY_START) / 4096u;
    if (pages > DIRTY_PAGES)
        pages = DIRTY_PAGES;
    for (;;) {
        /* Dirty a few words in a pseudo-random page, then count. */
        u32 page = xorshift(&seed) % pages;
        volatile u32 *p = (volatile u32 *)(DIRTY_START + page * 4096u + (xorshift(&seed) & 0xFC0u));
        for (int i = 0; i < 16; i++)
            p[i] = seed + (u32)i;
        if (++st->writes_lo == 0)
            st->writes_hi++;
        if (++st->counter_lo == 0)
            st->counter_hi++;
    }
}
