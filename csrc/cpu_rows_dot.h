// CPU row products Y = A X^T in float32 (the CPU twin of K2's candidate_scores) and the float64
// k-sized side of the pursuits on float32 rows; free of torch.
#pragma once

#include <cstdint>

namespace gtp {

// Rows [i0, i1) of Y (row stride ldy) = A (row stride lda, D columns) times X^T, X being p rows of
// D floats (row stride ldx); float32 accumulation. Each entry is computed the same way whatever
// the row range, so splitting rows over threads does not change a bit of the result.
using RowsDotFn = void (*)(const float* A, int64_t lda, int64_t i0, int64_t i1, int64_t D,
                           const float* X, int64_t ldx, int64_t p, float* Y, int64_t ldy);
// The same with A stored in 16 bits (IEEE fp16 or bf16 bit patterns): each element is converted
// to float32 in registers as it is loaded (exact), so the pass reads the stored bytes only.
using RowsDotHalfFn = void (*)(const uint16_t* A, int64_t lda, int64_t i0, int64_t i1, int64_t D,
                               const float* X, int64_t ldx, int64_t p, float* Y, int64_t ldy);

// The pursuits' k-sized side on float32 copies of the selected rows, float64 arithmetic:
//   RowsDotF64Fn:     y[i] = sum_d M[i, d] x[d]               for rows [i0, i1)
//   RowsCombineF64Fn: r[d] = b[d] - sum_{i<n} w[i] M[i, d]     for columns [d0, d1)
using RowsDotF64Fn = void (*)(const float* M, int64_t ldm, int64_t i0, int64_t i1, int64_t D,
                              const double* x, double* y);
using RowsCombineF64Fn = void (*)(const float* M, int64_t ldm, int64_t n, int64_t d0, int64_t d1,
                                  const double* w, const double* b, double* r);

struct CpuKernels {
  RowsDotFn rows_dot;
  RowsDotHalfFn rows_dot_f16;
  RowsDotHalfFn rows_dot_bf16;
  RowsDotF64Fn rows_dot_f64;
  RowsCombineF64Fn rows_combine_f64;
  const char* isa;
};

// The kernels for instruction set `isa` ("avx512", "avx2", "baseline"; "" = the widest this CPU
// has), or nullptr when this CPU or build lacks it.
const CpuKernels* cpu_kernels(const char* isa);

// Name of the variant cpu_kernels("") picks here.
const char* cpu_rows_dot_isa();

}  // namespace gtp
