/* ring.c - see ring.h for the layout and the contract. */
#include "ring.h"

#include <stdalign.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

#if ATOMIC_LLONG_LOCK_FREE != 2
#error "64-bit atomics are not lock-free here; they would not work across processes"
#endif

typedef struct ring_header {
    _Atomic unsigned long long magic;
    uint32_t version;
    uint32_t header_size;
    uint64_t capacity;
    unsigned char reserved0[RING_HEAD_OFFSET - 24];
    _Atomic unsigned long long head;
    unsigned char reserved1[RING_TAIL_OFFSET - RING_HEAD_OFFSET - 8];
    _Atomic unsigned long long tail;
    unsigned char reserved2[RING_HEADER_SIZE - RING_TAIL_OFFSET - 8];
} ring_header;

_Static_assert(sizeof(unsigned long long) == 8, "unsigned long long must be 64 bits");
_Static_assert(sizeof(_Atomic unsigned long long) == 8, "atomic u64 must be 8 bytes");
_Static_assert(alignof(_Atomic unsigned long long) <= RING_ALIGN, "atomic u64 alignment");
_Static_assert(offsetof(ring_header, version) == 8, "layout");
_Static_assert(offsetof(ring_header, header_size) == 12, "layout");
_Static_assert(offsetof(ring_header, capacity) == 16, "layout");
_Static_assert(offsetof(ring_header, head) == RING_HEAD_OFFSET, "layout");
_Static_assert(offsetof(ring_header, tail) == RING_TAIL_OFFSET, "layout");
_Static_assert(sizeof(ring_header) == RING_HEADER_SIZE, "layout");

#define HDR(r) ((ring_header *)(r)->hdr)

static inline uint64_t round8(uint64_t n) { return (n + 7u) & ~(uint64_t)7u; }

static inline uint32_t read_u32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void write_record_header(unsigned char *p, uint32_t len)
{
    const uint32_t words[2] = {len, 0};
    memcpy(p, words, sizeof words);
}

static uint32_t max_record_for(uint64_t capacity)
{
    /* A record of 8 * ceil(capacity / 16) bytes fits an empty ring at any offset o (a
     * multiple of 8): it is at most max(o, capacity - o), so it fits either before the end
     * of the data area or, after a skip marker, before o. */
    uint64_t half = (capacity / 8 + 1) / 2 * 8;
    uint64_t m = half > RING_RECORD_HEADER ? half - RING_RECORD_HEADER : 0;
    return m >= RING_SKIP ? RING_SKIP - 1 : (uint32_t)m;
}

static void fill_handle(ring_t *r, void *mem, uint64_t capacity)
{
    r->hdr = mem;
    r->data = (unsigned char *)mem + RING_HEADER_SIZE;
    r->capacity = capacity;
    r->max_record = max_record_for(capacity);
}

static int check_memory(const void *mem, size_t size)
{
    if (mem == NULL || ((uintptr_t)mem % RING_ALIGN) != 0)
        return RING_BAD_ALIGN;
    if (size < (size_t)RING_HEADER_SIZE + RING_MIN_CAPACITY)
        return RING_BAD_SIZE;
    return RING_OK;
}

size_t ring_memory_size(uint64_t capacity)
{
    return (size_t)(RING_HEADER_SIZE + round8(capacity));
}

int ring_init(ring_t *r, void *mem, size_t size)
{
    int rc = check_memory(mem, size);
    if (rc != RING_OK)
        return rc;
    ring_header *h = mem;
    uint64_t capacity = (uint64_t)(size - RING_HEADER_SIZE) & ~(uint64_t)7u;

    atomic_store_explicit(&h->magic, 0, memory_order_relaxed);
    memset((unsigned char *)mem + 8, 0, RING_HEADER_SIZE - 8);
    h->version = RING_VERSION;
    h->header_size = RING_HEADER_SIZE;
    h->capacity = capacity;
    atomic_store_explicit(&h->head, 0, memory_order_relaxed);
    atomic_store_explicit(&h->tail, 0, memory_order_relaxed);
    /* Publish: whoever sees the magic (acquire) sees the rest of the header. */
    atomic_store_explicit(&h->magic, RING_MAGIC, memory_order_release);
    fill_handle(r, mem, capacity);
    return RING_OK;
}

int ring_attach(ring_t *r, void *mem, size_t size)
{
    int rc = check_memory(mem, size);
    if (rc != RING_OK)
        return rc;
    ring_header *h = mem;
    if (atomic_load_explicit(&h->magic, memory_order_acquire) != RING_MAGIC)
        return RING_CORRUPT;
    if (h->version != RING_VERSION)
        return RING_BAD_VERSION;
    uint64_t capacity = h->capacity;
    if (h->header_size != RING_HEADER_SIZE || capacity < RING_MIN_CAPACITY || capacity % RING_ALIGN)
        return RING_CORRUPT;
    if (capacity > (uint64_t)(size - RING_HEADER_SIZE))
        return RING_BAD_SIZE;
    uint64_t head = atomic_load_explicit(&h->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&h->tail, memory_order_acquire);
    if ((head | tail) % RING_ALIGN || head - tail > capacity)
        return RING_CORRUPT;
    fill_handle(r, mem, capacity);
    return RING_OK;
}

void ring_close(ring_t *r)
{
    r->hdr = NULL;
    r->data = NULL;
    r->capacity = 0;
    r->max_record = 0;
}

