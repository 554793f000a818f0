// Thin torch binding of the K3 least-squares update: checks, raw pointers, dispatch by device and
// dtype. The math lives in lsq_update_core.h; the CUDA launch in lsq_update.cu (built only when
// GTP_WITH_CUDA is defined, i.e. by setup.py's CUDAExtension).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(GTP_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "cpu_rows_dot.h"
#include "lsq_update.h"

namespace {

// Multiply-adds per parallel chunk of the CPU row products (see rows_dot).
constexpr int64_t kParallelGrainMacs = int64_t(1) << 20;

template <typename T, typename SizeT>
gtp::LsqArgs<T, SizeT> make_args(torch::Tensor& L, torch::Tensor& size, torch::Tensor& support,
                                 torch::Tensor& rhs, torch::Tensor& weights,
                                 const torch::Tensor& new_atom, const torch::Tensor& gram_col,
                                 const torch::Tensor& gram_diag, const torch::Tensor& rhs_new,
                                 torch::Tensor& status, torch::Tensor& work, double lam,
                                 bool positive, double dep_tol, double weight_tol) {
  gtp::LsqArgs<T, SizeT> a;
  a.L = L.data_ptr<T>();
  a.size = size.data_ptr<SizeT>();
  a.support = support.data_ptr<int64_t>();
  a.rhs = rhs.data_ptr<T>();
  a.weights = weights.data_ptr<T>();
  a.new_atom = new_atom.data_ptr<int64_t>();
  a.gram_col = gram_col.data_ptr<T>();
  a.gram_diag = gram_diag.data_ptr<T>();
  a.rhs_new = rhs_new.data_ptr<T>();
  a.status = status.data_ptr<int32_t>();
  a.work = work.data_ptr<T>();
  a.m = L.size(0);
  a.k_max = L.size(1);
  a.lam = static_cast<T>(lam);
  a.dep_tol = static_cast<T>(dep_tol);
  a.weight_tol = static_cast<T>(weight_tol);
  a.positive = positive;
  return a;
}

template <typename T, typename SizeT>
void run(const gtp::LsqArgs<T, SizeT>& a, const torch::Device& device) {
  if (device.is_cpu()) {
    const int64_t work_per_pursuit = a.k_max * a.k_max + 1;
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / work_per_pursuit);
    at::parallel_for(0, a.m, grain, [&](int64_t begin, int64_t end) {
      gtp::lsq_update_cpu<T, SizeT>(a, begin, end);
    });
    return;
  }
#if defined(GTP_WITH_CUDA)
  const c10::cuda::CUDAGuard guard(device);
  void* stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int err = gtp::lsq_update_cuda<T, SizeT>(a, stream);
  TORCH_CHECK(err == 0, "gtp_kernels lsq_update: CUDA launch failed with error ", err);
#else
  TORCH_CHECK(false, "gtp_kernels._C was built without CUDA; lsq_update got tensors on ", device);
#endif
}

torch::Tensor lsq_update(torch::Tensor L, torch::Tensor size, torch::Tensor support,
                         torch::Tensor rhs, torch::Tensor weights, torch::Tensor new_atom,
                         torch::Tensor gram_col, torch::Tensor gram_diag, torch::Tensor rhs_new,
                         double lam, bool positive, double dep_tol, double weight_tol) {
  // gtp_kernels/ops/lsq.py validates with readable errors first; these guard direct calls.
  TORCH_CHECK(L.dim() == 3 && L.size(1) == L.size(2), "L must be (m, k_max, k_max)");
  const int64_t m = L.size(0), k = L.size(1);
  const auto dev = L.device();
  const auto dt = L.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kFloat64, "L must be float32 or float64");
  auto check = [&](const torch::Tensor& x, const char* name, at::IntArrayRef shape,
                   c10::optional<torch::ScalarType> want) {
    TORCH_CHECK(x.device() == dev, name, " must be on ", dev);
    TORCH_CHECK(x.sizes() == shape, name, " has shape ", x.sizes(), ", expected ", shape);
    TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
    if (want) TORCH_CHECK(x.scalar_type() == *want, name, " has dtype ", x.scalar_type());
  };
  check(L, "L", {m, k, k}, dt);
  check(size, "size", {m}, c10::nullopt);
  TORCH_CHECK(size.scalar_type() == torch::kInt32 || size.scalar_type() == torch::kInt64,
              "size must be int32 or int64");
  check(support, "support", {m, k}, torch::kInt64);
  check(rhs, "rhs", {m, k}, dt);
  check(weights, "weights", {m, k}, dt);
  check(new_atom, "new_atom", {m}, torch::kInt64);
  check(gram_col, "gram_col", {m, k}, dt);
  check(gram_diag, "gram_diag", {m}, dt);
  check(rhs_new, "rhs_new", {m}, dt);

  auto status = torch::empty({m}, torch::dtype(torch::kInt32).device(dev));
  auto work = torch::empty({m, 3 * k}, L.options());
  if (m == 0) return status;
  AT_DISPATCH_FLOATING_TYPES(dt, "gtp_lsq_update", [&] {
    if (size.scalar_type() == torch::kInt32) {
      run(make_args<scalar_t, int32_t>(L, size, support, rhs, weights, new_atom, gram_col,
                                       gram_diag, rhs_new, status, work, lam, positive, dep_tol, weight_tol),
          dev);
    } else {
      run(make_args<scalar_t, int64_t>(L, size, support, rhs, weights, new_atom, gram_col,
                                       gram_diag, rhs_new, status, work, lam, positive, dep_tol, weight_tol),
          dev);
    }
  });
  return status;
}

