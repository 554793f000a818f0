// Incremental non-negative least-squares update for a batch of pursuits (K3), free of torch.
//
// One pursuit t keeps the lower Cholesky factor L of G_S + lam*I (G_S: Gram matrix of the selected
// atoms, in factor order), the support S, the right-hand side A_S b, and the weights w_S.
// update_pursuit() appends one atom and re-solves:
//
//   append   y = L^{-1} g,  pivot^2 = (G_jj + lam) - ||y||^2 (the new diagonal of the factor, squared).
//            The atom is numerically in the span of the support -> kDependent, nothing changes, when
//            pivot^2 <= dep_tol * (G_jj + lam) (sin^2 of its angle to the span below dep_tol), or
//            pivot^2 <= eps * s^2 with s = sum_i |c_i| ||L_i||, c = L^{-T} y its coefficients on the
//            support and ||L_i|| = sqrt(G_ii + lam) the row norms: the rounding error of pivot^2, which
//            the Gram matrix's squared conditioning makes far larger than eps * G_jj when the support is
//            ill-conditioned (an exactly dependent atom then scores pivot^2 / G_jj ~ 1e-10, not ~1e-16);
//            or when it is not finite. Else L gets the row [y^T, pivot].
//   solve    u = L^{-1} rhs (kept up to date through appends and removals), z = L^{-T} u.
//            positive = false: w = z.
//            positive = true:  Lawson-Hanson inner loop warm-started from the previous weights with
//            the new atom at 0: if all z_i > 0 accept w = z; else alpha = min over {z_i <= 0} of
//            w_i / (w_i - z_i), w += alpha (z - w), remove every atom with w_i <= 0 (the arg-min one
//            always), repeat. An accepted w whose atoms include negligible ones, z_i ||L_i|| <=
//            weight_tol * ||u|| (the atom's share of the fit ||A_S^T w|| = ||u|| is within rounding of
//            zero), removes them as if their weight were 0, and repeats. Removing row/column p of the factor is a rank-one update of the
//            trailing block, done by Givens rotations on the columns of L with row p deleted; the
//            same rotations carry u along (L_{-p} Q = [L' 0], so u' = (Q^T u)[:n-1]).
//
// The code is written once for a "team" of cooperating threads: SerialTeam (one CPU thread, used by
// the C++ CPU op) and BlockTeam (one CUDA thread block, lsq_update.cuh). Team members run the same
// control flow; rank()/size() split loops, sync() is a barrier, sum/argmin/max_index are all-reduces,
// lower_solve/upper_t_solve are the team's triangular solves.
//
// Invariant kept outside [:size, :size]: L is zero (and zero above the diagonal), support is -1,
// rhs and weights are 0. A rejected or inactive update leaves the state bit-for-bit unchanged.
#pragma once

#include <cmath>
#include <cstdint>

// Under nvcc the shared code is only ever instantiated for the device (the CPU op is built by the host
// compiler from lsq_update_cpu.cpp), hence __device__ rather than __host__ __device__.
#if defined(__CUDACC__)
#define GTP_HD __device__ inline
#else
#define GTP_HD inline
#endif

