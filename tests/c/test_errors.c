/* The image cannot be written (file size limit): the save fails cleanly. */
#include "harness.h"

#include <sys/resource.h>

static void write_error_case(int mode, int splice, int direct, int threads)
{
    char path[64], dom[64], listing[256];
    int dir_fd = make_dir(direct ? "/var/tmp" : "/tmp", path, sizeof path);
    struct fs_save_opts o;
    struct fs_job job;
    struct rlimit old, lim;
    int limited = 0;
    case_begin("write error (EFBIG) %s splice=%d direct=%d threads=%d", mode_name(mode), splice, direct, threads);
    SETUP(dir_fd >= 0);
    fill_opts(&o, 60, mode, 1, threads, direct, CH, splice, 0, 1, dom);
    SETUP(getrlimit(RLIMIT_FSIZE, &old) == 0);
    lim = old;
    lim.rlim_cur = 300 * KIB;
    SETUP(setrlimit(RLIMIT_FSIZE, &lim) == 0);
    limited = 1;
    memset(&job, 0, sizeof job);
    double t0 = now_s();
    int rc = run_save(g_content[C_RANDOM], 4 * (size_t)BIG_CH, IN_PIPE, dir_fd, "big.sav", &o, &job, 7);
    double dt = now_s() - t0;
    setrlimit(RLIMIT_FSIZE, &old);
    limited = 0;
    EXPECT(rc == -EFBIG && job.error.kind == FS_ERR_IO, "rc %d kind %s: %s", rc, kind_name(job.error.kind),
           job.error.msg);
    EXPECT(dt < 5.0, "took %.1f s", dt);
    EXPECT(list_dir(dir_fd, listing, sizeof listing) == 0, "left: %s", listing);
out:
    if (limited)
        setrlimit(RLIMIT_FSIZE, &old);
    remove_dir(dir_fd, path);
    case_end();
}

static void group_errors(void)
{
    double t0 = now_s();
    signal(SIGXFSZ, SIG_IGN);
    write_error_case(FS_MODE_RAW, 0, 0, 1);
    write_error_case(FS_MODE_RAW, 1, 0, 1);
    write_error_case(FS_MODE_RAW, 0, 1, 1);
    write_error_case(FS_MODE_ZSTD, 0, 0, 3);
    write_error_case(FS_MODE_ZSTD, 0, 1, 2);
    write_error_case(FS_MODE_AUTO, 0, 0, 2);
    printf("errors: %.1f s\n", now_s() - t0);
}

TEST_GROUP("errors", 80, group_errors);
