/* Cancellation: cancelling saves and restores from another thread. */
#include "harness.h"

static void cancel_save_case(int mode, int splice, int idle, int preset)
{
    char path[64], dom[64], listing[256];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    int fds[2] = {-1, -1};
    pthread_t pth, cth;
    int have_p = 0, have_c = 0;
    struct producer p = {0};
    struct fs_job job;
    struct fs_save_opts o;
    struct canceller cc = {.job = &job, .delay_ms = 150};

    case_begin("cancel save %s splice=%d %s", mode_name(mode), splice,
               preset ? "preset" : idle ? "idle producer" : "trickling producer");
    SETUP(dir_fd >= 0);
    SETUP(pipe2(fds, O_CLOEXEC) == 0);
    fill_opts(&o, 5, mode, 1, 2, 0, CH, splice, 0, 1, dom);
    p.fd = fds[1];
    p.trickle = !idle;
    p.idle = idle;
    SETUP(pthread_create(&pth, NULL, producer_main, &p) == 0);
    have_p = 1;
    memset(&job, 0, sizeof job);
    if (preset)
        job.cancel = 1;
    else {
        SETUP(pthread_create(&cth, NULL, canceller_main, &cc) == 0);
        have_c = 1;
    }
    double t0 = now_s();
    int rc = fs_save(fds[0], dir_fd, "cancelled.sav", &o, &job);
    double dt = now_s() - t0;
    EXPECT(rc == -ECANCELED, "rc %d (%s) kind %s: %s", rc, strerror(-rc), kind_name(job.error.kind), job.error.msg);
    EXPECT(job.error.kind == FS_ERR_CANCELLED, "kind %s", kind_name(job.error.kind));
    EXPECT(dt < 3.0, "took %.2f s to notice the cancel", dt);
    EXPECT(job.stats.done == 1, "stats.done");
    int n = list_dir(dir_fd, listing, sizeof listing);
    EXPECT(n == 0, "left behind: %s", listing);
    if (!preset && !idle)
        EXPECT(job.stats.bytes_in > 0, "no data moved before the cancel");
out:
    if (have_c)
        pthread_join(cth, NULL);
    __atomic_store_n(&p.stop, 1, __ATOMIC_RELEASE);
    if (fds[0] >= 0)
        close(fds[0]);
    if (have_p)
        pthread_join(pth, NULL);
    else if (fds[1] >= 0)
        close(fds[1]);
    remove_dir(dir_fd, path);
    case_end();
}

/* A restore whose consumer does not read: it blocks on output until cancelled. */
static void cancel_restore_case(int threads, int out_kind, size_t pre_read)
{
    char dom[64];
    struct fs_save_opts o;
    struct fs_job job;
    size_t len = 4 * (size_t)BIG_CH;
    const uint8_t *data = g_content[C_MIXED];
    int img_fd = -1, fds[2] = {-1, -1};
    pthread_t th, cth;
    int have_t = 0;
    struct consumer c = {0};
    struct canceller cc = {.job = &job, .delay_ms = 200};

    case_begin("cancel restore threads=%d out=%s consumer stalls after %zu bytes", threads,
               out_name[out_kind], pre_read);
    fill_opts(&o, 6, FS_MODE_ZSTD, 1, 2, 0, CH, 0, 0, 0, dom);
    memset(&job, 0, sizeof job);
    int rc = run_save(data, len, IN_PIPE, g_tmp_dir, "to-cancel.sav", &o, &job, 6);
    SETUP(rc == 0);
    img_fd = openat(g_tmp_dir, "to-cancel.sav", O_RDONLY | O_CLOEXEC);
    SETUP(img_fd >= 0);
    SETUP(make_channel(out_kind == OUT_SOCK ? IN_SOCK : IN_PIPE, fds) == 0);
    c.fd = fds[0];
    c.expect = data;
    c.len = len;
    c.gate = 1;
    c.pre_read = pre_read;
    SETUP(pthread_create(&th, NULL, consumer_main, &c) == 0);
    have_t = 1;
    memset(&job, 0, sizeof job);
    SETUP(pthread_create(&cth, NULL, canceller_main, &cc) == 0);
    struct fs_restore_opts ro = {.threads = threads};
    double t0 = now_s();
    rc = fs_restore(img_fd, fds[1], &ro, &job);
    double dt = now_s() - t0;
    pthread_join(cth, NULL);
    close(fds[1]);
    fds[1] = -1;
    __atomic_store_n(&c.gate, 0, __ATOMIC_RELEASE);
    pthread_join(th, NULL);
    have_t = 0;
    EXPECT(rc == -ECANCELED, "rc %d kind %s: %s", rc, kind_name(job.error.kind), job.error.msg);
    EXPECT(job.error.kind == FS_ERR_CANCELLED, "kind %s", kind_name(job.error.kind));
    EXPECT(dt < 3.0, "took %.2f s", dt);
    EXPECT(!c.mismatch && c.got < len, "consumer got %zu of %zu, mismatch %d at %zu", c.got, len, c.mismatch,
           c.bad_at);
out:
    if (have_t) {
        if (fds[1] >= 0)
            close(fds[1]);
        __atomic_store_n(&c.gate, 0, __ATOMIC_RELEASE);
        pthread_join(th, NULL);
    }
    if (img_fd >= 0)
        close(img_fd);
    unlinkat(g_tmp_dir, "to-cancel.sav", 0);
    case_end();
}

static void group_cancel(void)
{
    double t0 = now_s();
    cancel_save_case(FS_MODE_RAW, 0, 0, 0);
    cancel_save_case(FS_MODE_RAW, 1, 0, 0);
    cancel_save_case(FS_MODE_ZSTD, 0, 0, 0);
    cancel_save_case(FS_MODE_AUTO, 0, 0, 0);
    cancel_save_case(FS_MODE_ZSTD, 0, 1, 0);
    cancel_save_case(FS_MODE_RAW, 1, 1, 0);
    cancel_save_case(FS_MODE_ZSTD, 0, 0, 1);
    cancel_save_case(FS_MODE_RAW, 1, 0, 1);
    cancel_restore_case(1, OUT_PIPE, 0);
    cancel_restore_case(3, OUT_PIPE, 0);
    cancel_restore_case(2, OUT_PIPE, 4096 + 100);
    cancel_restore_case(2, OUT_SOCK, 0);
    printf("cancel: %.1f s\n", now_s() - t0);
}

TEST_GROUP("cancel", 40, group_cancel);
