// CPU row products Y = A X^T for float32, fp16 or bf16 A (N x D) and a few float32 rows X (p x D),
// float32 accumulation: the passes over the candidates on CPU (c = A W r for m residuals, and the
// skinny GEMMs that fetch cached columns). 16-bit rows are converted in registers as they are
// loaded, so a pass over an fp16/bf16 pool (a memory-mapped store) reads its bytes once and never
// makes a float32 copy.
//
// Why not torch's A @ X: on our CPU (AMD EPYC, AVX-512, MKL) the GEMV runs at about half the
// memory bandwidth a plain read of A reaches, and the skinny GEMM (p = 2..32) is compute-bound at
// 2-4x a GEMV. Here every tile of R rows x C columns keeps R*C vector partial sums in registers,
// so each loaded vector of A feeds C FMAs: p <= 8 costs about one read of A (see BENCHMARKS.md).
//
// One copy of the kernel per instruction set (cpu_rows_dot_impl.h under #pragma GCC target), the
// widest one the CPU supports chosen once at run time; x86-64 GCC/clang only, else the baseline.
#include "cpu_rows_dot.h"

#include <algorithm>
#include <cstdint>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#define GTP_X86_VARIANTS 1
// the intrinsics (F16C's vcvtph2ps) are usable inside the target regions below
#include <immintrin.h>
#endif

#if defined(GTP_X86_VARIANTS)
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define GTP_ISA isa_avx512
#define GTP_F16C 1  // vcvtph2ps zmm is AVX-512F
#define GTP_VEC_BYTES 64
#define GTP_ROWS 4
#define GTP_COLS 4  // 16 accumulators + 4 A + 4 X vectors of the 32 registers
#include "cpu_rows_dot_impl.h"
#undef GTP_ISA
#undef GTP_F16C
#undef GTP_VEC_BYTES
#undef GTP_ROWS
#undef GTP_COLS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define GTP_ISA isa_avx2
#define GTP_F16C 1
#define GTP_VEC_BYTES 32
#define GTP_ROWS 4
#define GTP_COLS 2  // 8 accumulators + 4 A + 2 X of the 16 registers
#include "cpu_rows_dot_impl.h"
#undef GTP_ISA
#undef GTP_F16C
#undef GTP_VEC_BYTES
#undef GTP_ROWS
#undef GTP_COLS
#pragma GCC pop_options
#endif

#define GTP_ISA isa_baseline
#define GTP_VEC_BYTES 16
#define GTP_ROWS 4
#define GTP_COLS 2
#include "cpu_rows_dot_impl.h"
#undef GTP_ISA
#undef GTP_F16C
#undef GTP_VEC_BYTES
#undef GTP_ROWS
#undef GTP_COLS

namespace gtp {
namespace {

bool has_avx512() {
#if defined(GTP_X86_VARIANTS)
  __builtin_cpu_init();
  // libgcc's feature bits also check that the OS saves the wide registers (XGETBV)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool has_avx2() {
#if defined(GTP_X86_VARIANTS)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const char* best_isa() {
  static const char* name = has_avx512() ? "avx512" : has_avx2() ? "avx2" : "baseline";
  return name;
}

}  // namespace

const CpuKernels* cpu_kernels(const char* isa) {
#if defined(GTP_X86_VARIANTS)
  static const CpuKernels avx512{&isa_avx512::rows_dot, &isa_avx512::rows_dot_f16, &isa_avx512::rows_dot_bf16,
                                 &isa_avx512::rows_dot_f64, &isa_avx512::rows_combine_f64, "avx512"};
  static const CpuKernels avx2{&isa_avx2::rows_dot, &isa_avx2::rows_dot_f16, &isa_avx2::rows_dot_bf16,
                               &isa_avx2::rows_dot_f64, &isa_avx2::rows_combine_f64, "avx2"};
#endif
  static const CpuKernels baseline{&isa_baseline::rows_dot, &isa_baseline::rows_dot_f16,
                                   &isa_baseline::rows_dot_bf16, &isa_baseline::rows_dot_f64,
                                   &isa_baseline::rows_combine_f64, "baseline"};
  const std::string want = (isa == nullptr || *isa == '\0') ? best_isa() : isa;
#if defined(GTP_X86_VARIANTS)
  if (want == "avx512") return has_avx512() ? &avx512 : nullptr;
  if (want == "avx2") return has_avx2() ? &avx2 : nullptr;
#endif
  if (want == "baseline") return &baseline;
  return nullptr;
}

const char* cpu_rows_dot_isa() { return best_isa(); }

}  // namespace gtp
