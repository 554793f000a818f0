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

// ---- loaders: kLanes values of A as a float32 vector, in A's stored format ---------------------
// float32 as is; bf16 (the high half of a float32) by a 16-bit shift; fp16 by F16C's vcvtph2ps
// where this variant has it (GTP_F16C), else by exact integer arithmetic (below). Each gives the
// value the element holds, exactly: a product of a converted fp16/bf16 row with X is the float32
// product of the same numbers.
typedef uint16_t VecU16 __attribute__((vector_size(GTP_VEC_BYTES / 2)));  // kLanes halves
typedef uint32_t VecU32 __attribute__((vector_size(GTP_VEC_BYTES)));      // kLanes words

static inline Vec bits_to_float(VecU32 bits) {
  Vec v;
  __builtin_memcpy(&v, &bits, sizeof(Vec));
  return v;
}

static inline VecU32 float_to_bits(Vec v) {
  VecU32 bits;
  __builtin_memcpy(&bits, &v, sizeof(Vec));
  return bits;
}

static inline VecU32 load_halves(const uint16_t* p) {
  VecU16 h;
  __builtin_memcpy(&h, p, sizeof(VecU16));
  return __builtin_convertvector(h, VecU32);
}

struct LoadF32 {
  using T = float;
  static inline Vec vec(const float* p) { return load(p); }
  static inline float one(const float* p) { return *p; }
};

struct LoadBF16 {
  using T = uint16_t;
  static inline Vec vec(const uint16_t* p) { return bits_to_float(load_halves(p) << 16); }
  static inline float one(const uint16_t* p) {
    const uint32_t bits = uint32_t(*p) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
  }
};

