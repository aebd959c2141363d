/* Images of several channels: fs_save_channels / fs_restore_channels round
 * trips, channel counts out of range, a wrong number of outputs, damage in a
 * chunk of one channel. */
#include "harness.h"


#define NCH_MAX 4

/* Channel c's stream: a slice of a content, of its own length (some empty). */
static const size_t chan_len[NCH_MAX] = {3 * CH + 77, 9 * CH + 5, 0, CH};

static const uint8_t *chan_data(int c) { return g_content[C_MIXED] + (size_t)c * 1000; }

/* Saves n channels fed by producer threads; returns fs_save_channels' rc. */
static int save_n(int n, int dir_fd, const char *name, const struct fs_save_opts *o, struct fs_job *job)
{
    int fds[NCH_MAX][2], in[NCH_MAX];
    struct producer p[NCH_MAX];
    pthread_t th[NCH_MAX];
    for (int c = 0; c < n; c++) {
        if (make_channel(IN_PIPE, fds[c]) != 0)
            return -9999;
        in[c] = fds[c][0];
        p[c] = (struct producer){.fd = fds[c][1], .data = chan_data(c), .len = chan_len[c], .seed = 7 + c};
        pthread_create(&th[c], NULL, producer_main, &p[c]);
    }
    int rc = fs_save_channels(in, n, dir_fd, name, o, job);
    for (int c = 0; c < n; c++) {
        close(in[c]); /* a producer still writing gets EPIPE */
        pthread_join(th[c], NULL);
    }
    return rc;
}

/* Restores into n pipes read by consumer threads that check every byte. */
static int restore_n(int img_fd, int outs, struct fs_job *job, struct consumer *cons)
{
    int fds[NCH_MAX][2], out[NCH_MAX] = {0};
    pthread_t th[NCH_MAX];
    struct fs_restore_opts ro = {.threads = 2};
    for (int c = 0; c < outs; c++) {
        if (make_channel(IN_PIPE, fds[c]) != 0)
            return -9999;
        out[c] = fds[c][1];
        cons[c] = (struct consumer){.fd = fds[c][0], .expect = chan_data(c), .len = chan_len[c]};
        pthread_create(&th[c], NULL, consumer_main, &cons[c]);
    }
    int rc = fs_restore_channels(img_fd, out, outs, &ro, job);
    for (int c = 0; c < outs; c++) {
        close(out[c]);
        pthread_join(th[c], NULL);
    }
    return rc;
}

static void round_trips(void)
{
    static const int modes[] = {FS_MODE_RAW, FS_MODE_ZSTD, FS_MODE_AUTO};
    for (int m = 0; m < 3; m++) {
        for (int n = 2; n <= NCH_MAX; n += 2) {
            case_begin("channels round trip %s n=%d", mode_name(modes[m]), n);
            char name_buf[64];
            struct fs_save_opts o;
            fill_opts(&o, m * 10 + n, modes[m], 1, 2, m == 1, CH, 1, 0, 1, name_buf);
            struct fs_job job = {0};
            int rc = save_n(n, g_var_dir, "chan.sav", &o, &job);
            EXPECT(rc == 0, "save rc %d %s: %s", rc, kind_name(job.error.kind), job.error.msg);
            int fd = openat(g_var_dir, "chan.sav", O_RDONLY | O_CLOEXEC);
            SETUP(fd >= 0);
            struct fs_image_info info;
            struct fs_job ij = {0};
            EXPECT(fs_inspect(fd, &info, &ij) == 0, "inspect: %s", ij.error.msg);
            EXPECT(info.channels == (uint32_t)n && info.major == FS_FORMAT_MAJOR_CHANNELS,
                   "channels %u major %u", info.channels, info.major);
            for (int c = 0; c < n; c++)
                EXPECT(info.channel_len[c] == chan_len[c], "channel %d length %llu", c,
                       (unsigned long long)info.channel_len[c]);
            struct consumer cons[NCH_MAX];
            struct fs_job rj = {0};
            rc = restore_n(fd, n, &rj, cons);
            EXPECT(rc == 0, "restore rc %d %s: %s", rc, kind_name(rj.error.kind), rj.error.msg);
            for (int c = 0; c < n; c++)
                EXPECT(cons[c].got == chan_len[c] && !cons[c].mismatch, "channel %d: %zu of %zu bytes%s",
                       c, cons[c].got, chan_len[c], cons[c].mismatch ? ", mismatch" : "");
            struct fs_job vj = {0};
            struct fs_restore_opts ro = {.threads = 1};
            EXPECT(fs_restore_channels(fd, NULL, 0, &ro, &vj) == 0, "verify: %s", vj.error.msg);

            /* the wrong number of outputs: refused before a byte is written */
            struct fs_job wj = {0};
            rc = restore_n(fd, n - 1, &wj, cons);
            EXPECT(rc < 0 && wj.error.kind == FS_ERR_ARG, "rc %d kind %s", rc, kind_name(wj.error.kind));
            for (int c = 0; c < n - 1; c++)
                EXPECT(cons[c].got == 0, "channel %d got %zu bytes", c, cons[c].got);

            /* a flipped byte in the first chunk after the guard block */
            size_t len = 0;
            uint8_t *raw = read_all(fd, &len);
            SETUP(raw);
            raw[info.payload_offset + 4096 + 100] ^= 0x20;
            int bad = write_file(g_var_dir, "bad.sav", raw, len);
            free(raw);
            SETUP(bad >= 0);
            struct fs_job bj = {0};
            rc = restore_n(bad, n, &bj, cons);
            EXPECT(rc < 0 && bj.error.kind == FS_ERR_CORRUPT && bj.error.chunk == 0,
                   "rc %d kind %s chunk %lld", rc, kind_name(bj.error.kind), (long long)bj.error.chunk);
            for (int c = 0; c < n; c++)
                EXPECT(!cons[c].mismatch, "channel %d received wrong bytes", c);
            close(bad);
            close(fd);
        out:
            empty_dir(g_var_dir);
            case_end();
        }
    }
}

static void out_of_range(void)
{
    int counts[] = {0, -1, FS_CHANNELS_MAX + 1};
    for (int i = 0; i < 3; i++) {
        case_begin("channels: %d refused", counts[i]);
        char name_buf[64];
        struct fs_save_opts o;
        fill_opts(&o, i, FS_MODE_RAW, 1, 1, 0, CH, 1, 0, 0, name_buf);
        int fds[FS_CHANNELS_MAX + 1] = {0};
        struct fs_job job = {0};
        int rc = fs_save_channels(fds, counts[i], g_tmp_dir, "x.sav", &o, &job);
        char msg[32];
        snprintf(msg, sizeof msg, "%d", FS_CHANNELS_MAX);
        EXPECT(rc < 0 && job.error.kind == FS_ERR_ARG && strstr(job.error.msg, msg),
               "rc %d kind %s: %s", rc, kind_name(job.error.kind), job.error.msg);
        char list[256];
        list_dir(g_tmp_dir, list, sizeof list);
        EXPECT(list[0] == 0, "left behind: %s", list);
        case_end();
    }
}

static void group_channels(void)
{
    round_trips();
    out_of_range();
}

TEST_GROUP("channels", 100, group_channels);
