/* The shared part of the C core's tests: bookkeeping, fixtures and main.
 * See harness.h for what is here and how to add a group. */
#include "harness.h"

#include <dirent.h>
#include <sys/socket.h>

/* ------------------------------------------------------------------ */
/* Bookkeeping                                                         */

int g_pass, g_fail, g_case_failed, g_case_open, g_msgs, g_skipped;
char g_case[256];

void case_begin(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_case, sizeof g_case, fmt, ap);
    va_end(ap);
    g_case_failed = 0;
    g_case_open = 1;
}

void case_end(void)
{
    g_case_open = 0;
    if (g_case_failed)
        g_fail++;
    else
        g_pass++;
}

void fail_at(int line, const char *cond, const char *fmt, ...)
{
    g_case_failed = 1;
    if (g_msgs++ >= 300) {
        if (g_msgs == 301)
            fprintf(stderr, "(further failure messages suppressed)\n");
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL [%s] line %d: %s: ", g_case, line, cond);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}
/* ------------------------------------------------------------------ */
/* Stream contents                                                     */

const char *const content_name[C_COUNT] = {"zeros", "random", "text", "mixed"};
uint8_t *g_content[C_COUNT];
char g_xml_long[6001];

uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

void gen_random(uint8_t *b, size_t n, uint64_t seed)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL | 1;
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = xorshift(&s);
        memcpy(b + i, &v, n - i < 8 ? n - i : 8);
    }
}

void gen_text(uint8_t *b, size_t n, uint64_t seed)
{
    static const char *words[] = {"virtual", "machine", "memory", "page", "qemu", "libvirt",
                                  "save", "restore", "the", "of", "and", "dirty", "bitmap",
                                  "device", "state", "ram", "block", "migration", "\n", "0x7f3a"};
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL | 1;
    size_t i = 0;
    while (i < n) {
        const char *w = words[xorshift(&s) % (sizeof words / sizeof *words)];
        size_t l = strlen(w);
        for (size_t j = 0; j < l && i < n; j++)
            b[i++] = (uint8_t)w[j];
        if (i < n)
            b[i++] = ' ';
    }
}

/* Guest-memory-like: extents of zeros, noise, text and short repeating patterns. */
static void gen_mixed(uint8_t *b, size_t n, uint64_t seed)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL | 1;
    size_t i = 0;
    while (i < n) {
        size_t ext = 4096 * (1 + xorshift(&s) % 8);
        if (ext > n - i)
            ext = n - i;
        switch (xorshift(&s) % 4) {
        case 0: memset(b + i, 0, ext); break;
        case 1: gen_random(b + i, ext, xorshift(&s)); break;
        case 2: gen_text(b + i, ext, xorshift(&s)); break;
        default: {
            uint8_t pat[16];
            gen_random(pat, sizeof pat, xorshift(&s));
            for (size_t j = 0; j < ext; j++)
                b[i + j] = pat[j % sizeof pat];
        }
        }
        i += ext;
    }
}

static void make_contents(void)
{
    for (int c = 0; c < C_COUNT; c++) {
        g_content[c] = malloc(MAX_LEN);
        if (!g_content[c]) {
            perror("malloc");
            exit(2);
        }
    }
    memset(g_content[C_ZEROS], 0, MAX_LEN);
    gen_random(g_content[C_RANDOM], MAX_LEN, 11);
    gen_text(g_content[C_TEXT], MAX_LEN, 12);
    gen_mixed(g_content[C_MIXED], MAX_LEN, 13);
}
/* ------------------------------------------------------------------ */
/* Producer and consumer threads                                       */

void *producer_main(void *arg)
{
    struct producer *p = arg;
    uint64_t s = p->seed * 0x9E3779B97F4A7C15ULL | 1;
    if (p->trickle || p->idle) {
        uint8_t buf[4096];
        memset(buf, 0x5a, sizeof buf);
        while (!__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE)) {
            if (p->trickle) {
                ssize_t k = write(p->fd, buf, sizeof buf);
                if (k < 0 && errno == EINTR)
                    continue;
                if (k < 0)
                    break;
                p->sent += (size_t)k;
            }
            sleep_ms(5);
        }
    } else {
        size_t off = 0;
        while (off < p->len) {
            size_t want = 1 + xorshift(&s) % (3 * CH / 2);
            if (xorshift(&s) % 4 == 0)
                want = 1 + want % 100;
            if (want > p->len - off)
                want = p->len - off;
            if (p->pace && xorshift(&s) % 3 == 0)
                sleep_ms(1);
            ssize_t k = write(p->fd, p->data + off, want);
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0) {
                p->err = errno;
                break;
            }
            off += (size_t)k;
        }
        p->sent = off;
    }
    close(p->fd);
    return NULL;
}

