/* The lock and the three wake-ups shared by a pipeline's threads. */
#include "fs_internal.h"

#include <time.h>

#define WAIT_SLICE_NS 100000000L

void fs_sync_init(struct fs_sync *y, struct fs_job *job)
{
    memset(y, 0, sizeof *y);
    y->job = job;
    pthread_mutex_init(&y->mu, NULL);
    pthread_cond_init(&y->cv_free, NULL);
    pthread_cond_init(&y->cv_work, NULL);
    pthread_cond_init(&y->cv_ready, NULL);
}

void fs_sync_destroy(struct fs_sync *y)
{
    pthread_mutex_destroy(&y->mu);
    pthread_cond_destroy(&y->cv_free);
    pthread_cond_destroy(&y->cv_work);
    pthread_cond_destroy(&y->cv_ready);
}

static void wake_all(struct fs_sync *y)
{
    y->stop = 1;
    pthread_cond_broadcast(&y->cv_free);
    pthread_cond_broadcast(&y->cv_work);
    pthread_cond_broadcast(&y->cv_ready);
}

/* Call with the lock held. */
void fs_sync_stop_locked(struct fs_sync *y) { wake_all(y); }

void fs_sync_stop(struct fs_sync *y)
{
    pthread_mutex_lock(&y->mu);
    wake_all(y);
    pthread_mutex_unlock(&y->mu);
}

/* Timed wait (lock held) so a cancel from outside is seen even when nothing moves. */
void fs_sync_wait(struct fs_sync *y, pthread_cond_t *cv)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += WAIT_SLICE_NS;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(cv, &y->mu, &ts);
    if (!y->stop && fs_cancelled(y->job))
        wake_all(y);
}
