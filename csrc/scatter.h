/* Stable counting partition of fixed-size rows by a bucket index (zipcomm's shuffle).
 *
 * scatter_rows() copies row i of `src` (row_size bytes each) into `dst` so that all rows of
 * bucket 0 come first, then those of bucket 1, ..., each bucket keeping the input order:
 * the order a stable sort by bucket gives, in two linear passes (count, then copy) instead
 * of a sort.  `counts` (n_buckets entries) receives the number of rows per bucket.
 */
#ifndef ZIPCOMM_SCATTER_H
#define ZIPCOMM_SCATTER_H

#include <stddef.h>
#include <stdint.h>

#define SCATTER_OK 0
#define SCATTER_BAD_WIDTH -1
#define SCATTER_OUT_OF_RANGE -2   /* *bad_row = the first row whose bucket is outside [0, n) */
#define SCATTER_NO_MEMORY -3

/* bucket: n_rows integers of `bucket_width` bytes (1, 2, 4 or 8), signed if bucket_signed */
int scatter_rows(const unsigned char *src, size_t n_rows, size_t row_size,
                 const void *bucket, int bucket_width, int bucket_signed, uint64_t n_buckets,
                 unsigned char *dst, int64_t *counts, int64_t *bad_row);

#endif
