// Body of the CPU row-products kernel (see cpu_rows_dot.cpp), included once per instruction set,
// each time inside its own `#pragma GCC target` region and namespace GTP_ISA, with
//   GTP_VEC_BYTES  vector width in bytes (64: AVX-512, 32: AVX2, 16: baseline)
//   GTP_ROWS       rows of A per register tile
//   GTP_COLS       columns of X per register tile (GTP_ROWS * GTP_COLS accumulators)
// The per-ISA copy matters: GCC lowers generic vector code in each function for that function's
// own target, so a template shared between ISA regions would be split into baseline vectors.
// No include guard: included on purpose more than once.

namespace GTP_ISA {

constexpr int kLanes = GTP_VEC_BYTES / 4;
typedef float Vec __attribute__((vector_size(GTP_VEC_BYTES)));

static inline Vec load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof(Vec));  // unaligned load
  return v;
}

// Y[r, c] (+)= <A[r, 0:kc], X[c, 0:kc]> for R rows and C columns: R*C vector partial sums, each
// loaded A vector used C times and each X vector R times, then one horizontal sum per entry.
template <int R, int C>
static inline __attribute__((always_inline)) void tile(const float* A, int64_t lda, const float* X,
                                                       int64_t ldx, int64_t kc, float* Y, int64_t ldy,
                                                       bool first) {
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec{};
  int64_t d = 0;
  for (; d + kLanes <= kc; d += kLanes) {
    Vec a[R], x[C];
    for (int r = 0; r < R; ++r) a[r] = load(A + r * lda + d);
    for (int c = 0; c < C; ++c) x[c] = load(X + c * ldx + d);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] += a[r] * x[c];
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = 0.f;
      for (int j = 0; j < kLanes; ++j) s += acc[r][c][j];
      for (int64_t q = d; q < kc; ++q) s += A[r * lda + q] * X[c * ldx + q];
      if (first) Y[r * ldy + c] = s;
      else Y[r * ldy + c] += s;
    }
}

template <int R>
static inline __attribute__((always_inline)) void row_tile(const float* A, int64_t lda, const float* X,
                                                           int64_t ldx, int64_t p, int64_t kc, float* Y,
                                                           int64_t ldy, bool first) {
  int64_t c = 0;
  for (; c + GTP_COLS <= p; c += GTP_COLS) tile<R, GTP_COLS>(A, lda, X + c * ldx, ldx, kc, Y + c, ldy, first);
  switch (p - c) {  // GTP_COLS <= 4
    case 3: tile<R, 3>(A, lda, X + c * ldx, ldx, kc, Y + c, ldy, first); break;
    case 2: tile<R, 2>(A, lda, X + c * ldx, ldx, kc, Y + c, ldy, first); break;
    case 1: tile<R, 1>(A, lda, X + c * ldx, ldx, kc, Y + c, ldy, first); break;
    default: break;
  }
}

// Rows [i0, i1) of Y = A X^T. D is split into chunks of KC so that a row tile's chunk of A stays
// in L1 while every column tile reads it, and X's chunk (p * KC floats) stays in L2.
void rows_dot(const float* A, int64_t lda, int64_t i0, int64_t i1, int64_t D, const float* X,
              int64_t ldx, int64_t p, float* Y, int64_t ldy) {
  constexpr int64_t KC = 1024;
  int64_t i = i0;
  for (; i + GTP_ROWS <= i1; i += GTP_ROWS)
    for (int64_t k0 = 0; k0 < D; k0 += KC)
      row_tile<GTP_ROWS>(A + i * lda + k0, lda, X + k0, ldx, p, std::min(KC, D - k0), Y + i * ldy, ldy,
                         k0 == 0);
  for (; i < i1; ++i)
    for (int64_t k0 = 0; k0 < D; k0 += KC)
      row_tile<1>(A + i * lda + k0, lda, X + k0, ldx, p, std::min(KC, D - k0), Y + i * ldy, ldy, k0 == 0);
}

}  // namespace GTP_ISA
