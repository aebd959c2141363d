/* The lock and the three wake-ups shared by a pipeline's threads. */
#include "fs_internal.h"

#include <time.h>

#define WAIT_SLICE_NS 100000000L

void fs_sync_init(struct fs_sync *sync, struct fs_job *job)
{
    memset(sync, 0, sizeof *sync);
    sync->job = job;
    pthread_mutex_init(&sync->mu, NULL);
    pthread_cond_init(&sync->cv_free, NULL);
    pthread_cond_init(&sync->cv_work, NULL);
    pthread_cond_init(&sync->cv_ready, NULL);
}

void fs_sync_destroy(struct fs_sync *sync)
{
    pthread_mutex_destroy(&sync->mu);
    pthread_cond_destroy(&sync->cv_free);
    pthread_cond_destroy(&sync->cv_work);
    pthread_cond_destroy(&sync->cv_ready);
}

static void wake_all(struct fs_sync *sync)
{
    sync->stop = 1;
    pthread_cond_broadcast(&sync->cv_free);
    pthread_cond_broadcast(&sync->cv_work);
    pthread_cond_broadcast(&sync->cv_ready);
}

/* Call with the lock held. */
void fs_sync_stop_locked(struct fs_sync *sync) { wake_all(sync); }

void fs_sync_stop(struct fs_sync *sync)
{
    pthread_mutex_lock(&sync->mu);
    wake_all(sync);
    pthread_mutex_unlock(&sync->mu);
}

/* Timed wait (lock held) so a cancel from outside is seen even when nothing moves. */
void fs_sync_wait(struct fs_sync *sync, pthread_cond_t *cv)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += WAIT_SLICE_NS;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(cv, &sync->mu, &ts);
    if (!sync->stop && fs_cancelled(sync->job))
        wake_all(sync);
}
