// first_match_cpu (first_match.h): a compare of 16 columns at a time with SSE2 (every x86-64
// CPU has it), an early exit at the first hit; scalar elsewhere and for a row's tail.
#include "first_match.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace xlx {

namespace {

int64_t first_in_row(const float* row, int64_t cols, float value) {
  if (value != value) return -1;  // NaN equals nothing
  int64_t c = 0;
#if defined(__SSE2__)
  const __m128 target = _mm_set1_ps(value);
  for (; c + 16 <= cols; c += 16) {
    const int hit = _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(row + c), target))
                    | _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(row + c + 4), target)) << 4
                    | _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(row + c + 8), target)) << 8
                    | _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(row + c + 12), target)) << 12;
    if (hit) return c + __builtin_ctz(static_cast<unsigned>(hit));
  }
#endif
  for (; c < cols; ++c)
    if (row[c] == value) return c;
  return -1;
}

}  // namespace

void first_match_cpu(const float* x, int64_t rows, int64_t cols, int64_t stride,
                     const float* values, int64_t* ids) {
  for (int64_t r = 0; r < rows; ++r) ids[r] = first_in_row(x + r * stride, cols, values[r]);
}

}  // namespace xlx
