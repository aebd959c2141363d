/* Miscellaneous: non-images, XML region edges, concurrent saves, EPIPE, many
 * threads, tmpfs, ramfs (no O_DIRECT; needs CAP_SYS_ADMIN, else skipped). */
#include "harness.h"

#include <sched.h>
#include <sys/mount.h>
#include <sys/wait.h>

static void misc_not_images(void)
{
    char path[64];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    struct fs_restore_opts ro = {.threads = 1};
    struct fs_job job;
    struct fs_image_info info;
    int fd, rc;

    case_begin("restore of things that are not images");
    SETUP(dir_fd >= 0);
    fd = write_file(dir_fd, "empty", (const uint8_t *)"", 0);
    SETUP(fd >= 0);
    memset(&job, 0, sizeof job);
    rc = fs_restore(fd, -1, &ro, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_TRUNCATED, "empty file: rc %d kind %s", rc, kind_name(job.error.kind));
    close(fd);

    fd = write_file(dir_fd, "noise", g_content[C_RANDOM], 10000);
    SETUP(fd >= 0);
    memset(&job, 0, sizeof job);
    rc = fs_restore(fd, -1, &ro, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_NOT_IMAGE, "noise: rc %d kind %s", rc, kind_name(job.error.kind));
    memset(&job, 0, sizeof job);
    rc = fs_inspect(fd, &info, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_NOT_IMAGE, "inspect noise: rc %d kind %s", rc, kind_name(job.error.kind));
    close(fd);

    fd = write_file(dir_fd, "short", g_content[C_RANDOM], 50);
    SETUP(fd >= 0);
    memset(&job, 0, sizeof job);
    rc = fs_restore(fd, -1, &ro, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_NOT_IMAGE, "50 noise bytes: rc %d kind %s", rc, kind_name(job.error.kind));
    close(fd);

    uint8_t part[8192] = "LibvirtQemudPart";
    fd = write_file(dir_fd, "partial", part, sizeof part);
    SETUP(fd >= 0);
    memset(&job, 0, sizeof job);
    rc = fs_restore(fd, -1, &ro, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_CORRUPT, "libvirt partial: rc %d kind %s", rc, kind_name(job.error.kind));
    close(fd);

    /* a libvirt save of another tool: right magic, no trailer */
    uint8_t other[8192] = "LibvirtQemudSave";
    uint32_t w[5] = {2, 4096 - LV_HEADER, 1, 0, 0};
    memcpy(other + 16, w, sizeof w);
    fd = write_file(dir_fd, "foreign", other, sizeof other);
    SETUP(fd >= 0);
    memset(&job, 0, sizeof job);
    rc = fs_restore(fd, -1, &ro, &job);
    EXPECT(rc < 0 && (job.error.kind == FS_ERR_TRUNCATED || job.error.kind == FS_ERR_CORRUPT),
           "foreign libvirt save: rc %d kind %s", rc, kind_name(job.error.kind));
    close(fd);

    int fds[2];
    SETUP(pipe2(fds, O_CLOEXEC) == 0);
    memset(&job, 0, sizeof job);
    rc = fs_restore(fds[0], -1, &ro, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_NOT_IMAGE, "pipe: rc %d kind %s", rc, kind_name(job.error.kind));
    close(fds[0]);
    close(fds[1]);
    memset(&job, 0, sizeof job);
    rc = fs_restore(-1, -1, &ro, &job);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_IO, "fd -1: rc %d kind %s", rc, kind_name(job.error.kind));
out:
    remove_dir(dir_fd, path);
    case_end();
}

