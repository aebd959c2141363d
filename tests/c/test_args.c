/* Invalid save arguments are refused; the limits themselves are accepted. */
#include "harness.h"

static void bad_arg_case(const char *what, const char *name, void (*tweak)(struct fs_save_opts *))
{
    char path[64], dom[64], listing[256];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    struct fs_save_opts o;
    struct fs_job job;
    case_begin("bad argument: %s", what);
    SETUP(dir_fd >= 0);
    fill_opts(&o, 3, FS_MODE_ZSTD, 1, 1, 0, CH, 0, 0, 1, dom);
    tweak(&o);
    memset(&job, 0, sizeof job);
    int rc = run_save(g_content[C_TEXT], 1000, IN_PIPE, dir_fd, name, &o, &job, 1);
    EXPECT(rc == -EINVAL, "rc %d (%s)", rc, job.error.msg);
    EXPECT(job.error.kind == FS_ERR_ARG, "kind %s: %s", kind_name(job.error.kind), job.error.msg);
    EXPECT(job.error.msg[0] != 0, "no message");
    EXPECT(list_dir(dir_fd, listing, sizeof listing) == 0, "left: %s", listing);
out:
    remove_dir(dir_fd, path);
    case_end();
}

static void t_none(struct fs_save_opts *o) { (void)o; }
static void t_chunk1000(struct fs_save_opts *o) { o->chunk_size = 1000; }
static void t_chunk_unaligned(struct fs_save_opts *o) { o->chunk_size = CH + 1; }
static void t_chunk_small(struct fs_save_opts *o) { o->chunk_size = 60 * KIB; }
static void t_chunk_huge(struct fs_save_opts *o) { o->chunk_size = 128u << 20; }
static void t_xml_nul(struct fs_save_opts *o)
{
    static const char x[] = "<domain>\0</domain>";
    o->xml = x;
    o->xml_len = sizeof x - 1;
}
static void t_xml_null(struct fs_save_opts *o)
{
    o->xml = NULL;
    o->xml_len = 10;
}
static void t_mode(struct fs_save_opts *o) { o->mode = 3; }
static void t_mode_neg(struct fs_save_opts *o) { o->mode = -1; }
static void t_threads0(struct fs_save_opts *o) { o->threads = 0; }
static void t_threads257(struct fs_save_opts *o) { o->threads = 257; }
static void t_level(struct fs_save_opts *o) { o->level = 1000; }
static void t_version(struct fs_save_opts *o)
{
    o->version = "0123456789012345678901234567890123456789012345678901234567890123";
}
static void t_dom_name(struct fs_save_opts *o) { o->name_len = FS_NAME_MAX; }

static void group_args(void)
{
    char long_name[202];
    memset(long_name, 'n', 201);
    long_name[201] = 0;
    bad_arg_case("chunk_size 1000", "a.sav", t_chunk1000);
    bad_arg_case("chunk_size 64K+1", "a.sav", t_chunk_unaligned);
    bad_arg_case("chunk_size 60K", "a.sav", t_chunk_small);
    bad_arg_case("chunk_size 128M", "a.sav", t_chunk_huge);
    bad_arg_case("name with /", "sub/a.sav", t_none);
    bad_arg_case("name ..", "..", t_none);
    bad_arg_case("name .", ".", t_none);
    bad_arg_case("empty name", "", t_none);
    bad_arg_case("NULL name", NULL, t_none);
    bad_arg_case("201-byte name", long_name, t_none);
    bad_arg_case("temp-file-like name", "x.fastsave-tmp-1-2", t_none);
    bad_arg_case("xml with NUL", "a.sav", t_xml_nul);
    bad_arg_case("xml NULL with length", "a.sav", t_xml_null);
    bad_arg_case("mode 3", "a.sav", t_mode);
    bad_arg_case("mode -1", "a.sav", t_mode_neg);
    bad_arg_case("threads 0", "a.sav", t_threads0);
    bad_arg_case("threads 257", "a.sav", t_threads257);
    bad_arg_case("level 1000", "a.sav", t_level);
    bad_arg_case("version 64 bytes", "a.sav", t_version);
    bad_arg_case("domain name 1024 bytes", "a.sav", t_dom_name);

    /* the limits themselves are accepted */
    char path[64], dom[64];
    int dir_fd = make_dir("/tmp", path, sizeof path);
    case_begin("arguments at their limits");
    SETUP(dir_fd >= 0);
    struct fs_save_opts o;
    struct fs_job job;
    long_name[200] = 0;
    fill_opts(&o, 4, FS_MODE_AUTO, 1, 1, 0, 4096 * 16, 0, 0, 0, dom);
    o.level = -7;
    o.version = "012345678901234567890123456789012345678901234567890123456789012";
    static char dname[FS_NAME_MAX];
    memset(dname, 'd', FS_NAME_MAX - 1);
    o.name = dname;
    o.name_len = FS_NAME_MAX - 1;
    memset(&job, 0, sizeof job);
    int rc = run_save(g_content[C_TEXT], 5000, IN_PIPE, dir_fd, long_name, &o, &job, 1);
    EXPECT(rc == 0, "rc %d: %s", rc, job.error.msg);
    if (rc == 0) {
        int fd = openat(dir_fd, long_name, O_RDONLY | O_CLOEXEC);
        struct fs_image_info info;
        memset(&job, 0, sizeof job);
        rc = fs_inspect(fd, &info, &job);
        EXPECT(rc == 0 && info.name_len == FS_NAME_MAX - 1 && strlen(info.name) == FS_NAME_MAX - 1 &&
                   strcmp(info.version, o.version) == 0 && info.level == -7,
               "inspect rc %d name_len %u version '%s' level %d", rc, info.name_len, info.version, info.level);
        struct fs_restore_opts ro = {.threads = 1};
        struct rres r = run_restore(fd, g_content[C_TEXT], 5000, OUT_PIPE, &ro, &job);
        EXPECT(r.rc == 0 && r.got == 5000 && !r.mismatch, "restore rc %d got %zu", r.rc, r.got);
        close(fd);
    }
out:
    remove_dir(dir_fd, path);
    case_end();
}

TEST_GROUP("args", 10, group_args);