namespace gtp {

// Status bit flags (mirrored in gtp_kernels/ops/lsq.py).
enum LsqStatus : int32_t {
  kAppended = 1,     // the pivot test passed: new atom appended to the factor
  kDependent = 2,    // new atom rejected as numerically dependent; state unchanged
  kDropped = 4,      // the NNLS step removed >= 1 atom (Cholesky downdate in the same call)
  kNewDropped = 8,   // the removed atoms include the new one
  kInactive = 16,    // new_atom < 0: nothing done
  kFull = 32,        // size == k_max: no room for another atom, nothing done
  kBadSize = 64,     // size outside [0, k_max]: a corrupt state, nothing done (no write past L)
};

// Raw views of the batched state and inputs; every array is contiguous.
template <typename T, typename SizeT>
struct LsqArgs {
  T* L;                   // (m, k_max, k_max)
  SizeT* size;            // (m,)
  int64_t* support;       // (m, k_max)
  T* rhs;                 // (m, k_max)
  T* weights;             // (m, k_max)
  const int64_t* new_atom;  // (m,)
  const T* gram_col;      // (m, k_max)
  const T* gram_diag;     // (m,)
  const T* rhs_new;       // (m,)
  int32_t* status;        // (m,) output
  T* work;                // (m, 3 * k_max) scratch: u = L^{-1} rhs, z, and the factor's row norms
  int64_t m;
  int64_t k_max;
  T lam;
  T dep_tol;
  T weight_tol;           // positive only: drop atoms with z_i ||L_i|| <= weight_tol ||u|| (0: off)
  bool positive;
};

// Machine epsilon, usable in device code without relaxed constexpr.
template <typename T>
struct Eps;
template <>
struct Eps<float> {
  static constexpr float value = 1.1920928955078125e-7f;
};
template <>
struct Eps<double> {
  static constexpr double value = 2.220446049250313e-16;
};

// ---------------------------------------------------------------------------------------------
// sum_q a[q] * b[q], defined in cpu_vector.cpp (vectorised there for the CPU at hand).
float cpu_dot(const float* a, const float* b, int64_t n);
double cpu_dot(const double* a, const double* b, int64_t n);
// y[q] += alpha * x[q] for q < n, likewise.
void cpu_axpy(float alpha, const float* x, float* y, int64_t n);
void cpu_axpy(double alpha, const double* x, double* y, int64_t n);

// One CPU thread as a team of one.
template <typename T>
struct SerialTeam {
  GTP_HD int rank() const { return 0; }
  GTP_HD int size() const { return 1; }
  GTP_HD void sync() {}
  GTP_HD T sum(T v) { return v; }
  GTP_HD void argmin(T&, int64_t&) {}
  GTP_HD int64_t max_index(int64_t i) { return i; }

  // In place: x0 <- L[:n,:n]^{-1} x0 (and x1 likewise when not null). Row-oriented: rows of L are
  // contiguous, so each step is a dot product (cpu_dot, vectorised).
  void lower_solve(const T* L, int64_t ld, int64_t n, T* x0, T* x1) {
    for (int64_t i = 0; i < n; ++i) {
      const T* row = L + i * ld;
      if (x1) {
        T a0 = dot4(row, x0, i), a1 = dot4(row, x1, i);
        x0[i] = (x0[i] - a0) / row[i];
        x1[i] = (x1[i] - a1) / row[i];
      } else {
        x0[i] = (x0[i] - dot4(row, x0, i)) / row[i];
      }
    }
  }

  static T dot4(const T* a, const T* b, int64_t n) { return cpu_dot(a, b, n); }

  // out[i] = ||L[i, :i+1]|| for i < n.
  void row_norms(const T* L, int64_t ld, int64_t n, T* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = std::sqrt(cpu_dot(L + i * ld, L + i * ld, i + 1));
  }