/* Reads until EOF or until `limit` bytes in all; returns 0 at EOF. */
static int consume(struct consumer *c, uint8_t *buf, size_t cap, size_t limit)
{
    while (c->got < limit) {
        size_t want = limit - c->got < cap ? limit - c->got : cap;
        ssize_t k = read(c->fd, buf, want);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return 0;
        size_t n = (size_t)k;
        if (!c->mismatch) {
            if (c->got + n > c->len) {
                c->mismatch = 1;
                c->bad_at = c->len;
            } else if (memcmp(buf, c->expect + c->got, n) != 0) {
                size_t j = 0;
                while (buf[j] == c->expect[c->got + j])
                    j++;
                c->mismatch = 1;
                c->bad_at = c->got + j;
            }
        }
        c->got += n;
    }
    return 1;
}

void *consumer_main(void *arg)
{
    struct consumer *c = arg;
    size_t cap = 256 * KIB;
    uint8_t *buf = malloc(cap);
    int more = 1;
    if (c->pre_read)
        more = consume(c, buf, cap, c->pre_read);
    for (int waited = 0; __atomic_load_n(&c->gate, __ATOMIC_ACQUIRE) && waited < 5000; waited += 2)
        sleep_ms(2);
    if (more)
        consume(c, buf, cap, SIZE_MAX);
    close(c->fd);
    free(buf);
    return NULL;
}
void *canceller_main(void *arg)
{
    struct canceller *c = arg;
    sleep_ms(c->delay_ms);
    __atomic_store_n(&c->job->cancel, 1, __ATOMIC_RELEASE);
    return NULL;
}
/* ------------------------------------------------------------------ */
/* Running saves and restores                                          */

const char *const out_name[4] = {"verify", "pipe", "socket", "file"};

int make_channel(int kind, int fds[2])
{
    if (kind == IN_SOCK)
        return socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds);
    return pipe2(fds, O_CLOEXEC);
}

int run_save(const uint8_t *data, size_t len, int in_kind, int dir_fd, const char *name,
                    const struct fs_save_opts *o, struct fs_job *job, uint64_t seed)
{
    int fds[2];
    if (make_channel(in_kind & KIND_MASK, fds) != 0) {
        fail_at(__LINE__, "channel", "%s", strerror(errno));
        return -9999;
    }
    if (in_kind & NONBLOCK)
        fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK);
    struct producer p = {.fd = fds[1], .data = data, .len = len, .seed = seed, .pace = !!(in_kind & SLOW)};
    pthread_t th;
    if (pthread_create(&th, NULL, producer_main, &p) != 0) {
        close(fds[0]);
        close(fds[1]);
        fail_at(__LINE__, "pthread_create", "producer");
        return -9999;
    }
    int rc = fs_save(fds[0], dir_fd, name, o, job);
    close(fds[0]);
    pthread_join(th, NULL);
    return rc;
}

struct rres run_restore(int img_fd, const uint8_t *expect, size_t len, int out_kind,
                               const struct fs_restore_opts *ro, struct fs_job *job)
{
    struct rres r = {0};
    int nonblock = out_kind & NONBLOCK;
    out_kind &= KIND_MASK;
    memset(job, 0, sizeof *job);
    if (out_kind == OUT_NONE) {
        r.rc = fs_restore(img_fd, -1, ro, job);
        return r;
    }
    if (out_kind == OUT_FILE) {
        int fd = open("/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
        if (fd < 0) {
            fail_at(__LINE__, "O_TMPFILE", "%s", strerror(errno));
            r.rc = -9999;
            return r;
        }
        r.rc = fs_restore(img_fd, fd, ro, job);
        struct stat st;
        fstat(fd, &st);
        r.got = (size_t)st.st_size;
        if (r.got > len) {
            r.mismatch = 1;
            r.bad_at = len;
        } else if (r.got) {
            uint8_t *b = malloc(r.got);
            if (pread(fd, b, r.got, 0) != (ssize_t)r.got || memcmp(b, expect, r.got) != 0) {
                r.mismatch = 1;
                size_t j = 0;
                while (j < r.got && b[j] == expect[j])
                    j++;
                r.bad_at = j;
            }
            free(b);
        }
        close(fd);
        return r;
    }
    int fds[2];
    if (make_channel(out_kind == OUT_SOCK ? IN_SOCK : IN_PIPE, fds) != 0) {
        fail_at(__LINE__, "channel", "%s", strerror(errno));
        r.rc = -9999;
        return r;
    }
    if (nonblock)
        fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK);
    struct consumer c = {.fd = fds[0], .expect = expect, .len = len};
    pthread_t th;
    if (pthread_create(&th, NULL, consumer_main, &c) != 0) {
        close(fds[0]);
        close(fds[1]);
        fail_at(__LINE__, "pthread_create", "consumer");
        r.rc = -9999;
        return r;
    }
    r.rc = fs_restore(img_fd, fds[1], ro, job);
    close(fds[1]);
    pthread_join(th, NULL);
    r.got = c.got;
    r.mismatch = c.mismatch;
    r.bad_at = c.bad_at;
    return r;
}
/* ------------------------------------------------------------------ */
/* Directories and files                                               */

