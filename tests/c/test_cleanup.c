/* fs_cleanup of stale and locked temp files. */
#include "harness.h"

#include <sys/file.h>

static int fresh_cleanup(int dir_fd, struct fs_job *job)
{
    int fd = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    memset(job, 0, sizeof *job);
    int rc = fs_cleanup(fd, job);
    close(fd);
    return rc;
}

struct busy_cleanup {
    int dir_fd, rc, saw_tmp;
};

static void *busy_cleanup_main(void *arg)
{
    struct busy_cleanup *c = arg;
    sleep_ms(200);
    char l[512];
    list_dir(c->dir_fd, l, sizeof l);
    c->saw_tmp = strstr(l, ".busy.sav.fastsave-tmp-") != NULL;
    struct fs_job j;
    c->rc = fresh_cleanup(c->dir_fd, &j);
    return NULL;
}

/* fs_cleanup called again on the same directory fd (a long-lived daemon's). */
static void cleanup_twice_same_fd(void)
{
    char path[64];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    struct fs_job job;
    case_begin("cleanup twice on one directory fd");
    SETUP(dir_fd >= 0);
    int fd = openat(dir_fd, ".a.sav.fastsave-tmp-1-0", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(fd >= 0);
    close(fd);
    memset(&job, 0, sizeof job);
    int rc = fs_cleanup(dir_fd, &job);
    EXPECT(rc == 1, "first fs_cleanup returned %d", rc);
    fd = openat(dir_fd, ".b.sav.fastsave-tmp-2-0", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(fd >= 0);
    close(fd);
    memset(&job, 0, sizeof job);
    rc = fs_cleanup(dir_fd, &job);
    EXPECT(rc == 1, "second fs_cleanup on the same dir fd returned %d", rc);
    EXPECT(faccessat(dir_fd, ".b.sav.fastsave-tmp-2-0", F_OK, 0) != 0, "stale temp file kept by the second call");
out:
    remove_dir(dir_fd, path);
    case_end();
}

static void group_cleanup(void)
{
    cleanup_twice_same_fd();
    char path[64], listing[512];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    int held = -1, fd;
    struct fs_job job;

    case_begin("cleanup");
    SETUP(dir_fd >= 0);
    fd = openat(dir_fd, ".vm.sav.fastsave-tmp-123-0", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(fd >= 0 && write(fd, "junk", 4) == 4);
    close(fd);
    held = openat(dir_fd, ".vm2.sav.fastsave-tmp-124-0", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(held >= 0 && flock(held, LOCK_EX | LOCK_NB) == 0);
    fd = openat(dir_fd, "vm.sav", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(fd >= 0);
    close(fd);
    fd = openat(dir_fd, ".hidden", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(fd >= 0);
    close(fd);
    fd = openat(dir_fd, "x.fastsave-tmp-1-1", O_CREAT | O_WRONLY | O_CLOEXEC, 0600); /* no leading dot */
    SETUP(fd >= 0);
    close(fd);
    SETUP(mkdirat(dir_fd, ".d.fastsave-tmp-1-2", 0700) == 0);
    SETUP(symlinkat("/etc/hostname", dir_fd, ".l.fastsave-tmp-1-3") == 0);

    int rc = fresh_cleanup(dir_fd, &job);
    EXPECT(rc == 1, "fs_cleanup returned %d (%s)", rc, job.error.msg);
    EXPECT(faccessat(dir_fd, ".vm.sav.fastsave-tmp-123-0", F_OK, AT_SYMLINK_NOFOLLOW) != 0,
           "stale temp file kept");
    EXPECT(faccessat(dir_fd, ".vm2.sav.fastsave-tmp-124-0", F_OK, AT_SYMLINK_NOFOLLOW) == 0,
           "locked temp file removed");
    EXPECT(faccessat(dir_fd, "vm.sav", F_OK, 0) == 0, "image removed");
    EXPECT(faccessat(dir_fd, ".hidden", F_OK, 0) == 0, "unrelated dot file removed");
    EXPECT(faccessat(dir_fd, "x.fastsave-tmp-1-1", F_OK, 0) == 0, "name without leading dot removed");
    EXPECT(faccessat(dir_fd, ".d.fastsave-tmp-1-2", F_OK, 0) == 0, "directory removed");
    EXPECT(faccessat(dir_fd, ".l.fastsave-tmp-1-3", F_OK, AT_SYMLINK_NOFOLLOW) == 0, "symlink removed");
    EXPECT(faccessat(dir_fd, "/etc/hostname", F_OK, 0) == 0 || errno == ENOENT, "symlink target");

    /* the lock is still ours after the cleanup looked at the file */
    int other = openat(dir_fd, ".vm2.sav.fastsave-tmp-124-0", O_RDONLY | O_CLOEXEC);
    EXPECT(other >= 0 && flock(other, LOCK_EX | LOCK_NB) != 0, "the test lost its lock");
    if (other >= 0)
        close(other);

    /* once released, the next cleanup takes it */
    close(held);
    held = -1;
    rc = fresh_cleanup(dir_fd, &job);
    EXPECT(rc == 1, "second fs_cleanup returned %d", rc);
    EXPECT(faccessat(dir_fd, ".vm2.sav.fastsave-tmp-124-0", F_OK, 0) != 0, "released temp file kept");
    rc = fresh_cleanup(dir_fd, &job);
    EXPECT(rc == 0, "third fs_cleanup returned %d", rc);
    int n = list_dir(dir_fd, listing, sizeof listing);
    EXPECT(n == 5, "left: %s", listing);

    /* a cleanup during a running save does not touch its temp file */
    {
        int fds[2];
        SETUP(pipe2(fds, O_CLOEXEC) == 0);
        struct producer p = {.fd = fds[1], .trickle = 1};
        pthread_t th;
        SETUP(pthread_create(&th, NULL, producer_main, &p) == 0);
        struct fs_job sj;
        memset(&sj, 0, sizeof sj);
        struct canceller cc = {.job = &sj, .delay_ms = 400};
        pthread_t cth;
        pthread_create(&cth, NULL, canceller_main, &cc);
        struct fs_save_opts o;
        char dom[64];
        fill_opts(&o, 9, FS_MODE_RAW, 1, 1, 0, CH, 0, 0, 0, dom);
        /* run the cleanup from a helper while fs_save is busy in this thread */
        struct busy_cleanup cl = {dir_fd, -1, 0};
        pthread_t clt;
        pthread_create(&clt, NULL, busy_cleanup_main, &cl);
        int src = fs_save(fds[0], dir_fd, "busy.sav", &o, &sj);
        pthread_join(clt, NULL);
        pthread_join(cth, NULL);
        __atomic_store_n(&p.stop, 1, __ATOMIC_RELEASE);
        close(fds[0]);
        pthread_join(th, NULL);
        EXPECT(cl.saw_tmp, "no temp file visible during the save");
        EXPECT(cl.rc == 0, "cleanup during a save removed %d files", cl.rc);
        EXPECT(src == -ECANCELED, "save rc %d: %s", src, sj.error.msg);
        n = list_dir(dir_fd, listing, sizeof listing);
        EXPECT(n == 5, "left: %s", listing);
    }
out:
    if (held >= 0)
        close(held);
    remove_dir(dir_fd, path);
    case_end();
}

TEST_GROUP("cleanup", 20, group_cleanup);
