// Runs the CUDA kernel of csrc/lsq_update.cuh under cuda_emulation.h and compares every update with
// the CPU twin (gtp::SerialTeam) on the same state. Built and run by tests/test_ops_lsq.py.
// Exit status 0 and "ALL OK" when every scenario matches.
#include "cuda_emulation.h"
#include "lsq_update.cuh"

#include <cmath>
#include <cstdio>
#include <random>
#include <string>

using gtp::LsqArgs;

struct Atoms {
  int64_t N, D;
  std::vector<double> A;  // N x D
  double dot(int64_t i, const double* v) const {
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += A[i * D + d] * v[d];
    return s;
  }
};

Atoms random_atoms(int64_t N, int64_t D, unsigned seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(static_cast<double>(D)));
  Atoms a{N, D, std::vector<double>(N * D)};
  for (auto& x : a.A) x = nd(gen);
  return a;
}

template <typename T>
struct Batch {
  int64_t m, K;
  std::vector<T> L, rhs, w, gcol, gdiag, rnew, work;
  std::vector<int64_t> size, support, atom;
  std::vector<int32_t> status;
  Batch(int64_t m_, int64_t K_)
      : m(m_), K(K_), L(m_ * K_ * K_, T(0)), rhs(m_ * K_, T(0)), w(m_ * K_, T(0)), gcol(m_ * K_),
        gdiag(m_), rnew(m_), work(m_ * 3 * K_, T(NAN)), size(m_, 0), support(m_ * K_, -1),
        atom(m_, -1), status(m_, -99) {}

  LsqArgs<T, int64_t> args(double lam, bool positive, double dep_tol) {
    LsqArgs<T, int64_t> a;
    a.L = L.data(); a.size = size.data(); a.support = support.data(); a.rhs = rhs.data();
    a.weights = w.data(); a.new_atom = atom.data(); a.gram_col = gcol.data();
    a.gram_diag = gdiag.data(); a.rhs_new = rnew.data(); a.status = status.data();
    a.work = work.data(); a.m = m; a.k_max = K; a.lam = T(lam); a.dep_tol = T(dep_tol); a.weight_tol = T(positive ? 1e-6 : 0.0);  // exercises the negligible-weight drop
    a.positive = positive;
    return a;
  }

  void set_inputs(const Atoms& A, const std::vector<double>& B, const std::vector<int64_t>& atoms) {
    for (int64_t t = 0; t < m; ++t) {
      atom[t] = atoms[t];
      for (int64_t p = 0; p < K; ++p) gcol[t * K + p] = T(NAN);  // beyond size: must be ignored
      if (atoms[t] < 0) continue;
      const double* aj = &A.A[atoms[t] * A.D];
      for (int64_t p = 0; p < size[t]; ++p) gcol[t * K + p] = T(A.dot(support[t * K + p], aj));
      gdiag[t] = T(A.dot(atoms[t], aj));
      rnew[t] = T(A.dot(atoms[t], &B[t * A.D]));
    }
  }
};

template <typename T>
void step_cpu(Batch<T>& b, double lam, bool positive, double tol) {
  auto a = b.args(lam, positive, tol);
  gtp::SerialTeam<T> team;
  for (int64_t t = 0; t < b.m; ++t) gtp::update_pursuit(team, a, t);
}

template <typename T>
void step_emu(Batch<T>& b, double lam, bool positive, double tol) {
  emu_launch(static_cast<int>(b.m), gtp::kLsqThreads, gtp::lsq_update_kernel<T, int64_t>,
             b.args(lam, positive, tol));
}

int failures = 0;