char g_tmp_path[64], g_var_path[64];
int g_tmp_dir = -1, g_var_dir = -1;

/* Directory streams get their own open file description (not a dup, whose
 * position would be shared with dir_fd). */
void empty_dir(int dir_fd)
{
    int d2 = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fdopendir(d2);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        if (unlinkat(dir_fd, e->d_name, 0) != 0 && errno == EISDIR)
            unlinkat(dir_fd, e->d_name, AT_REMOVEDIR);
        else if (errno == EPERM)
            unlinkat(dir_fd, e->d_name, AT_REMOVEDIR);
    }
    closedir(d);
}

/* Names in the directory, joined by spaces; returns the count. */
int list_dir(int dir_fd, char *out, size_t cap)
{
    int n = 0;
    if (out && cap)
        out[0] = 0;
    int d2 = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fdopendir(d2);
    if (!d)
        return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        n++;
        if (out && strlen(out) + strlen(e->d_name) + 2 < cap) {
            strcat(out, e->d_name);
            strcat(out, " ");
        }
    }
    closedir(d);
    return n;
}

int make_dir(const char *base, char *path, size_t cap)
{
    snprintf(path, cap, "%s/fastsave-test-XXXXXX", base);
    if (!mkdtemp(path))
        return -1;
    return open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
}

void remove_dir(int dir_fd, const char *path)
{
    if (dir_fd < 0)
        return;
    empty_dir(dir_fd);
    close(dir_fd);
    rmdir(path);
}

uint8_t *read_all(int fd, size_t *len)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return NULL;
    *len = (size_t)st.st_size;
    uint8_t *b = malloc(*len ? *len : 1);
    if (b && *len && pread(fd, b, *len, 0) != (ssize_t)*len) {
        free(b);
        return NULL;
    }
    return b;
}

