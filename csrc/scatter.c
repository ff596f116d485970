#include "scatter.h"

#include <stdlib.h>
#include <string.h>

static inline int64_t bucket_at(const void *b, int width, int is_signed, size_t i)
{
    switch (width) {
    case 1: return is_signed ? (int64_t)((const int8_t *)b)[i] : (int64_t)((const uint8_t *)b)[i];
    case 2: return is_signed ? (int64_t)((const int16_t *)b)[i] : (int64_t)((const uint16_t *)b)[i];
    case 4: return is_signed ? (int64_t)((const int32_t *)b)[i] : (int64_t)((const uint32_t *)b)[i];
    default: {
        if (is_signed)
            return ((const int64_t *)b)[i];
        uint64_t u = ((const uint64_t *)b)[i];
        return u > (uint64_t)INT64_MAX ? -1 : (int64_t)u;
    }
    }
}

int scatter_rows(const unsigned char *src, size_t n_rows, size_t row_size,
                 const void *bucket, int bucket_width, int bucket_signed, uint64_t n_buckets,
                 unsigned char *dst, int64_t *counts, int64_t *bad_row)
{
    if (bucket_width != 1 && bucket_width != 2 && bucket_width != 4 && bucket_width != 8)
        return SCATTER_BAD_WIDTH;
    memset(counts, 0, n_buckets * sizeof(int64_t));
    for (size_t i = 0; i < n_rows; i++) {
        int64_t k = bucket_at(bucket, bucket_width, bucket_signed, i);
        if (k < 0 || (uint64_t)k >= n_buckets) {
            *bad_row = (int64_t)i;
            return SCATTER_OUT_OF_RANGE;
        }
        counts[k]++;
    }
    size_t *next = malloc(n_buckets * sizeof(size_t));
    if (next == NULL)
        return SCATTER_NO_MEMORY;
    size_t at = 0;
    for (uint64_t k = 0; k < n_buckets; k++) {
        next[k] = at;
        at += (size_t)counts[k];
    }
    /* one loop per (bucket type, row size) so that the inner loop has no switch, and the
       common row sizes get a fixed-size copy the compiler turns into one move */
#define SCATTER_LOOP(T, SIZE)                                                        \
    for (size_t i = 0; i < n_rows; i++)                                               \
        memcpy(dst + (SIZE) * next[(size_t)((const T *)bucket)[i]]++, src + (SIZE) * i, (SIZE))
#define SCATTER_TYPED(T)                                                             \
    do {                                                                              \
        if (row_size == 8) SCATTER_LOOP(T, 8);                                        \
        else if (row_size == 4) SCATTER_LOOP(T, 4);                                   \
        else SCATTER_LOOP(T, row_size);                                               \
    } while (0)
    /* every bucket was checked in [0, n_buckets) above, so the unsigned reading is exact */
    switch (bucket_width) {
    case 1: SCATTER_TYPED(uint8_t); break;
    case 2: SCATTER_TYPED(uint16_t); break;
    case 4: SCATTER_TYPED(uint32_t); break;
    default: SCATTER_TYPED(uint64_t); break;
    }
#undef SCATTER_TYPED
#undef SCATTER_LOOP
    free(next);
    return SCATTER_OK;
}