/* XML lengths around the 4 KiB boundary of the payload offset. */
static void misc_xml_edges(void)
{
    static const uint64_t lens[] = {0, 1, 4002, 4003, 4004, 8099, 8100};
    static char xml[8200];
    for (size_t i = 0; i < sizeof xml; i++)
        xml[i] = "<domain/> "[i % 10];
    for (size_t i = 0; i < sizeof lens / sizeof *lens; i++) {
        char dom[64];
        struct fs_save_opts o;
        struct fs_job job;
        struct fs_image_info info;
        case_begin("xml_len %llu", (unsigned long long)lens[i]);
        fill_opts(&o, 20 + (int)i, FS_MODE_ZSTD, 1, 1, 0, CH, 0, 0, 0, dom);
        o.xml = lens[i] ? xml : NULL;
        o.xml_len = lens[i];
        memset(&job, 0, sizeof job);
        int rc = run_save(g_content[C_MIXED], 3 * CH, IN_PIPE, g_tmp_dir, "xml.sav", &o, &job, 2);
        EXPECT(rc == 0, "save rc %d: %s", rc, job.error.msg);
        int fd = openat(g_tmp_dir, "xml.sav", O_RDONLY | O_CLOEXEC);
        if (rc == 0 && fd >= 0) {
            memset(&job, 0, sizeof job);
            rc = fs_inspect(fd, &info, &job);
            uint64_t want = align_up(LV_HEADER + lens[i] + 1, 4096);
            EXPECT(rc == 0 && info.xml_len == lens[i] && info.payload_offset == want,
                   "inspect rc %d xml_len %llu payload %llu want %llu", rc, (unsigned long long)info.xml_len,
                   (unsigned long long)info.payload_offset, (unsigned long long)want);
            struct fs_restore_opts ro = {.threads = 2, .direct = 1};
            struct rres r = run_restore(fd, g_content[C_MIXED], 3 * CH, OUT_PIPE, &ro, &job);
            EXPECT(r.rc == 0 && r.got == 3 * CH && !r.mismatch, "restore rc %d got %zu: %s", r.rc, r.got,
                   job.error.msg);
        }
        if (fd >= 0)
            close(fd);
        unlinkat(g_tmp_dir, "xml.sav", 0);
        case_end();
    }
}

struct concurrent {
    int content;
    int rc;
    struct fs_job job;
};

static void *concurrent_main(void *arg)
{
    struct concurrent *c = arg;
    char dom[64];
    struct fs_save_opts o;
    fill_opts(&o, 30 + c->content, c->content == C_TEXT ? FS_MODE_ZSTD : FS_MODE_RAW, 1, 2, 0, CH, 1, 0, 1, dom);
    memset(&c->job, 0, sizeof c->job);
    c->rc = run_save(g_content[c->content], 3 * (size_t)BIG_CH, IN_PIPE, g_var_dir, "same.sav", &o, &c->job,
                     (uint64_t)c->content);
    return NULL;
}

/* Two saves to one name at once: both succeed, the survivor is whole. */
static void misc_concurrent_same_name(void)
{
    struct concurrent a = {.content = C_TEXT}, b = {.content = C_RANDOM};
    pthread_t ta, tb;
    char listing[256];
    case_begin("concurrent saves to the same name");
    pthread_create(&ta, NULL, concurrent_main, &a);
    pthread_create(&tb, NULL, concurrent_main, &b);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    EXPECT(a.rc == 0 && b.rc == 0, "rc %d (%s) and %d (%s)", a.rc, a.job.error.msg, b.rc, b.job.error.msg);
    int n = list_dir(g_var_dir, listing, sizeof listing);
    EXPECT(n == 1, "directory holds: %s", listing);
    int fd = openat(g_var_dir, "same.sav", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        struct fs_image_info info;
        struct fs_job job;
        memset(&job, 0, sizeof job);
        int rc = fs_inspect(fd, &info, &job);
        EXPECT(rc == 0, "inspect: %s", job.error.msg);
        const uint8_t *want = info.codec == FS_CODEC_ZSTD ? g_content[C_TEXT] : g_content[C_RANDOM];
        struct fs_restore_opts ro = {.threads = 2};
        struct rres r = run_restore(fd, want, 3 * (size_t)BIG_CH, OUT_PIPE, &ro, &job);
        EXPECT(r.rc == 0 && r.got == 3 * (size_t)BIG_CH && !r.mismatch, "survivor restore rc %d got %zu mismatch %d",
               r.rc, r.got, r.mismatch);
        close(fd);
    } else {
        EXPECT(fd >= 0, "no image");
    }
    unlinkat(g_var_dir, "same.sav", 0);
    case_end();
}

