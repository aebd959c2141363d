/* Fault injection for tests: regular-file writes of this process fail with
 * EIO once FASTSAVE_EIO_AFTER bytes have been written to regular files. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

static long long budget = -2;

static int should_fail(int fd, size_t n)
{
    struct stat st;
    if (budget == -2) {
        const char *v = getenv("FASTSAVE_EIO_AFTER");
        budget = v ? atoll(v) : -1;
    }
    if (budget < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        return 0;
    if ((long long)n > budget)
        return 1;
    budget -= (long long)n;
    return 0;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off)
{
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real)
        real = (ssize_t(*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite64");
    if (should_fail(fd, n)) {
        errno = EIO;
        return -1;
    }
    return real(fd, buf, n, off);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) { return pwrite64(fd, buf, n, off); }