// IEEE half -> float without F16C: move exponent and mantissa into float position and scale by
// 2^(127-15), which rebiases normals and turns subnormals into the right normal floats (both
// exact); an all-ones exponent (inf/NaN) gets the float's all-ones exponent back; then the sign.
// (With the CPU's denormals-are-zero mode on, fp16 subnormals would read as 0.)
static inline float half_to_float(uint16_t h) {
  const uint32_t em = uint32_t(h & 0x7fffu) << 13;
  float f;
  __builtin_memcpy(&f, &em, 4);
  f *= 0x1p112f;
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if (em >= 0x0f800000u) bits |= 0x7f800000u;
  bits |= uint32_t(h & 0x8000u) << 16;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

struct LoadF16 {
  using T = uint16_t;
  static inline Vec vec(const uint16_t* p) {
#if defined(GTP_F16C) && GTP_VEC_BYTES == 64
    // the zero-masked form with every lane kept: the same vcvtph2ps, without GCC 12's
    // maybe-uninitialized warning on the plain intrinsic's undefined merge source
    return (Vec)_mm512_maskz_cvtph_ps(__mmask16(0xFFFF), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(GTP_F16C) && GTP_VEC_BYTES == 32
    return (Vec)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    const VecU32 h = load_halves(p);
    const VecU32 em = (h & 0x7fffu) << 13;
    VecU32 bits = float_to_bits(bits_to_float(em) * 0x1p112f);
    bits |= (VecU32)(em >= 0x0f800000u) & 0x7f800000u;
    return bits_to_float(bits | ((h & 0x8000u) << 16));
#endif
  }
  static inline float one(const uint16_t* p) { return half_to_float(*p); }
};

// Y[r, c] (+)= <A[r, 0:kc], X[c, 0:kc]> for R rows and C columns: R*C vector partial sums, each
// loaded (and converted) A vector used C times and each X vector R times, then one horizontal sum
// per entry.
template <class Load, int R, int C>
static inline __attribute__((always_inline)) void tile(const typename Load::T* A, int64_t lda, const float* X,
                                                       int64_t ldx, int64_t kc, float* Y, int64_t ldy,
                                                       bool first) {
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec{};
  int64_t d = 0;
  for (; d + kLanes <= kc; d += kLanes) {
    Vec a[R], x[C];
    for (int r = 0; r < R; ++r) a[r] = Load::vec(A + r * lda + d);
    for (int c = 0; c < C; ++c) x[c] = load(X + c * ldx + d);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] += a[r] * x[c];
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = 0.f;
      for (int j = 0; j < kLanes; ++j) s += acc[r][c][j];
      for (int64_t q = d; q < kc; ++q) s += Load::one(A + r * lda + q) * X[c * ldx + q];
      if (first) Y[r * ldy + c] = s;
      else Y[r * ldy + c] += s;
    }
}

template <class Load, int R>
static inline __attribute__((always_inline)) void row_tile(const typename Load::T* A, int64_t lda,
                                                           const float* X, int64_t ldx, int64_t p, int64_t kc,
                                                           float* Y, int64_t ldy, bool first) {
  int64_t c = 0;
  for (; c + GTP_COLS <= p; c += GTP_COLS)
    tile<Load, R, GTP_COLS>(A, lda, X + c * ldx, ldx, kc, Y + c, ldy, first);
  switch (p - c) {  // GTP_COLS <= 4
    case 3: tile<Load, R, 3>(A, lda, X + c * ldx, ldx, kc, Y + c, ldy, first); break;
    case 2: tile<Load, R, 2>(A, lda, X + c * ldx, ldx, kc, Y + c, ldy, first); break;
    case 1: tile<Load, R, 1>(A, lda, X + c * ldx, ldx, kc, Y + c, ldy, first); break;
    default: break;
  }
}

// Rows [i0, i1) of Y = A X^T. D is split into chunks of KC so that a row tile's chunk of A stays
// in L1 while every column tile reads it, and X's chunk (p * KC floats) stays in L2.
template <class Load>
static inline void rows_dot_any(const typename Load::T* A, int64_t lda, int64_t i0, int64_t i1, int64_t D,
                                const float* X, int64_t ldx, int64_t p, float* Y, int64_t ldy) {
  constexpr int64_t KC = 1024;
  int64_t i = i0;
  for (; i + GTP_ROWS <= i1; i += GTP_ROWS)
    for (int64_t k0 = 0; k0 < D; k0 += KC)
      row_tile<Load, GTP_ROWS>(A + i * lda + k0, lda, X + k0, ldx, p, std::min(KC, D - k0), Y + i * ldy, ldy,
                               k0 == 0);
  for (; i < i1; ++i)
    for (int64_t k0 = 0; k0 < D; k0 += KC)
      row_tile<Load, 1>(A + i * lda + k0, lda, X + k0, ldx, p, std::min(KC, D - k0), Y + i * ldy, ldy, k0 == 0);
}

void rows_dot(const float* A, int64_t lda, int64_t i0, int64_t i1, int64_t D, const float* X, int64_t ldx,
              int64_t p, float* Y, int64_t ldy) {
  rows_dot_any<LoadF32>(A, lda, i0, i1, D, X, ldx, p, Y, ldy);
}

// A in fp16 / bf16 (raw 16-bit patterns), X and Y float32: each element converted in registers as
// it is loaded, so a pass reads the stored bytes once and no float32 copy of A is ever made.
void rows_dot_f16(const uint16_t* A, int64_t lda, int64_t i0, int64_t i1, int64_t D, const float* X,
                  int64_t ldx, int64_t p, float* Y, int64_t ldy) {
  rows_dot_any<LoadF16>(A, lda, i0, i1, D, X, ldx, p, Y, ldy);
}

void rows_dot_bf16(const uint16_t* A, int64_t lda, int64_t i0, int64_t i1, int64_t D, const float* X,
                   int64_t ldx, int64_t p, float* Y, int64_t ldy) {
  rows_dot_any<LoadBF16>(A, lda, i0, i1, D, X, ldx, p, Y, ldy);
}

// ---- float32 rows, float64 arithmetic: the pursuits' k-sized side ----------------------------
// The selected rows of a float32 (or bf16/fp16) pool are exact in float32, and a product of two
// float32 numbers is exact in float64, so keeping those rows in float32 and accumulating in
// float64 gives the float64 results (up to the summation order) from half the bytes.
constexpr int kLanesD = GTP_VEC_BYTES / 8;
typedef double VecD __attribute__((vector_size(GTP_VEC_BYTES)));
typedef float VecH __attribute__((vector_size(GTP_VEC_BYTES / 2)));  // kLanesD floats

static inline VecD load_widen(const float* p) {
  VecH h;
  __builtin_memcpy(&h, p, sizeof(VecH));
  return __builtin_convertvector(h, VecD);
}

static inline VecD load_d(const double* p) {
  VecD v;
  __builtin_memcpy(&v, p, sizeof(VecD));
  return v;
}

static inline void store_d(double* p, VecD v) { __builtin_memcpy(p, &v, sizeof(VecD)); }

template <int R>
static inline __attribute__((always_inline)) void gram_tile(const float* M, int64_t ldm, int64_t D,
                                                            const double* x, double* y) {
  VecD acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = VecD{};
  int64_t d = 0;
  for (; d + 2 * kLanesD <= D; d += 2 * kLanesD) {
    const VecD x0 = load_d(x + d), x1 = load_d(x + d + kLanesD);
    for (int r = 0; r < R; ++r) {
      acc[r][0] += load_widen(M + r * ldm + d) * x0;
      acc[r][1] += load_widen(M + r * ldm + d + kLanesD) * x1;
    }
  }
  for (int r = 0; r < R; ++r) {
    const VecD v = acc[r][0] + acc[r][1];
    double s = 0.0;
    for (int j = 0; j < kLanesD; ++j) s += v[j];
    for (int64_t q = d; q < D; ++q) s += double(M[r * ldm + q]) * x[q];
    y[r] = s;
  }
}

// y[i] = sum_d M[i, d] * x[d] in float64, rows [i0, i1) of float32 M.
void rows_dot_f64(const float* M, int64_t ldm, int64_t i0, int64_t i1, int64_t D, const double* x,
                  double* y) {
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) gram_tile<4>(M + i * ldm, ldm, D, x, y + i);
  for (; i < i1; ++i) gram_tile<1>(M + i * ldm, ldm, D, x, y + i);
}