template <typename T>
void compare(const char* name, const Batch<T>& c, const Batch<T>& e, double tol, int32_t want0) {
  std::string why;
  if (c.status != e.status) why += " status";
  if (c.size != e.size) why += " size";
  if (c.support != e.support) why += " support";
  if (want0 >= 0 && e.status[0] != want0) why += " status[0]=" + std::to_string(e.status[0]);
  auto close = [&](const std::vector<T>& x, const std::vector<T>& y, const char* what) {
    double scale = 1e-30, diff = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      scale = std::fmax(scale, std::fabs(double(x[i])));
      diff = std::fmax(diff, std::fabs(double(x[i]) - double(y[i])));
      if (std::isnan(double(x[i])) != std::isnan(double(y[i]))) diff = INFINITY;
    }
    if (!(diff <= tol * scale)) why += std::string(" ") + what + "(" + std::to_string(diff / scale) + ")";
  };
  close(c.L, e.L, "L");
  close(c.w, e.w, "weights");
  close(c.rhs, e.rhs, "rhs");
  std::printf("%s %s: status", why.empty() ? "OK  " : "FAIL", name);
  for (auto s : e.status) std::printf(" %d", s);
  std::printf(" size");
  for (auto s : e.size) std::printf(" %ld", static_cast<long>(s));
  std::printf("%s\n", why.c_str());
  if (!why.empty()) ++failures;
}

// m = 3: 150 atoms (five 32-row tiles, so the unrolled GEMV loops run), empty, 20 atoms.
template <typename T>
void scenario_batch(const char* name, double tol, size_t nnls_steps) {
  const int64_t K = 160, D = 400;
  Atoms A = random_atoms(200, D, 1);
  Atoms Bt = random_atoms(3, D, 2);
  for (int64_t d = 0; d < D; ++d) A.A[199 * D + d] = A.A[3 * D + d];  // duplicate of atom 3
  Batch<T> b(3, K);
  const int64_t lengths[3] = {150, 0, 20};
  for (int64_t s = 0; s < 150; ++s) {
    std::vector<int64_t> atoms(3);
    for (int t = 0; t < 3; ++t) atoms[t] = s < lengths[t] ? s : -1;
    b.set_inputs(A, Bt.A, atoms);
    step_cpu(b, 0.0, false, 0.0);
  }
  // Plain least squares first (no drops: all 150 atoms stay, the long solves run), then NNLS steps.
  {
    Batch<T> c = b, e = b;
    const std::vector<int64_t> atoms = {151, 152, 153};
    c.set_inputs(A, Bt.A, atoms);
    e.set_inputs(A, Bt.A, atoms);
    step_cpu(c, 0.0, false, 0.0);
    step_emu(e, 0.0, false, 0.0);
    compare((std::string(name) + " least squares").c_str(), c, e, tol, gtp::kAppended);
  }
  const double dep = sizeof(T) == 8 ? 1e-10 : 1e-5;
  // Two emulated steps from the same state as the CPU twin: NNLS append, then duplicates (dependent).
  std::vector<std::vector<int64_t>> steps = {{155, 160, -1}, {-2, 161, 199}, {170, -1, 171}};
  Batch<T> c = b, e = b;
  for (size_t i = 0; i < nnls_steps; ++i) {
    if (steps[i][0] == -2) steps[i][0] = c.support[0];  // re-offer a selected atom: a duplicate
    c.set_inputs(A, Bt.A, steps[i]);
    e.set_inputs(A, Bt.A, steps[i]);
    step_cpu(c, 0.0, true, dep);
    step_emu(e, 0.0, true, dep);
    compare((std::string(name) + " step " + std::to_string(i)).c_str(), c, e, tol,
            i == 1 ? int32_t(gtp::kDependent) : -1);
    e = c;  // continue both from the CPU state so differences do not compound
  }
}