/* The consumer goes away mid-restore: EPIPE, no hang, no crash. */
static void misc_consumer_gone(void)
{
    char dom[64];
    struct fs_save_opts o;
    struct fs_job job;
    size_t len = 4 * (size_t)BIG_CH;
    case_begin("restore into a pipe whose reader closed");
    fill_opts(&o, 40, FS_MODE_AUTO, 1, 2, 0, CH, 0, 0, 0, dom);
    memset(&job, 0, sizeof job);
    int rc = run_save(g_content[C_MIXED], len, IN_PIPE, g_tmp_dir, "epipe.sav", &o, &job, 3);
    EXPECT(rc == 0, "save: %s", job.error.msg);
    int fd = openat(g_tmp_dir, "epipe.sav", O_RDONLY | O_CLOEXEC);
    int fds[2];
    if (rc == 0 && fd >= 0 && pipe2(fds, O_CLOEXEC) == 0) {
        close(fds[0]);
        struct fs_restore_opts ro = {.threads = 2};
        memset(&job, 0, sizeof job);
        rc = fs_restore(fd, fds[1], &ro, &job);
        EXPECT(rc == -EPIPE && job.error.kind == FS_ERR_IO, "rc %d kind %s: %s", rc, kind_name(job.error.kind),
               job.error.msg);
        close(fds[1]);
    }
    if (fd >= 0)
        close(fd);
    unlinkat(g_tmp_dir, "epipe.sav", 0);
    case_end();
}