int ring_push(ring_t *r, const void *data, uint32_t len)
{
    ring_header *h = HDR(r);
    if (h == NULL)
        return RING_CLOSED;
    if (len > r->max_record)
        return RING_TOO_BIG;
    const uint64_t cap = r->capacity;
    const uint64_t need = RING_RECORD_HEADER + round8(len);
    /* head is ours; the acquire on tail orders the consumer's reads of the
     * space it freed before our writes into it. */
    const uint64_t head = atomic_load_explicit(&h->head, memory_order_relaxed);
    const uint64_t tail = atomic_load_explicit(&h->tail, memory_order_acquire);
    const uint64_t used = head - tail;
    if ((head | tail) % RING_ALIGN || used > cap)
        return RING_CORRUPT;
    const uint64_t free_space = cap - used;
    const uint64_t off = head % cap;
    const uint64_t contig = cap - off;
    uint64_t at, advance;
    if (need <= contig) {
        if (need > free_space)
            return RING_FULL;
        at = off;
        advance = need;
    } else {
        if (contig + need > free_space)
            return RING_FULL;
        write_record_header(r->data + off, RING_SKIP);
        at = 0;
        advance = contig + need;
    }
    write_record_header(r->data + at, len);
    if (len)
        memcpy(r->data + at + RING_RECORD_HEADER, data, len);
    /* Publish header(s) and payload together. */
    atomic_store_explicit(&h->head, head + advance, memory_order_release);
    return RING_OK;
}

/* Locate the next record: its payload pointer, length and how far tail moves
 * past it (skip marker included). */
static int next_record(ring_t *r, unsigned char **payload, uint32_t *len, uint64_t *tail_out,
                       uint64_t *advance)
{
    ring_header *h = HDR(r);
    if (h == NULL)
        return RING_CLOSED;
    const uint64_t cap = r->capacity;
    const uint64_t tail = atomic_load_explicit(&h->tail, memory_order_relaxed);
    /* acquire: the producer's writes of the records below head are visible. */
    const uint64_t head = atomic_load_explicit(&h->head, memory_order_acquire);
    if (head == tail)
        return RING_EMPTY;
    const uint64_t used = head - tail;
    if ((head | tail) % RING_ALIGN || used > cap)
        return RING_CORRUPT;
    uint64_t off = tail % cap;
    uint64_t skip = 0;
    uint32_t n = read_u32(r->data + off);
    if (n == RING_SKIP) {
        skip = cap - off;
        if (skip >= used)
            return RING_CORRUPT;
        off = 0;
        n = read_u32(r->data);
    }
    const uint64_t need = RING_RECORD_HEADER + round8(n);
    if (n > r->max_record || need > used - skip || need > cap - off)
        return RING_CORRUPT;
    *payload = r->data + off + RING_RECORD_HEADER;
    *len = n;
    *tail_out = tail;
    *advance = skip + need;
    return RING_OK;
}

int ring_peek(ring_t *r, const void **data, uint32_t *len)
{
    unsigned char *p;
    uint64_t tail, advance;
    int rc = next_record(r, &p, len, &tail, &advance);
    if (rc == RING_OK && data != NULL)
        *data = p;
    return rc;
}

int ring_peek_len(ring_t *r, uint32_t *len)
{
    return ring_peek(r, NULL, len);
}

int ring_discard(ring_t *r)
{
    unsigned char *p;
    uint32_t n;
    uint64_t tail, advance;
    int rc = next_record(r, &p, &n, &tail, &advance);
    if (rc != RING_OK)
        return rc;
    atomic_store_explicit(&HDR(r)->tail, tail + advance, memory_order_release);
    return RING_OK;
}

int ring_pop(ring_t *r, void *out, size_t outcap, uint32_t *len)
{
    unsigned char *p;
    uint64_t tail, advance;
    int rc = next_record(r, &p, len, &tail, &advance);
    if (rc != RING_OK)
        return rc;
    if (*len > outcap)
        return RING_SMALL_BUFFER;
    if (*len)
        memcpy(out, p, *len);
    /* release: our reads of the record happen before the producer reuses it. */
    atomic_store_explicit(&HDR(r)->tail, tail + advance, memory_order_release);
    return RING_OK;
}

uint64_t ring_used(const ring_t *r)
{
    ring_header *h = HDR(r);
    if (h == NULL)
        return 0;
    /* Re-read head until it did not move while tail was read: then
     * tail <= head <= tail + capacity held at the moment tail was read. */
    uint64_t head = atomic_load_explicit(&h->head, memory_order_acquire);
    for (;;) {
        uint64_t tail = atomic_load_explicit(&h->tail, memory_order_acquire);
        uint64_t again = atomic_load_explicit(&h->head, memory_order_acquire);
        if (again == head)
            return head - tail;
        head = again;
    }
}

uint64_t ring_free_space(const ring_t *r)
{
    uint64_t used = ring_used(r);
    return used < r->capacity ? r->capacity - used : 0;
}

uint64_t ring_capacity(const ring_t *r)
{
    return r->capacity;
}

uint32_t ring_max_record(const ring_t *r)
{
    return r->max_record;
}

const char *ring_strerror(int code)
{
    switch (code) {
    case RING_OK: return "success";
    case RING_FULL: return "the ring is full";
    case RING_EMPTY: return "the ring is empty";
    case RING_TOO_BIG: return "record larger than the ring's maximum record size";
    case RING_SMALL_BUFFER: return "output buffer smaller than the record";
    case RING_CORRUPT: return "ring memory is corrupt (bad magic, header, positions or record)";
    case RING_BAD_VERSION: return "ring of an unsupported format version";
    case RING_BAD_SIZE: return "memory too small for the ring";
    case RING_BAD_ALIGN: return "ring memory is not 8-byte aligned";
    case RING_CLOSED: return "the ring handle is closed";
    default: return "unknown ring status";
    }
}
