"""cffi builders (out-of-line API mode): the C ring buffer ``zipcomm._ring_c`` and the shuffle's
stable counting partition ``zipcomm._scatter_c``.

Built by ``pip install -e .`` (or ``python setup.py build_ext --inplace``) through
``setup.py``'s ``cffi_modules``; setuptools runs this file from the project root.
"""
from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

_ROOT = Path(__file__).resolve().parent.parent


def _rel(path: Path) -> str:
    # setuptools wants an extension's sources relative to the project root (its cwd).
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)


CDEF = """
#define RING_MAGIC ...
#define RING_VERSION ...
#define RING_HEADER_SIZE ...
#define RING_HEAD_OFFSET ...
#define RING_TAIL_OFFSET ...
#define RING_ALIGN ...
#define RING_RECORD_HEADER ...
#define RING_MIN_CAPACITY ...
#define RING_SKIP ...

#define RING_OK ...
#define RING_FULL ...
#define RING_EMPTY ...
#define RING_TOO_BIG ...
#define RING_SMALL_BUFFER ...
#define RING_CORRUPT ...
#define RING_BAD_VERSION ...
#define RING_BAD_SIZE ...
#define RING_BAD_ALIGN ...
#define RING_CLOSED ...

typedef struct ring {
    void *hdr;
    unsigned char *data;
    uint64_t capacity;
    uint32_t max_record;
} ring_t;

size_t ring_memory_size(uint64_t capacity);
int ring_init(ring_t *r, void *mem, size_t size);
int ring_attach(ring_t *r, void *mem, size_t size);
void ring_close(ring_t *r);
int ring_push(ring_t *r, const void *data, uint32_t len);
int ring_peek(ring_t *r, const void **data, uint32_t *len);
int ring_peek_len(ring_t *r, uint32_t *len);
int ring_discard(ring_t *r);
int ring_pop(ring_t *r, void *out, size_t outcap, uint32_t *len);
uint64_t ring_used(const ring_t *r);
uint64_t ring_free_space(const ring_t *r);
uint64_t ring_capacity(const ring_t *r);
uint32_t ring_max_record(const ring_t *r);
const char *ring_strerror(int code);

/* ring_push taking `const char *`, so that cffi passes a bytes object without a copy or a
   from_buffer() (which it does only for char pointers) */
int ring_push_bytes(ring_t *r, const char *data, uint32_t len);
"""

SOURCE = """
#include "ring.h"

static int ring_push_bytes(ring_t *r, const char *data, uint32_t len)
{
    return ring_push(r, data, len);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "zipcomm._ring_c",
    SOURCE,
    sources=[_rel(_ROOT / "csrc" / "ring.c")],
    include_dirs=[_rel(_ROOT / "csrc")],
    depends=[_rel(_ROOT / "csrc" / "ring.h")],
    extra_compile_args=["-std=c11", "-O2"],
)


SCATTER_CDEF = """
#define SCATTER_OK ...
#define SCATTER_BAD_WIDTH ...
#define SCATTER_OUT_OF_RANGE ...
#define SCATTER_NO_MEMORY ...
int scatter_rows(const unsigned char *src, size_t n_rows, size_t row_size,
                 const void *bucket, int bucket_width, int bucket_signed, uint64_t n_buckets,
                 unsigned char *dst, int64_t *counts, int64_t *bad_row);
"""

scatter_builder = FFI()
scatter_builder.cdef(SCATTER_CDEF)
scatter_builder.set_source(
    "zipcomm._scatter_c",
    '#include "scatter.h"',
    sources=[_rel(_ROOT / "csrc" / "scatter.c")],
    include_dirs=[_rel(_ROOT / "csrc")],
    depends=[_rel(_ROOT / "csrc" / "scatter.h")],
    extra_compile_args=["-std=c11", "-O2"],
)
