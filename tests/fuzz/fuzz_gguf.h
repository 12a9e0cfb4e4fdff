/* fuzz_gguf.h: the GGUF checks of fuzz_gguf.c, shared with gguf_corrupt.c (issue 7, item 7). */
#ifndef FUZZ_GGUF_H
#define FUZZ_GGUF_H

#include <stddef.h>
#include <stdint.h>

enum {
    FZ_GGUF_REFUSED = 0,       /* gguf_open_memory refused the image (clear error checked) */
    FZ_GGUF_MODEL_REFUSED = 1, /* a valid GGUF, but model_config_load or model_open refused it */
    FZ_GGUF_LOADED = 2,        /* model_open succeeded */
};

/* Runs every check of fuzz_gguf on one image (aborts on a violated invariant); returns the
 * outcome FZ_GGUF_*. */
int fz_gguf_check(const uint8_t *data, size_t size);

#endif
