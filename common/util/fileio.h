/* fileio: whole reads at an offset, the loop every pread caller needs (short reads, EINTR). */
#ifndef STP_FILEIO_H
#define STP_FILEIO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Reads n bytes at off into dst, retrying short reads and EINTR: n, fewer at the end of the
 * file, or -1 with errno set. */
ssize_t fileio_pread_full(int fd, void *dst, size_t n, uint64_t off);

#endif