// Atoms 0 and 5 of a 40-atom support must leave when j = a_0 + a_5 + e arrives (see the pytest of
// the same name): a deep downdate, rows 1..39 rotated.
template <typename T>
void scenario_deep_drop(const char* name, double tol) {
  const int64_t n = 40, D = 160, K = 48;
  Atoms A = random_atoms(n + 1, D, 3);
  std::vector<double> e(D);
  std::mt19937_64 gen(4);
  std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(double(D)));
  for (auto& x : e) x = nd(gen);
  // Make e orthogonal to span(a_0..a_{n-1}): Gram-Schmidt basis, twice for accuracy.
  std::vector<double> Q(A.A.begin(), A.A.begin() + n * D);
  for (int64_t i = 0; i < n; ++i) {
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t j = 0; j < i; ++j) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += Q[i * D + d] * Q[j * D + d];
        for (int64_t d = 0; d < D; ++d) Q[i * D + d] -= s * Q[j * D + d];
      }
    double nrm = 0;
    for (int64_t d = 0; d < D; ++d) nrm += Q[i * D + d] * Q[i * D + d];
    for (int64_t d = 0; d < D; ++d) Q[i * D + d] /= std::sqrt(nrm);
  }
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t d = 0; d < D; ++d) s += e[d] * Q[j * D + d];
      for (int64_t d = 0; d < D; ++d) e[d] -= s * Q[j * D + d];
    }
  std::vector<double> B(D, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const double wi = (i == 0 || i == 5) ? 0.05 : 0.5 + 0.01 * i;
    for (int64_t d = 0; d < D; ++d) B[d] += wi * A.A[i * D + d];
  }
  for (int64_t d = 0; d < D; ++d) {
    B[d] += 0.5 * e[d];
    A.A[n * D + d] = A.A[d] + A.A[5 * D + d] + e[d];
  }
  Batch<T> b(1, K);
  for (int64_t s = 0; s < n; ++s) {
    b.set_inputs(A, B, {s});
    step_cpu(b, 0.0, false, 0.0);
  }
  Batch<T> c = b, e2 = b;
  const double dep = sizeof(T) == 8 ? 1e-10 : 1e-5;
  c.set_inputs(A, B, {n});
  e2.set_inputs(A, B, {n});
  step_cpu(c, 0.0, true, dep);
  step_emu(e2, 0.0, true, dep);
  compare(name, c, e2, tol, gtp::kAppended | gtp::kDropped);
}

// Random atoms and targets with a ridge: NNLS steps that drop old and new atoms, three emulated calls.
template <typename T>
void scenario_random_drops(const char* name, double tol) {
  const int64_t K = 40, D = 90, m = 2;
  Atoms A = random_atoms(60, D, 5);
  Atoms Bt = random_atoms(m, D, 6);
  Batch<T> c(m, K);
  const double dep = sizeof(T) == 8 ? 1e-10 : 1e-5;
  int32_t seen = 0;
  for (int64_t s = 0; s < 36; ++s) {
    std::vector<int64_t> atoms = {(7 * s) % 60, (11 * s + 3) % 60};
    Batch<T> e = c;
    c.set_inputs(A, Bt.A, atoms);
    e.set_inputs(A, Bt.A, atoms);
    step_cpu(c, 0.01, true, dep);
    if (s >= 33) {
      step_emu(e, 0.01, true, dep);
      compare((std::string(name) + " step " + std::to_string(s)).c_str(), c, e, tol, -1);
    }
    for (auto st : c.status) seen |= st;
  }
  if (!(seen & gtp::kDropped)) {
    std::printf("FAIL %s: no drop exercised\n", name);
    ++failures;
  }
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "quick") {  // for the costly 512-thread emulation
    scenario_batch<double>("batch f64", 1e-12, 1);
    scenario_deep_drop<double>("deep drop f64", 1e-12);
    std::printf(failures ? "FAILURES: %d\n" : "ALL OK\n", failures);
    return failures ? 1 : 0;
  }
  scenario_batch<double>("batch f64", 1e-12, 3);
  scenario_batch<float>("batch f32", 1e-4, 1);
  scenario_deep_drop<double>("deep drop f64", 1e-12);
  scenario_deep_drop<float>("deep drop f32", 1e-4);
  scenario_random_drops<double>("random drops f64", 1e-12);
  std::printf(failures ? "FAILURES: %d\n" : "ALL OK\n", failures);
  return failures ? 1 : 0;
}
