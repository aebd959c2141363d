/* Job bookkeeping: clocks, first-error-wins failure records, atomic stats. */
#include "fs_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

uint64_t fs_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t fs_thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Records the first failure of a call; later ones are consequences of it.
 * Returns -err (or -EIO when err is 0) so callers can `return fs_fail(...)`. */
int fs_fail(struct fs_job *job, int kind, int err, int64_t chunk, int64_t offset,
            const char *fmt, ...)
{
    int expected = 0;
    if (__atomic_compare_exchange_n(&job->claimed, &expected, 1, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(job->error.msg, sizeof job->error.msg, fmt, ap);
        va_end(ap);
        job->error.err = err;
        job->error.chunk = chunk;
        job->error.offset = offset;
        __atomic_store_n(&job->error.kind, kind, __ATOMIC_RELEASE);
    }
    return err ? -err : -EIO;
}

int fs_failed(struct fs_job *job)
{
    return __atomic_load_n(&job->claimed, __ATOMIC_ACQUIRE) != 0;
}

int fs_cancelled(struct fs_job *job)
{
    if (__atomic_load_n(&job->cancel, __ATOMIC_RELAXED)) {
        fs_fail(job, FS_ERR_CANCELLED, ECANCELED, -1, -1, "cancelled");
        return 1;
    }
    return fs_failed(job);
}

void fs_stat_add(uint64_t *field, uint64_t v) { __atomic_fetch_add(field, v, __ATOMIC_RELAXED); }
void fs_stat_set(uint64_t *field, uint64_t v) { __atomic_store_n(field, v, __ATOMIC_RELAXED); }
void fs_stat_set32(uint32_t *field, uint32_t v) { __atomic_store_n(field, v, __ATOMIC_RELAXED); }

void *fs_aligned_alloc(size_t size)
{
    void *p = NULL;
    if (posix_memalign(&p, FS_ALIGN, fs_align_up(size ? size : 1, FS_ALIGN)) != 0)
        return NULL;
    return p;
}
