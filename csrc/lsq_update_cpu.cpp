// The CPU twin of the K3 CUDA kernel: the same gtp::update_pursuit, run by a team of one thread.
#include "lsq_update.h"

namespace gtp {

template <typename T, typename SizeT>
void lsq_update_cpu(const LsqArgs<T, SizeT>& args, int64_t t_begin, int64_t t_end) {
  SerialTeam<T> team;
  for (int64_t t = t_begin; t < t_end; ++t) update_pursuit(team, args, t);
}

template void lsq_update_cpu<float, int32_t>(const LsqArgs<float, int32_t>&, int64_t, int64_t);
template void lsq_update_cpu<float, int64_t>(const LsqArgs<float, int64_t>&, int64_t, int64_t);
template void lsq_update_cpu<double, int32_t>(const LsqArgs<double, int32_t>&, int64_t, int64_t);
template void lsq_update_cpu<double, int64_t>(const LsqArgs<double, int64_t>&, int64_t, int64_t);

}  // namespace gtp
