// Launchers of the K3 least-squares update, free of torch (see lsq_update_core.h for the math).
#pragma once

#include <cstdint>

#include "lsq_update_core.h"

namespace gtp {

// CPU: pursuits [t_begin, t_end) one after the other on the calling thread.
template <typename T, typename SizeT>
void lsq_update_cpu(const LsqArgs<T, SizeT>& args, int64_t t_begin, int64_t t_end);

#if defined(GTP_WITH_CUDA)
// CUDA: one launch on `stream` (a cudaStream_t), one thread block per pursuit, no host sync.
// Returns the launch's cudaError_t as an int (0 on success) so that callers need no CUDA header.
template <typename T, typename SizeT>
int lsq_update_cuda(const LsqArgs<T, SizeT>& args, void* stream);
#endif

}  // namespace gtp
