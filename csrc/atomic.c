/* Atomic image files: a locked temp file in the target directory, made
 * durable and renamed over the final name; leftovers of dead saves are found
 * by their name and by the lock nobody holds any more. */
#include "fs_internal.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#define TMP_MARK ".fastsave-tmp-"
#define NAME_LIMIT 200

int fs_check_name(const char *name, struct fs_job *job)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n > NAME_LIMIT || strchr(name, '/') || strcmp(name, ".") == 0 ||
        strcmp(name, "..") == 0 || strstr(name, TMP_MARK))
        return fs_fail(job, FS_ERR_ARG, EINVAL, -1, -1, "invalid image file name");
    return 0;
}

static int same_file(int dir_fd, const char *tmp, int fd)
{
    struct stat a, b;
    return fstatat(dir_fd, tmp, &a, AT_SYMLINK_NOFOLLOW) == 0 && fstat(fd, &b) == 0 &&
           a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/* Creates and locks ".NAME.fastsave-tmp-PID-N" (mode 0600). With `direct`,
 * tries O_DIRECT first and reports in *direct whether it was granted. */
int fs_tmp_create(int dir_fd, const char *name, int *direct, char *tmp, size_t cap,
                  struct fs_job *job)
{
    static unsigned counter;
    for (int attempt = 0; attempt < 100; attempt++) {
        unsigned n = __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED);
        snprintf(tmp, cap, ".%s%s%d-%u", name, TMP_MARK, (int)getpid(), n);
        int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW;
        /* O_DIRECT is switched on after the create: an open with O_CREAT |
         * O_DIRECT that the filesystem refuses has already created the file. */
        int fd = openat(dir_fd, tmp, flags, 0600);
        if (fd >= 0 && *direct) {
            int fl = fcntl(fd, F_GETFL);
            if (fl < 0 || fcntl(fd, F_SETFL, fl | O_DIRECT) != 0)
                *direct = 0; /* the filesystem has no O_DIRECT: write through the cache */
        }
        if (fd < 0) {
            if (errno == EEXIST)
                continue;
            return fs_fail(job, FS_ERR_IO, errno, -1, -1, "creating temp file %s: %s", tmp,
                           strerror(errno));
        }
        /* A cleanup that raced us between create and lock may own or have
         * removed the name: then start over with a fresh one. */
        if (flock(fd, LOCK_EX | LOCK_NB) == 0 && same_file(dir_fd, tmp, fd))
            return fd;
        close(fd);
    }
    return fs_fail(job, FS_ERR_IO, EEXIST, -1, -1, "could not create a temp file for %s", name);
}

void fs_tmp_discard(int dir_fd, int fd, const char *tmp)
{
    unlinkat(dir_fd, tmp, 0);
    close(fd);
}

int fs_tmp_commit(int dir_fd, int fd, const char *tmp, const char *name, struct fs_job *job)
{
    if (fsync(fd) != 0)
        return fs_fail(job, FS_ERR_IO, errno, -1, -1, "fsync of %s: %s", tmp, strerror(errno));
    if (renameat(dir_fd, tmp, dir_fd, name) != 0)
        return fs_fail(job, FS_ERR_IO, errno, -1, -1, "renaming %s to %s: %s", tmp, name,
                       strerror(errno));
    if (fsync(dir_fd) != 0)
        return fs_fail(job, FS_ERR_IO, errno, -1, -1, "fsync of the image directory: %s",
                       strerror(errno));
    return 0;
}

int fs_cleanup(int dir_fd, struct fs_job *job)
{
    int removed = 0;
    /* A new open file description: a dup() would share (and move) the
     * caller's directory position, so a second call would see nothing. */
    int dup_fd = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dup_fd < 0)
        return fs_fail(job, FS_ERR_IO, errno, -1, -1, "cleanup: %s", strerror(errno));
    DIR *d = fdopendir(dup_fd);
    if (!d) {
        close(dup_fd);
        return fs_fail(job, FS_ERR_IO, errno, -1, -1, "cleanup: %s", strerror(errno));
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] != '.' || !strstr(e->d_name, TMP_MARK))
            continue;
        int fd = openat(dir_fd, e->d_name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            continue;
        struct stat st;
        /* Unlocked means its writer is gone (locks die with processes). */
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && flock(fd, LOCK_EX | LOCK_NB) == 0 &&
            same_file(dir_fd, e->d_name, fd) && unlinkat(dir_fd, e->d_name, 0) == 0)
            removed++;
        close(fd);
    }
    closedir(d);
    return removed;
}