  // In place: x <- L[:n,:n]^{-T} x. Column-oriented on L^T, i.e. it walks rows of L.
  void upper_t_solve(const T* L, int64_t ld, int64_t n, T* x) {
    for (int64_t i = n - 1; i >= 0; --i) {
      const T* row = L + i * ld;
      const T xi = x[i] / row[i];
      x[i] = xi;
      cpu_axpy(-xi, row, x, i);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Removes position p (0 <= p < n) from the factor and from u, rhs, weights, support; n -> n - 1.
// The team must be synchronised on entry; it is on exit.
template <class Team, typename T>
GTP_HD void remove_position(Team& team, T* L, int64_t ld, int64_t n, int64_t p, T* u, T* rhs,
                            T* w, int64_t* support, T* norms) {
  const int rank = team.rank();
  const int nthreads = team.size();
  // New row c (p <= c < n-1) is old row c+1 after the column rotations c' < c. Rotation c mixes
  // columns c and c+1 so that new row c's entry in column c+1 vanishes; its diagonal becomes r.
  for (int64_t c = p; c < n - 1; ++c) {
    const T x = L[(c + 1) * ld + c];      // updated by rotation c-1 (or original when c == p)
    const T y = L[(c + 1) * ld + c + 1];  // old diagonal, not touched by earlier rotations
    const T r = sqrt(x * x + y * y);
    const T cs = r > T(0) ? x / r : T(1);
    const T sn = r > T(0) ? y / r : T(0);
    team.sync();  // everyone has read x, y before row c+1's memory is rewritten below
    for (int64_t i = c + 2 + rank; i < n; i += nthreads) {
      T* row = L + i * ld;
      const T a = row[c];
      const T b = row[c + 1];
      row[c] = cs * a + sn * b;
      row[c + 1] = -sn * a + cs * b;
    }
    // Move old row c+1 (columns < c, untouched by this rotation) into row c.
    for (int64_t q = rank; q < c; q += nthreads) L[c * ld + q] = L[(c + 1) * ld + q];
    if (rank == 0) {
      L[c * ld + c] = r;
      const T a = u[c];
      const T b = u[c + 1];
      u[c] = cs * a + sn * b;
      u[c + 1] = -sn * a + cs * b;
    }
    team.sync();
  }
  // The last row of the old factor has been moved up (or was row p itself): clear it.
  for (int64_t q = rank; q < n; q += nthreads) L[(n - 1) * ld + q] = T(0);
  // Shift the per-atom arrays down over p, one team-wide chunk at a time.
  for (int64_t base = p; base < n - 1; base += nthreads) {
    const int64_t i = base + rank;
    const bool active = i < n - 1;
    T rhs_v = T(0), w_v = T(0), n_v = T(0);
    int64_t s_v = -1;
    if (active) {
      rhs_v = rhs[i + 1];
      w_v = w[i + 1];
      s_v = support[i + 1];
      n_v = norms[i + 1];  // a row's norm is sqrt(G_ii + lam): the rotations keep it
    }
    team.sync();
    if (active) {
      rhs[i] = rhs_v;
      w[i] = w_v;
      support[i] = s_v;
      norms[i] = n_v;
    }
    team.sync();
  }
  if (rank == 0) {
    rhs[n - 1] = T(0);
    w[n - 1] = T(0);
    support[n - 1] = -1;
    u[n - 1] = T(0);
  }
  team.sync();
}

// The whole update for pursuit t. Every member of the team calls it.
template <class Team, typename T, typename SizeT>
GTP_HD void update_pursuit(Team& team, const LsqArgs<T, SizeT>& a, int64_t t) {
  const int rank = team.rank();
  const int nthreads = team.size();
  const int64_t K = a.k_max;
  const int64_t atom = a.new_atom[t];
  if (atom < 0) {
    if (rank == 0) a.status[t] = kInactive;
    return;
  }
  int64_t n = static_cast<int64_t>(a.size[t]);
  if (n < 0 || n > K) {
    if (rank == 0) a.status[t] = kBadSize;
    return;
  }
  if (n == K) {
    if (rank == 0) a.status[t] = kFull;
    return;
  }
  T* L = a.L + t * K * K;
  int64_t* support = a.support + t * K;
  T* rhs = a.rhs + t * K;
  T* w = a.weights + t * K;
  T* u = a.work + t * 3 * K;
  T* z = u + K;
  T* norms = z + K;
  const T* g = a.gram_col + t * K;
  T* row_n = L + n * K;

  // Append: y = L^{-1} g solved in place in row n, together with u = L^{-1} rhs.
  for (int64_t i = rank; i < n; i += nthreads) {
    row_n[i] = g[i];
    u[i] = rhs[i];
  }
  team.sync();
  team.lower_solve(L, K, n, row_n, u);
  team.row_norms(L, K, n, norms);
  T yy = T(0), uy = T(0);
  for (int64_t i = rank; i < n; i += nthreads) {
    yy += row_n[i] * row_n[i];
    uy += row_n[i] * u[i];
    z[i] = row_n[i];
  }
  yy = team.sum(yy);
  uy = team.sum(uy);  // the sums end with a barrier: z is complete
  // c = L^{-T} y, the atom's coefficients on the support; s = sum |c_i| ||L_i||
  team.upper_t_solve(L, K, n, z);
  T s = T(0);
  for (int64_t i = rank; i < n; i += nthreads) s += fabs(z[i]) * norms[i];
  s = team.sum(s);
  const T diag = a.gram_diag[t] + a.lam;
  const T pivot2 = diag - yy;
  if (!(diag > T(0)) || !(pivot2 > a.dep_tol * diag) || !(pivot2 > Eps<T>::value * s * s) ||
      !(pivot2 < T(INFINITY))) {
    team.sync();
    for (int64_t i = rank; i < n; i += nthreads) row_n[i] = T(0);
    if (rank == 0) a.status[t] = kDependent;
    return;
  }
  const T pivot = sqrt(pivot2);
  if (rank == 0) {
    row_n[n] = pivot;
    support[n] = atom;
    rhs[n] = a.rhs_new[t];
    w[n] = T(0);
    u[n] = (a.rhs_new[t] - uy) / pivot;
    norms[n] = sqrt(diag);
  }
  int32_t status = kAppended;
  int64_t new_pos = n;
  n += 1;
  team.sync();

  for (;;) {
    // z = L^{-T} u: the least-squares solution on the current support.
    for (int64_t i = rank; i < n; i += nthreads) z[i] = u[i];
    team.sync();
    team.upper_t_solve(L, K, n, z);
    if (!a.positive) {
      for (int64_t i = rank; i < n; i += nthreads) w[i] = z[i];
      break;
    }
    // Step length to the first weight that z would push to zero or below.
    T alpha = T(INFINITY);
    int64_t blocking = INT64_MAX;
    for (int64_t i = rank; i < n; i += nthreads) {
      const T zi = z[i];
      if (zi <= T(0)) {
        const T wi = w[i];
        const T ai = wi > T(0) ? wi / (wi - zi) : T(0);
        if (ai < alpha || (ai == alpha && i < blocking)) {
          alpha = ai;
          blocking = i;
        }
      }
    }
    team.argmin(alpha, blocking);
    if (blocking == INT64_MAX) {
      // Every z_i > 0: accept w = z, except atoms whose share of the fit is within rounding of 0.
      if (!(a.weight_tol > T(0))) {
        for (int64_t i = rank; i < n; i += nthreads) w[i] = z[i];
        break;
      }
      T uu = T(0);
      for (int64_t i = rank; i < n; i += nthreads) uu += u[i] * u[i];
      const T floor = a.weight_tol * sqrt(team.sum(uu));
      int64_t last = -1;
      for (int64_t i = rank; i < n; i += nthreads) {
        const bool negligible = z[i] * norms[i] <= floor;
        w[i] = negligible ? T(0) : z[i];
        if (negligible) last = i;
      }
      if (team.max_index(last) < 0) break;
    } else {
      for (int64_t i = rank; i < n; i += nthreads) {
        w[i] = i == blocking ? T(0) : w[i] + alpha * (z[i] - w[i]);
      }
    }
    team.sync();
    // Remove every atom at or below zero, highest position first so lower positions stay valid.
    for (;;) {
      int64_t p = -1;
      for (int64_t i = rank; i < n; i += nthreads) {
        if (!(w[i] > T(0))) p = i > p ? i : p;
      }
      p = team.max_index(p);
      if (p < 0) break;
      remove_position(team, L, K, n, p, u, rhs, w, support, norms);
      status |= kDropped;
      if (p == new_pos) {
        status |= kNewDropped;
        new_pos = -1;
      } else if (p < new_pos) {
        new_pos -= 1;
      }
      n -= 1;
    }
  }
  team.sync();
  if (rank == 0) {
    a.size[t] = static_cast<SizeT>(n);
    a.status[t] = status;
  }
}

}  // namespace gtp