// r[d] = b[d] - sum_i w[i] M[i, d] in float64, columns [d0, d1) of float32 M (n rows): the
// rows stream through once per column range while its slice of r stays in L1.
void rows_combine_f64(const float* M, int64_t ldm, int64_t n, int64_t d0, int64_t d1, const double* w,
                      const double* b, double* r) {
  constexpr int64_t kBlock = 512;  // 4 KB of r per range: L1 resident
  for (int64_t c0 = d0; c0 < d1; c0 += kBlock) {
    const int64_t c1 = std::min(d1, c0 + kBlock);
    for (int64_t d = c0; d < c1; ++d) r[d] = b[d];
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {  // four rows per sweep of r: a quarter of the loads/stores of r
      const double w0 = w[i], w1 = w[i + 1], w2 = w[i + 2], w3 = w[i + 3];
      const float* m0 = M + i * ldm;
      const float* m1 = m0 + ldm;
      const float* m2 = m1 + ldm;
      const float* m3 = m2 + ldm;
      int64_t d = c0;
      for (; d + kLanesD <= c1; d += kLanesD) {
        VecD acc = load_d(r + d);
        acc -= w0 * load_widen(m0 + d);
        acc -= w1 * load_widen(m1 + d);
        acc -= w2 * load_widen(m2 + d);
        acc -= w3 * load_widen(m3 + d);
        store_d(r + d, acc);
      }
      for (; d < c1; ++d)
        r[d] -= w0 * double(m0[d]) + w1 * double(m1[d]) + w2 * double(m2[d]) + w3 * double(m3[d]);
    }
    for (; i < n; ++i) {
      const double wi = w[i];
      const float* mi = M + i * ldm;
      int64_t d = c0;
      for (; d + kLanesD <= c1; d += kLanesD) store_d(r + d, load_d(r + d) - wi * load_widen(mi + d));
      for (; d < c1; ++d) r[d] -= wi * double(mi[d]);
    }
  }
}

}  // namespace GTP_ISA