/* Save fails when the stream cannot be read: no file is left. */
static void misc_bad_input(void)
{
    char path[64], dom[64], listing[256];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    struct fs_save_opts o;
    struct fs_job job;
    case_begin("save from an unreadable input");
    SETUP(dir_fd >= 0);
    fill_opts(&o, 50, FS_MODE_ZSTD, 1, 1, 0, CH, 0, 0, 0, dom);
    int wfd = openat(dir_fd, "wo", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    SETUP(wfd >= 0);
    memset(&job, 0, sizeof job);
    int rc = fs_save(wfd, dir_fd, "bad.sav", &o, &job);
    close(wfd);
    unlinkat(dir_fd, "wo", 0);
    EXPECT(rc < 0 && job.error.kind == FS_ERR_IO, "rc %d kind %s: %s", rc, kind_name(job.error.kind), job.error.msg);
    EXPECT(list_dir(dir_fd, listing, sizeof listing) == 0, "left: %s", listing);
out:
    remove_dir(dir_fd, path);
    case_end();
}
/* Thread counts beyond the cores, big slot rings, tmpfs (O_DIRECT may be refused). */
static void misc_odd_settings(void)
{
    static const struct {
        const char *base;
        int mode, threads, direct, rthreads;
        uint32_t slots;
    } cases[] = {
        {"/tmp", FS_MODE_ZSTD, 16, 0, 16, 0},
        {"/tmp", FS_MODE_AUTO, 8, 0, 0, 64},
        {"/tmp", FS_MODE_AUTO, 1, 0, 0, 2},
        {"/dev/shm", FS_MODE_ZSTD, 2, 1, 2, 0},
        {"/dev/shm", FS_MODE_RAW, 1, 1, 1, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char path[64], dom[64];
        int dir_fd = make_dir(cases[i].base, path, sizeof path);
        struct fs_save_opts o;
        struct fs_job job;
        size_t len = 3 * (size_t)BIG_CH + 5;
        case_begin("%s %s threads=%d direct=%d restore threads=%d slots=%u", cases[i].base,
                   mode_name(cases[i].mode), cases[i].threads, cases[i].direct, cases[i].rthreads, cases[i].slots);
        SETUP(dir_fd >= 0);
        fill_opts(&o, 70 + (int)i, cases[i].mode, 1, cases[i].threads, cases[i].direct, CH, 1, cases[i].slots, 1, dom);
        memset(&job, 0, sizeof job);
        int rc = run_save(g_content[C_MIXED], len, IN_PIPE, dir_fd, "odd.sav", &o, &job, 8);
        EXPECT(rc == 0, "save rc %d: %s", rc, job.error.msg);
        char listing[256];
        int n = list_dir(dir_fd, listing, sizeof listing);
        EXPECT(n == 1, "the directory holds: %s", listing);
        if (rc == 0) {
            int fd = openat(dir_fd, "odd.sav", O_RDONLY | O_CLOEXEC);
            struct fs_restore_opts ro = {.threads = cases[i].rthreads, .direct = cases[i].direct,
                                         .slots = cases[i].slots};
            struct rres r = run_restore(fd, g_content[C_MIXED], len, OUT_PIPE, &ro, &job);
            EXPECT(r.rc == 0 && r.got == len && !r.mismatch, "restore rc %d got %zu: %s", r.rc, r.got,
                   job.error.msg);
            close(fd);
        }
    out:
        remove_dir(dir_fd, path);
        case_end();
    }
}

/* direct=1 where O_DIRECT is refused (ramfs): the save falls back to the
 * page cache and leaves nothing but the image. Runs in a child with its own
 * mount namespace so the mount vanishes with it; skipped without privileges. */

static void misc_no_odirect(void)
{
    char path[96];
    snprintf(path, sizeof path, "%s/ramfs", g_tmp_path);
    case_begin("direct=1 on a filesystem without O_DIRECT (ramfs)");
    if (mkdir(path, 0700) != 0) {
        fail_at(__LINE__, "mkdir", "%s", strerror(errno));
        case_end();
        return;
    }
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        if (unshare(CLONE_NEWNS) != 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0 ||
            mount("none", path, "ramfs", 0, "mode=0700") != 0)
            _exit(77);
        int dir_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        char dom[64], listing[512];
        struct fs_save_opts o;
        struct fs_job job;
        size_t len = 2 * (size_t)CH + 17;
        for (int mode = FS_MODE_RAW; mode <= FS_MODE_ZSTD; mode++) {
            fill_opts(&o, 80 + mode, mode, 1, 2, 1, CH, 1, 0, 1, dom);
            memset(&job, 0, sizeof job);
            int rc = run_save(g_content[C_TEXT], len, IN_PIPE, dir_fd, "ram.sav", &o, &job, 9);
            EXPECT(rc == 0, "%s save rc %d: %s", mode_name(mode), rc, job.error.msg);
            EXPECT(job.stats.direct == 0, "%s: stats.direct %u on ramfs", mode_name(mode), job.stats.direct);
            int n = list_dir(dir_fd, listing, sizeof listing);
            EXPECT(n == 1, "%s: the directory holds %d entries: %s", mode_name(mode), n, listing);
            int fd = openat(dir_fd, "ram.sav", O_RDONLY | O_CLOEXEC);
            struct fs_restore_opts ro = {.threads = 1, .direct = 1};
            struct rres r = run_restore(fd, g_content[C_TEXT], len, OUT_PIPE, &ro, &job);
            EXPECT(r.rc == 0 && r.got == len && !r.mismatch, "%s restore rc %d got %zu: %s", mode_name(mode),
                   r.rc, r.got, job.error.msg);
            close(fd);
            empty_dir(dir_fd);
        }
        fflush(stderr);
        _exit(g_case_failed ? 1 : 0);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid)
        fail_at(__LINE__, "fork", "%s", strerror(errno));
    else if (WIFEXITED(status) && WEXITSTATUS(status) == 77) {
        printf("  SKIP %s: cannot mount ramfs here\n", g_case);
        g_skipped++;
        rmdir(path);
        g_case_open = 0;
        return;
    } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_at(__LINE__, "child", "failed (status 0x%x)", status);
    rmdir(path);
    case_end();
}

static void group_misc(void)
{
    double t0 = now_s();
    misc_not_images();
    misc_xml_edges();
    misc_concurrent_same_name();
    misc_consumer_gone();
    misc_bad_input();
    misc_odd_settings();
    misc_no_odirect();
    printf("misc: %.1f s\n", now_s() - t0);
}

TEST_GROUP("misc", 30, group_misc);
