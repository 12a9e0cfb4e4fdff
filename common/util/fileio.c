/* fileio: see fileio.h. */
#include "util/fileio.h"

#include <errno.h>
#include <unistd.h>

ssize_t fileio_pread_full(int fd, void *dst, size_t n, uint64_t off) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, (uint8_t *)dst + done, n - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        done += (size_t)r;
    }
    return (ssize_t)done;
}
