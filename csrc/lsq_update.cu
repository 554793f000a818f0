// Launcher of the K3 CUDA kernel (lsq_update.cuh); free of torch so that nvcc compiles it in seconds
// and CI can compile it with a bare CUDA toolkit.
#define GTP_WITH_CUDA 1
#include "lsq_update.h"
#include "lsq_update.cuh"

namespace gtp {

template <typename T, typename SizeT>
int lsq_update_cuda(const LsqArgs<T, SizeT>& args, void* stream) {
  if (args.m <= 0) return 0;
  lsq_update_kernel<T, SizeT><<<static_cast<unsigned>(args.m), kLsqThreads, 0,
                                static_cast<cudaStream_t>(stream)>>>(args);
  return static_cast<int>(cudaGetLastError());
}

template int lsq_update_cuda<float, int32_t>(const LsqArgs<float, int32_t>&, void*);
template int lsq_update_cuda<float, int64_t>(const LsqArgs<float, int64_t>&, void*);
template int lsq_update_cuda<double, int32_t>(const LsqArgs<double, int32_t>&, void*);
template int lsq_update_cuda<double, int64_t>(const LsqArgs<double, int64_t>&, void*);

}  // namespace gtp