int write_file(int dir_fd, const char *name, const uint8_t *b, size_t n)
{
    int fd = openat(dir_fd, name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    size_t put = 0;
    while (put < n) {
        ssize_t k = write(fd, b + put, n - put);
        if (k <= 0) {
            close(fd);
            return -1;
        }
        put += (size_t)k;
    }
    return fd;
}

int parse_layout(const uint8_t *img, size_t size, struct layout *L)
{
    memset(L, 0, sizeof *L);
    if (size < LV_HEADER + TRAILER)
        return -1;
    const uint8_t *c = img + size - TRAILER + 8;
    if (memcmp(c + 112, "FSV-TAIL", 8) != 0)
        return -1;
    L->size = size;
    L->payload = get64(c + 8);
    L->meta = get64(c + 16);
    L->index = get64(c + 24);
    L->trailer = get64(c + 32);
    if (L->trailer != size - TRAILER || L->index + 24 > L->trailer)
        return -1;
    L->count = get64(img + L->index + 16);
    if (L->index + 32 + L->count * 24 != L->trailer)
        return -1;
    size_t n = L->count ? L->count : 1;
    L->raw = calloc(n, sizeof *L->raw);
    L->stored = calloc(n, sizeof *L->stored);
    L->flags = calloc(n, sizeof *L->flags);
    L->start = calloc(n, sizeof *L->start);
    uint64_t off = L->payload;
    for (uint64_t i = 0; i < L->count; i++) {
        const uint8_t *e = img + L->index + 24 + i * 24;
        L->raw[i] = get32(e);
        L->stored[i] = get32(e + 4);
        L->flags[i] = get32(e + 8);
        L->start[i] = off;
        off += L->stored[i];
    }
    return off == L->meta ? 0 : -1;
}

void free_layout(struct layout *L)
{
    free(L->raw);
    free(L->stored);
    free(L->flags);
    free(L->start);
    memset(L, 0, sizeof *L);
}
void fill_opts(struct fs_save_opts *o, int seq, int mode, int level, int threads, int direct,
                      uint32_t chunk, int splice, uint32_t slots, int xml_kind, char *name_buf)
{
    static const char *xml_short = "<domain type='kvm'><name>fastsave-test</name><memory unit='KiB'>65536</memory></domain>";
    memset(o, 0, sizeof *o);
    o->mode = mode;
    o->level = level;
    o->threads = threads;
    o->direct = direct;
    o->chunk_size = chunk;
    o->slots = slots;
    o->allow_splice = (uint32_t)splice;
    o->was_running = (uint32_t)(seq & 1);
    if (xml_kind == 1) {
        o->xml = xml_short;
        o->xml_len = strlen(xml_short);
    } else if (xml_kind == 2) {
        o->xml = g_xml_long;
        o->xml_len = strlen(g_xml_long);
    }
    snprintf(name_buf, 64, "vm-%d", seq);
    o->name = name_buf;
    o->name_len = strlen(name_buf);
    for (int i = 0; i < 16; i++)
        o->uuid[i] = (uint8_t)(seq * 31 + i);
    o->version = "0.1.0-ctest";
    o->created_ns = 1700000000123456789LL + seq;
}

/* ------------------------------------------------------------------ */
/* Group registry and main                                             */

#define GROUPS_MAX 64
static const struct test_group *groups[GROUPS_MAX];
static size_t ng;

void test_group_register(const struct test_group *g)
{
    if (ng == GROUPS_MAX) {
        fprintf(stderr, "more than %d test groups: raise GROUPS_MAX\n", GROUPS_MAX);
        exit(2);
    }
    groups[ng++] = g;
}

/* By rank, then name: the order does not depend on the link order. */
static int group_order(const void *a, const void *b)
{
    const struct test_group *x = *(const struct test_group *const *)a, *y = *(const struct test_group *const *)b;
    return x->rank != y->rank ? (x->rank > y->rank) - (x->rank < y->rank) : strcmp(x->name, y->name);
}

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "\nwatchdog: the tests hung, giving up\n";
    ssize_t k = write(2, msg, sizeof msg - 1);
    (void)k;
    _exit(3);
}

int main(int argc, char **argv)
{
    qsort(groups, ng, sizeof *groups, group_order);
    for (int i = 1; i < argc; i++) {
        size_t g = 0;
        while (g < ng && strcmp(argv[i], groups[g]->name) != 0)
            g++;
        if (g == ng) {
            fprintf(stderr, "usage: %s [group...]\ngroups:", argv[0]);
            for (g = 0; g < ng; g++)
                fprintf(stderr, " %s", groups[g]->name);
            fprintf(stderr, "\n");
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    const char *to = getenv("FASTSAVE_TEST_TIMEOUT");
    alarm(to ? (unsigned)atoi(to) : 300);
    setvbuf(stdout, NULL, _IOLBF, 0);

    for (size_t i = 0; i < sizeof g_xml_long - 1; i++)
        g_xml_long[i] = "<domain type='kvm'><devices/></domain>\n"[i % 39];
    make_contents();
    g_tmp_dir = make_dir("/tmp", g_tmp_path, sizeof g_tmp_path);
    g_var_dir = make_dir("/var/tmp", g_var_path, sizeof g_var_path);
    if (g_tmp_dir < 0 || g_var_dir < 0) {
        perror("mkdtemp");
        return 2;
    }
    printf("fastsave C core tests, zstd %u\n", fs_zstd_version());
    double t0 = now_s();
    for (size_t g = 0; g < ng; g++) {
        int run = argc == 1;
        for (int i = 1; i < argc; i++)
            run |= strcmp(argv[i], groups[g]->name) == 0;
        if (run)
            groups[g]->run();
    }
    remove_dir(g_tmp_dir, g_tmp_path);
    remove_dir(g_var_dir, g_var_path);
    for (int c = 0; c < C_COUNT; c++)
        free(g_content[c]);
    printf("total %.1f s\n", now_s() - t0);
    if (g_skipped)
        printf("%d skipped\n", g_skipped);
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