torch::Tensor rows_dot(const torch::Tensor& A, const torch::Tensor& X, c10::optional<torch::Tensor> out,
                       const std::string& isa) {
  const gtp::CpuKernels* kernels = gtp::cpu_kernels(isa.c_str());
  TORCH_CHECK(kernels != nullptr, "rows_dot: instruction set '", isa, "' is not available on this CPU/build");
  // gtp_kernels/ops/products.py validates with readable errors first; these guard direct calls.
  TORCH_CHECK(A.device().is_cpu() && X.device().is_cpu(), "rows_dot takes CPU tensors");
  const auto a_type = A.scalar_type();
  TORCH_CHECK((a_type == torch::kFloat32 || a_type == torch::kFloat16 || a_type == torch::kBFloat16) &&
                  X.scalar_type() == torch::kFloat32,
              "rows_dot takes float32, float16 or bfloat16 A and float32 X, got ", a_type, " and ",
              X.scalar_type());
  TORCH_CHECK(A.dim() == 2 && X.dim() == 2 && A.size(1) == X.size(1),
              "rows_dot: A (n, D) and X (p, D), got ", A.sizes(), " and ", X.sizes());
  TORCH_CHECK(A.size(1) <= 1 || A.stride(1) == 1, "rows_dot: A must have unit stride along D");
  TORCH_CHECK(X.size(1) <= 1 || X.stride(1) == 1, "rows_dot: X must have unit stride along D");
  const int64_t n = A.size(0), D = A.size(1), p = X.size(0);
  torch::Tensor Y;
  if (out.has_value()) {
    Y = *out;
    TORCH_CHECK(Y.device().is_cpu() && Y.scalar_type() == torch::kFloat32 && Y.dim() == 2 &&
                    Y.size(0) == n && Y.size(1) == p && Y.is_contiguous(),
                "rows_dot: out must be a contiguous float32 CPU tensor of shape (", n, ", ", p, ")");
  } else {
    Y = torch::empty({n, p}, X.options());
  }
  if (n == 0 || p == 0) return Y;
  if (D == 0) return Y.zero_();
  const float* x = X.data_ptr<float>();
  float* y = Y.data_ptr<float>();
  const int64_t lda = A.stride(0), ldx = X.stride(0);
  // a chunk of at least ~1M multiply-adds (~0.2 ms) per thread, so small products stay on the calling
  // thread: waking OpenMP workers costs more than they save below that, and on a shared machine a
  // parallel region waits for a descheduled worker (2000 x 256 rows: 0.09 ms on one thread, ~30 ms
  // as 8 chunks on 2 busy cores; float32 pools ran 3x slower than float64 ones, whose torch GEMV
  // stays on one thread)
  const int64_t grain = std::max<int64_t>(16, kParallelGrainMacs / std::max<int64_t>(1, D * p));
  if (a_type == torch::kFloat32) {
    const float* a = A.data_ptr<float>();
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      kernels->rows_dot(a, lda, begin, end, D, x, ldx, p, y, p);
    });
  } else {  // fp16 / bf16: the kernel reads the raw 16-bit patterns
    const auto* a = static_cast<const uint16_t*>(A.const_data_ptr());
    const gtp::RowsDotHalfFn fn = a_type == torch::kFloat16 ? kernels->rows_dot_f16 : kernels->rows_dot_bf16;
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      fn(a, lda, begin, end, D, x, ldx, p, y, p);
    });
  }
  return Y;
}

const gtp::CpuKernels& kernels_for(const std::string& isa, const char* op) {
  const gtp::CpuKernels* k = gtp::cpu_kernels(isa.c_str());
  TORCH_CHECK(k != nullptr, op, ": instruction set '", isa, "' is not available on this CPU/build");
  return *k;
}

