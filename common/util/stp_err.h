/* stp_err: error codes and the error record every fallible stpipe call fills.
 *
 * A function that can fail returns int: 0 on success or a negative STP_E* code (or -errno).
 * The detail (file, offset, expected and actual values) goes into the caller's stp_err.
 * Library code never exits or asserts on input; see docs/ARCHITECTURE.md. */
#ifndef STP_ERR_H
#define STP_ERR_H

#include <stddef.h>

enum {
    STP_OK = 0,
    STP_ENOMEM = -10001,       /* allocation failed */
    STP_EIO = -10002,          /* read/write/mmap failed */
    STP_EFORMAT = -10003,      /* malformed file or value */
    STP_EPROTO = -10004,       /* malformed or unexpected message */
    STP_ETIMEDOUT = -10005,    /* a peer did not answer in time */
    STP_EUNSUPPORTED = -10006, /* valid but not supported (tensor type, architecture, template) */
    STP_EINVAL = -10007,       /* bad argument from the caller or the user */
    STP_ERANGE = -10008, /* a value outside its allowed range (context full, id out of range) */
    STP_EBUSY = -10009,  /* queue full */
    STP_EPEER = -10010,  /* a peer process died or reported an error */
};

typedef struct stp_err {
    int code;       /* last error code, 0 if none */
    char msg[1024]; /* human-readable detail, NUL-terminated */
} stp_err;

/* Records code and a printf-style message in err (err may be NULL); returns code. */
int stp_err_set(stp_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Prepends "prefix: " to the message already in err (for adding context on the way up). */
void stp_err_prefix(stp_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Short text for a code (STP_E* or -errno). */
const char *stp_strerror(int rc);

#endif
