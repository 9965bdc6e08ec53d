// Instantiates every kernel of csrc/cuda/mira_kernels.cuh exactly as csrc/cuda/mira_cuda.cu does (the same
// launch plans, for each x dtype), without torch headers, so that tests/test_cuda_resources.py can read
// ptxas's resource report (-Xptxas=-v) for sm_80 and sm_90 in a few seconds instead of a full extension build.
#define MIRA_CHECK_LAUNCH() \
  do {                      \
  } while (0)
#include "cuda/mira_kernels.cuh"

namespace mira_cuda {

template <typename scalar_t, typename acc_t>
void probe(const Dims& d, const int64_t* offsets, const CallBuffers<scalar_t, acc_t>& cb, const Workspace& ws,
           cudaStream_t stream) {
  launch_adapter<scalar_t, acc_t>(d, offsets, kAffine, 1.0, 1e-2, cb, ws, stream);
  launch_backward<scalar_t, acc_t>(d, offsets, kAffine, 1.0, 1e-2, cb, ws, true, true, true, true, stream);
}

#define MIRA_PROBE(S, A) \
  template void probe<S, A>(const Dims&, const int64_t*, const CallBuffers<S, A>&, const Workspace&, cudaStream_t);
MIRA_PROBE(float, float)
MIRA_PROBE(double, double)
MIRA_PROBE(__half, float)
MIRA_PROBE(__nv_bfloat16, float)

}  // namespace mira_cuda
