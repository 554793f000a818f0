// Vector kernels of K3's CPU twin (declared in lsq_update_core.h): dot products and axpys over
// rows of the Cholesky factor, which is all the triangular solves do.
#include <cstdint>

namespace gtp {

// The triangular solves of K3 are dot products over rows of L. Vector partial sums keep the FMA
// units busy (one running sum is latency-bound, about 4x slower at k in the hundreds); on x86-64 Linux the function is also cloned for
// AVX2+FMA and AVX-512 and the best clone is picked when the library loads, so a portable build
// still uses wide vectors (about 2x at k = 400..800 on an AVX-512 machine).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GTP_CPU_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define GTP_CPU_CLONES
#endif

// Two 64-byte vector accumulators (GCC vector extension: lowered to whatever the clone's ISA has).
template <typename T>
static inline T dot_partial(const T* a, const T* b, int64_t n) {
  constexpr int kLanes = 64 / sizeof(T);
  typedef T Vec __attribute__((vector_size(64)));
  Vec s0 = {}, s1 = {};
  int64_t q = 0;
  for (; q + 2 * kLanes <= n; q += 2 * kLanes) {
    Vec a0, a1, b0, b1;
    __builtin_memcpy(&a0, a + q, sizeof(Vec));
    __builtin_memcpy(&b0, b + q, sizeof(Vec));
    __builtin_memcpy(&a1, a + q + kLanes, sizeof(Vec));
    __builtin_memcpy(&b1, b + q + kLanes, sizeof(Vec));
    s0 += a0 * b0;
    s1 += a1 * b1;
  }
  s0 += s1;
  T total = T(0);
  for (int j = 0; j < kLanes; ++j) total += s0[j];
  for (; q < n; ++q) total += a[q] * b[q];
  return total;
}

template <typename T>
static inline void axpy_plain(T alpha, const T* x, T* y, int64_t n) {
  for (int64_t q = 0; q < n; ++q) y[q] += alpha * x[q];  // no reduction: the vectoriser takes it
}

GTP_CPU_CLONES void cpu_axpy(float alpha, const float* x, float* y, int64_t n) { axpy_plain(alpha, x, y, n); }
GTP_CPU_CLONES void cpu_axpy(double alpha, const double* x, double* y, int64_t n) { axpy_plain(alpha, x, y, n); }
GTP_CPU_CLONES float cpu_dot(const float* a, const float* b, int64_t n) { return dot_partial(a, b, n); }
GTP_CPU_CLONES double cpu_dot(const double* a, const double* b, int64_t n) { return dot_partial(a, b, n); }

}  // namespace gtp