void check_rows_f32(const torch::Tensor& M, const char* op) {
  TORCH_CHECK(M.device().is_cpu() && M.scalar_type() == torch::kFloat32 && M.dim() == 2,
              op, ": rows must be a float32 CPU matrix (n, D), got ", M.scalar_type(), " ", M.sizes());
  TORCH_CHECK(M.size(1) <= 1 || M.stride(1) == 1, op, ": rows must have unit stride along D");
}

void check_vec_f64(const torch::Tensor& v, int64_t len, const char* op, const char* name) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == torch::kFloat64 && v.dim() == 1 &&
                  v.size(0) == len && v.is_contiguous(),
              op, ": ", name, " must be a contiguous float64 CPU vector of length ", len, ", got ",
              v.scalar_type(), " ", v.sizes());
}

// out[i] = <M[i], x> in float64 for float32 rows M (n, D); the Gram column of a new atom.
void rows_dot_f64(const torch::Tensor& M, const torch::Tensor& x, torch::Tensor out, const std::string& isa) {
  const char* op = "rows_dot_f64";
  check_rows_f32(M, op);
  const int64_t n = M.size(0), D = M.size(1);
  check_vec_f64(x, D, op, "x");
  check_vec_f64(out, n, op, "out");
  const auto fn = kernels_for(isa, op).rows_dot_f64;
  if (n == 0) return;
  const float* m = M.data_ptr<float>();
  const double* xp = x.data_ptr<double>();
  double* y = out.data_ptr<double>();
  const int64_t ldm = M.stride(0);
  const int64_t grain = std::max<int64_t>(16, kParallelGrainMacs / 2 / std::max<int64_t>(1, D));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(m, ldm, begin, end, D, xp, y); });
}

// out = b - M^T w in float64 for float32 rows M (n, D); the residual of a support.
void rows_combine_f64(const torch::Tensor& M, const torch::Tensor& w, const torch::Tensor& b, torch::Tensor out,
                      const std::string& isa) {
  const char* op = "rows_combine_f64";
  check_rows_f32(M, op);
  const int64_t n = M.size(0), D = M.size(1);
  check_vec_f64(w, n, op, "w");
  check_vec_f64(b, D, op, "b");
  check_vec_f64(out, D, op, "out");
  const auto fn = kernels_for(isa, op).rows_combine_f64;
  if (D == 0) return;
  const float* m = M.data_ptr<float>();
  const double* wp = w.data_ptr<double>();
  const double* bp = b.data_ptr<double>();
  double* r = out.data_ptr<double>();
  const int64_t ldm = M.stride(0);
  // column ranges of at least 512 (the kernel's L1 block) and ~512K multiply-adds (see rows_dot)
  const int64_t grain = std::max<int64_t>(512, kParallelGrainMacs / 2 / std::max<int64_t>(1, n));
  at::parallel_for(0, D, grain, [&](int64_t begin, int64_t end) { fn(m, ldm, n, begin, end, wp, bp, r); });
}

std::string rows_dot_isa() { return gtp::cpu_rows_dot_isa(); }

bool has_cuda() {
#if defined(GTP_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "gtp_kernels compiled ops (K3 least-squares update; CPU row products)";
  mod.def("lsq_update", &lsq_update,
          "Batched Cholesky append + (non-negative) least-squares solve, in place; returns status",
          py::arg("L"), py::arg("size"), py::arg("support"), py::arg("rhs"), py::arg("weights"),
          py::arg("new_atom"), py::arg("gram_col"), py::arg("gram_diag"), py::arg("rhs_new"),
          py::arg("lam"), py::arg("positive"), py::arg("dep_tol"), py::arg("weight_tol") = 0.0);
  mod.def("rows_dot", &rows_dot,
          "Y = A @ X.T for CPU A (n, D) float32, float16 or bfloat16 and float32 X (p, D), float32 "
          "accumulation; returns float32 Y (n, p). "
          "isa: '' (the widest this CPU has), 'avx512', 'avx2' or 'baseline' (tests)",
          py::arg("A"), py::arg("X"), py::arg("out") = py::none(), py::arg("isa") = "");
  mod.def("rows_dot_f64", &rows_dot_f64,
          "out[i] = <M[i], x> in float64 for float32 CPU rows M (n, D) and float64 x (D,), in place",
          py::arg("M"), py::arg("x"), py::arg("out"), py::arg("isa") = "");
  mod.def("rows_combine_f64", &rows_combine_f64,
          "out = b - M^T w in float64 for float32 CPU rows M (n, D), float64 w (n,) and b (D,), in place",
          py::arg("M"), py::arg("w"), py::arg("b"), py::arg("out"), py::arg("isa") = "");
  mod.def("rows_dot_isa", &rows_dot_isa, "Instruction set rows_dot runs on here: avx512, avx2 or baseline");
  mod.def("has_cuda", &has_cuda, "True when the CUDA kernel was compiled in");
}
