// CPU row products Y = A X^T in float32 (the CPU twin of K2's candidate_scores), free of torch.
#pragma once

#include <cstdint>

namespace gtp {

// Rows [i0, i1) of Y (row stride ldy) = A (row stride lda, D columns) times X^T, X being p rows of
// D floats (row stride ldx); float32 accumulation. Each entry is computed the same way whatever
// the row range, so splitting rows over threads does not change a bit of the result.
using RowsDotFn = void (*)(const float* A, int64_t lda, int64_t i0, int64_t i1, int64_t D,
                           const float* X, int64_t ldx, int64_t p, float* Y, int64_t ldy);

// The variant for instruction set `isa` ("avx512", "avx2", "baseline"; "" = the widest this CPU
// has), or nullptr when this CPU or build lacks it.
RowsDotFn cpu_rows_dot_variant(const char* isa);

// Name of the variant "" picks here.
const char* cpu_rows_dot_isa();

}  // namespace gtp
