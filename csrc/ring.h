/*
 * ring.h - single-producer single-consumer ring of variable-length records
 * over caller-provided memory (e.g. a shared-memory segment mapped by two
 * processes).  Lock-free: the producer owns `head`, the consumer owns `tail`;
 * each publishes its position with a release store and reads the other's with
 * an acquire load (C11 <stdatomic.h>; 64-bit atomics must be lock-free, which
 * is checked at compile time, so that they work across processes).
 *
 * Memory layout (native byte order, all offsets in bytes; zipcomm/ring.py's
 * pure-Python twin implements exactly the same layout):
 *
 *     0   uint64 magic        RING_MAGIC, written last by ring_init
 *     8   uint32 version      RING_VERSION
 *    12   uint32 header_size  RING_HEADER_SIZE
 *    16   uint64 capacity     size of the data area, a multiple of 8
 *    24   reserved (zero) up to 64
 *    64   uint64 head         producer position (a byte count that only grows)
 *   128   uint64 tail         consumer position (a byte count that only grows)
 *   192   data area of `capacity` bytes
 *
 * head and tail live on cache lines of their own.  head - tail is the number of
 * bytes in use; a position maps to the data offset `position % capacity`.
 *
 * A record is an 8-byte header { uint32 length; uint32 reserved = 0 } followed
 * by `length` payload bytes, padded to a multiple of 8 (the padding bytes are
 * never written).  A record never wraps: if it does not fit between the write
 * offset and the end of the data area, the producer writes a skip marker
 * (length RING_SKIP) there and the record at offset 0; marker and record are
 * published together.  Because a record can need the end of the area plus its
 * own size, the largest payload is fixed at ring_max_record() =
 * capacity / 2 (rounded up to 8) - 8 bytes: a record of that size always
 * fits into an empty ring, wherever the positions are, so a push that returns
 * RING_FULL succeeds once the consumer has drained the ring.
 *
 * Both sides validate what they read from shared memory (positions, record
 * lengths) and report RING_CORRUPT instead of reading or writing outside the
 * ring; the capacity is taken once, by ring_init / ring_attach, into the
 * process-private ring_t handle.
 *
 * Thread safety: at most one producer and one consumer at a time (in any
 * processes).  ring_used / ring_free_space may be called by anyone.
 */
#ifndef ZIPCOMM_RING_H
#define ZIPCOMM_RING_H

#include <stddef.h>
#include <stdint.h>

#define RING_MAGIC        0x7A63726E67303031ULL /* "zcrng001" */
#define RING_VERSION      1
#define RING_HEADER_SIZE  192
#define RING_HEAD_OFFSET  64
#define RING_TAIL_OFFSET  128
#define RING_ALIGN        8     /* memory, records and capacity are aligned to this */
#define RING_RECORD_HEADER 8
#define RING_MIN_CAPACITY 16    /* the smallest data area: room for one empty record */
#define RING_SKIP         0xFFFFFFFFu /* record length of the wrap-around marker */

/* Status codes: 0 is success, failures are negative. */
#define RING_OK            0
#define RING_FULL         (-1)  /* push: not enough free space now */
#define RING_EMPTY        (-2)  /* peek/pop/discard: no record */
#define RING_TOO_BIG      (-3)  /* push: length > ring_max_record(); never fits */
#define RING_SMALL_BUFFER (-4)  /* pop: outcap < record length; record kept, *len set */
#define RING_CORRUPT      (-5)  /* bad magic/header or inconsistent positions/records */
#define RING_BAD_VERSION  (-6)  /* attach: a ring of another format version */
#define RING_BAD_SIZE     (-7)  /* init/attach: memory too small for a (this) ring */
#define RING_BAD_ALIGN    (-8)  /* init/attach: memory not 8-byte aligned (or NULL) */
#define RING_CLOSED       (-9)  /* the handle was closed with ring_close() */

/*
 * Process-private handle.  Fill it with ring_init or ring_attach; it holds
 * pointers into the caller's memory, which must outlive it.  Read-only for
 * callers.
 */
typedef struct ring {
    void *hdr;               /* start of the memory (the header); NULL once closed */
    unsigned char *data;     /* start of the data area */
    uint64_t capacity;       /* bytes in the data area */
    uint32_t max_record;     /* largest payload ring_push accepts */
} ring_t;

/* Bytes of memory needed for a ring whose data area holds `capacity` bytes
 * (capacity is rounded up to a multiple of 8). */
size_t ring_memory_size(uint64_t capacity);

/* Format `size` bytes at `mem` as an empty ring whose capacity is
 * (size - RING_HEADER_SIZE) rounded down to 8, and fill *r.  The data area is
 * not cleared.  Returns RING_OK, RING_BAD_ALIGN or RING_BAD_SIZE. */
int ring_init(ring_t *r, void *mem, size_t size);

/* Fill *r for an existing ring at `mem` (`size` bytes available), checking
 * magic, version, header size, capacity (fits in `size`) and positions.
 * Returns RING_OK, RING_BAD_ALIGN, RING_BAD_SIZE, RING_CORRUPT or
 * RING_BAD_VERSION. */
int ring_attach(ring_t *r, void *mem, size_t size);

/* Forget the memory: every later call on *r returns RING_CLOSED (or 0). */
void ring_close(ring_t *r);

/* Producer: append one record of `len` bytes (data may be NULL if len == 0).
 * Returns RING_OK, RING_FULL, RING_TOO_BIG, RING_CORRUPT or RING_CLOSED. */
int ring_push(ring_t *r, const void *data, uint32_t len);

/* Consumer: look at the next record without consuming it.  *len receives its
 * length; if data is not NULL, *data points at its payload inside the ring,
 * valid until the record is discarded.  Returns RING_OK, RING_EMPTY,
 * RING_CORRUPT or RING_CLOSED. */
int ring_peek(ring_t *r, const void **data, uint32_t *len);

/* Consumer: length of the next record (ring_peek without the pointer). */
int ring_peek_len(ring_t *r, uint32_t *len);

/* Consumer: drop the next record.  Returns RING_OK, RING_EMPTY, RING_CORRUPT
 * or RING_CLOSED. */
int ring_discard(ring_t *r);

/* Consumer: copy the next record into out (outcap bytes) and consume it.
 * *len receives the record's length, also on RING_SMALL_BUFFER (the record is
 * then left in the ring).  Returns RING_OK, RING_EMPTY, RING_SMALL_BUFFER,
 * RING_CORRUPT or RING_CLOSED. */
int ring_pop(ring_t *r, void *out, size_t outcap, uint32_t *len);

/* Bytes in use (record headers, padding and skip markers included), from a
 * consistent snapshot of head and tail; may exceed the capacity only if the
 * shared positions are corrupt.  0 for a closed handle. */
uint64_t ring_used(const ring_t *r);

/* ring_capacity(r) - ring_used(r), or 0 if that would be negative. */
uint64_t ring_free_space(const ring_t *r);

/* Bytes in the data area (0 for a closed handle). */
uint64_t ring_capacity(const ring_t *r);

/* Largest payload ring_push accepts (0 for a closed handle). */
uint32_t ring_max_record(const ring_t *r);

/* A static, human-readable description of a status code. */
const char *ring_strerror(int code);

#endif /* ZIPCOMM_RING_H */
