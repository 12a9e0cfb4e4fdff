/* stp_err: the error record. See stp_err.h. */
#include "util/stp_err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int stp_err_set(stp_err *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

void stp_err_prefix(stp_err *err, const char *fmt, ...) {
    if (!err) return;
    char pre[512], old[sizeof err->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof pre, fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof old);
    size_t n = strlen(pre);
    if (n > sizeof err->msg - 3) n = sizeof err->msg - 3;
    memcpy(err->msg, pre, n);
    memcpy(err->msg + n, ": ", 2);
    size_t rest = sizeof err->msg - n - 3;
    size_t m = strnlen(old, rest);
    memcpy(err->msg + n + 2, old, m);
    err->msg[n + 2 + m] = 0;
}

const char *stp_strerror(int rc) {
    switch (rc) {
    case STP_OK: return "success";
    case STP_ENOMEM: return "out of memory";
    case STP_EIO: return "I/O error";
    case STP_EFORMAT: return "malformed input";
    case STP_EPROTO: return "protocol error";
    case STP_ETIMEDOUT: return "timed out";
    case STP_EUNSUPPORTED: return "unsupported";
    case STP_EINVAL: return "invalid argument";
    case STP_ERANGE: return "out of range";
    case STP_EBUSY: return "busy";
    case STP_EPEER: return "peer failed";
    default: return rc < 0 && rc > -4096 ? strerror(-rc) : "unknown error";
    }
}
