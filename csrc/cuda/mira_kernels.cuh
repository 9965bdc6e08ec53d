// CUDA kernels of the MIRA ops and the host-side plan that launches them, free of torch headers.
//
// This one source is compiled twice:
//   * by nvcc, included from mira_cuda.cu (which adds ATen glue: checks, allocation, the base GEMM);
//   * by g++ as plain C++, included from tests/cuda_emu/driver.cpp after tests/cuda_emu/simt_emu.h,
//     which runs every CUDA thread of a block as a std::thread (see that header). The kernels
//     therefore use only what that header emulates: threadIdx/blockIdx/blockDim/gridDim,
//     __syncthreads, static and dynamic __shared__ memory. No warp intrinsics, no inline PTX,
//     no tensor cores: reductions go through shared memory, in a fixed order (deterministic).
//
// Shapes (docs/contract.md):  x (B,T,d_in)  query (B,d_k)  keys (N,d_k)  bank_a (N,S,r,d_in)
// bank_b (N,S,d_s,r);  FA = S*r*d_in and FB = S*d_s*r are the flattened widths of one slot's factors,
// SR = S*r the adapter rows per token. acc_t is the compute dtype (float, or double for double x);
// the memory side (query, keys, banks) arrives already converted to acc_t and contiguous.
//
// Kernels (one block = kThreads threads, 1-D grids so no dimension limit applies). __launch_bounds__:
// with the thread count alone ptxas picks its own register target, and for the factors and scores
// kernels it chose to spill; asking for 2 resident blocks lets them use up to 128 registers instead.
//   mira_retrieve_kernel   (sample, column chunk): cosine scores, separation, and the mixed factors
//                          A_b, B_b for one chunk of the FA+FB columns. Every chunk recomputes the
//                          sample's scores (N*d_k MACs, cheap) so retrieval is one launch.
//   mira_apply_kernel      (sample, token tile): h = x A_b^T, then out[slice] += scale * h B_b^T.
//                          This is mira_adapter_; mira_linear is ATen's GEMM followed by it.
//   mira_bwd_tokens_kernel (sample, token tile): h, dh = scale * G_slices B_b, dx += dh A_b.
//   mira_bwd_factors_kernel(sample, column chunk): dA_b = dh^T x, dB_b = scale * G^T h, reduced
//                          over T in order by the thread that owns the column; and the chunk's part of
//                          dw = <dA_b, bank_a[n]> + <dB_b, bank_b[n]>.
//   mira_bwd_scores_kernel (sample): dw (chunk parts summed in order), dz = sep'(dw), dq.
//   mira_bwd_memory_kernel (slot, column chunk) and (slot): dbank = w^T dF, dk through the cosine.
// No float atomics anywhere: every output element is reduced by one thread or one block.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <vector>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#endif

namespace mira_cuda {

constexpr int kThreads = 256;                // threads per block, every kernel
constexpr int kLanes = 32;                   // a "warp" here is only an index split: 32 consecutive threads
constexpr int kWarps = kThreads / kLanes;    // 8
constexpr int kTokTile = kWarps;             // tokens per block in token kernels: one warp per token row
constexpr int kJTile = 8;                    // adapter rows (s, k) accumulated in registers at once
constexpr int kDwTile = 4;                   // slots per block reduction of the partial dw
constexpr int kColsPerThread = 4;            // columns per thread in the column-chunk kernels
constexpr int kColsPerBlock = kThreads * kColsPerThread;
constexpr int kKeyChunk = 256;               // scores held in shared memory per pass over the keys
constexpr int kSampleTile = 8;               // most samples one retrieval block mixes at once
constexpr int kPairsPerWarp = 2;             // (query, key) score pairs a warp reduces per round
constexpr int kMaxSlices = 16;               // slice offsets that travel by value in the kernel arguments
constexpr int kOffsetUpload = 256;           // offsets one upload launch carries (S > kMaxSlices only)
constexpr int64_t kMaxGrid = 0x7fffffff;     // gridDim.x limit (compute capability >= 3.0)
constexpr int64_t kSmemBudget = 32 * 1024;   // dynamic shared memory for the per-tile h / dh rows

enum Separation : int { kAffine = 0, kSoftmax = 1, kRelu = 2, kTanh = 3, kSigmoid = 4, kIdentity = 5 };

// ------------------------------------------------------------------------------------------------
// Scalar helpers. Loads widen to acc_t, stores round once (round to nearest even).
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Narrow;
template <>
struct Narrow<float> {
  __device__ __forceinline__ static float from(float v) { return v; }
};
template <>
struct Narrow<double> {
  __device__ __forceinline__ static double from(double v) { return v; }
};
template <>
struct Narrow<__half> {
  __device__ __forceinline__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Narrow<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float msqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double msqrt(double v) { return sqrt(v); }
__device__ __forceinline__ float mexp(float v) { return expf(v); }
__device__ __forceinline__ double mexp(double v) { return exp(v); }
__device__ __forceinline__ float mtanh(float v) { return tanhf(v); }
__device__ __forceinline__ double mtanh(double v) { return tanh(v); }
template <typename T>
__device__ __forceinline__ T mmax(T a, T b) { return a > b ? a : b; }
template <typename T>
__device__ __forceinline__ T mmin(T a, T b) { return a < b ? a : b; }

// Norm floor of the cosine, as torch.nn.functional.normalize (reference.NORM_EPS).
constexpr double kNormEps = 1e-12;

// ------------------------------------------------------------------------------------------------
// Kernel arguments (passed by value).
// ------------------------------------------------------------------------------------------------
template <typename acc_t>
struct MemoryArgs {
  int64_t B, N, d_k, FA, FB;
  int64_t bt;  // samples per retrieval block (sample_tile(B))
  int sep;
  acc_t eps;
  const acc_t* query;   // (B, d_k)
  const acc_t* keys;    // (N, d_k)
  const acc_t* bank_a;  // (N, FA)
  const acc_t* bank_b;  // (N, FB)
  // Written by the retrieval kernel.
  acc_t* z;        // (B, N) cosine scores
  acc_t* w;        // (B, N) weights
  // Norms as the forward's cosine formed them: of the row times its scale, overflow_scale where |u|^2
  // overflowed acc_t, else 1 (|u| itself, which is inf for a finite row beyond acc_t's range, is not kept:
  // the backward's unit vectors are (u * scale) / max(norm, eps * scale), exact for every finite row).
  acc_t* qnorm;    // (B,) |q * qscale|
  acc_t* qscale;   // (B,)
  acc_t* knorm;    // (N,) |k * kscale|
  acc_t* kscale;   // (N,)
  acc_t* mixed_a;  // (B, FA)
  acc_t* mixed_b;  // (B, FB)
  // Backward.
  const acc_t* dmix_a;   // (B, FA) dA_b
  const acc_t* dmix_b;   // (B, FB) dB_b
  const acc_t* dw_part;  // (B, column chunks, N) per-chunk partial dw, from the factors kernel
  acc_t* dz;            // (B, N)
  acc_t* dq;            // (B, d_k) or null
  acc_t* dk;            // (N, d_k) or null
  acc_t* dbank_a;       // (N, FA) or null
  acc_t* dbank_b;       // (N, FB) or null
};

template <typename scalar_t, typename acc_t>
struct TokenArgs {
  int64_t B, T, d_in, S, r, d_s;
  // Slice offsets: by value for S <= kMaxSlices (no extra launch, no copy); above that in device memory,
  // written there by mira_offsets_kernel from its own by-value arguments (CUDA-graph safe: no host copy).
  int64_t offsets[kMaxSlices];
  const int64_t* offsets_dev;  // null when the by-value array holds them
  acc_t scale;
  const scalar_t* x;  // (B, T, d_in) contiguous
  scalar_t* out;      // (B, T, d_out) strided, updated in place (forward)
  int64_t out_sb, out_st, out_se;
  const scalar_t* grad;  // (B, T, d_out) strided (backward)
  int64_t g_sb, g_st, g_se;
  scalar_t* dx;  // (B, T, d_in) contiguous, holds G W on entry (backward), or null
  const acc_t* mixed_a;  // (B, S, r, d_in)
  const acc_t* mixed_b;  // (B, S, d_s, r)
  acc_t* h;              // (B, T, SR) shrink, backward only, or null
  acc_t* dh;             // (B, T, SR) grad of the shrink, backward only, or null
  acc_t* dmix_a;         // (B, FA) backward factors kernel
  acc_t* dmix_b;         // (B, FB)
  int64_t N;             // slots, for the factors kernel's partial dw
  const acc_t* bank_a;   // (N, FA)
  const acc_t* bank_b;   // (N, FB)
  acc_t* dw_part;        // (B, column chunks, N)
  acc_t* row_spill;      // (blocks, kTokTile, SR) when the tile rows do not fit in shared memory, else null
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ int64_t slice_offset(const TokenArgs<scalar_t, acc_t>& a, int64_t s) {
  return a.offsets_dev ? a.offsets_dev[s] : a.offsets[s];
}

// The slice offsets of a call with S > kMaxSlices, copied into the workspace from the launch arguments,
// kOffsetUpload per launch (kernel arguments are captured by value in a CUDA graph; a host-to-device
// copy from pageable memory is not).
struct OffsetUpload {
  int64_t* dst;
  int64_t count;
  int64_t values[kOffsetUpload];
};

__global__ void __launch_bounds__(kThreads) mira_offsets_kernel(const OffsetUpload u) {
  const int tid = threadIdx.x;
  if (tid < u.count) u.dst[tid] = u.values[tid];
}

// ------------------------------------------------------------------------------------------------
// Shared-memory reductions, all threads of the block take part (uniform control flow).
// ------------------------------------------------------------------------------------------------

// Sums K values per thread over the whole block; red holds K * kThreads values. Tree order fixed.
template <int K, typename acc_t>
__device__ __forceinline__ void block_sum(acc_t (&v)[K], acc_t* red) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int k = 0; k < K; ++k) red[k * kThreads + tid] = v[k];
  __syncthreads();
  for (int o = kThreads / 2; o > 0; o >>= 1) {
    if (tid < o) {
#pragma unroll
      for (int k = 0; k < K; ++k) red[k * kThreads + tid] += red[k * kThreads + tid + o];
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = red[k * kThreads];
  __syncthreads();  // red is reused right after
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum1(acc_t v, acc_t* red) {
  acc_t a[1] = {v};
  block_sum<1>(a, red);
  return a[0];
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_max1(acc_t v, acc_t* red) {
  const int tid = threadIdx.x;
  red[tid] = v;
  __syncthreads();
  for (int o = kThreads / 2; o > 0; o >>= 1) {
    if (tid < o) red[tid] = mmax(red[tid], red[tid + o]);
    __syncthreads();
  }
  const acc_t r = red[0];
  __syncthreads();
  return r;
}

// Sums K values over the 32 threads of each warp-sized group; every lane gets its group's sums.
template <int K, typename acc_t>
__device__ __forceinline__ void lane_sum(acc_t (&v)[K], acc_t* red) {
  const int tid = threadIdx.x, warp = tid / kLanes, lane = tid % kLanes;
  acc_t* base = red + warp * K * kLanes;
#pragma unroll
  for (int k = 0; k < K; ++k) base[k * kLanes + lane] = v[k];
  __syncthreads();
  for (int o = kLanes / 2; o > 0; o >>= 1) {
    if (lane < o) {
#pragma unroll
      for (int k = 0; k < K; ++k) base[k * kLanes + lane] += base[k * kLanes + lane + o];
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = base[k * kLanes];
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------
// Retrieval: scores, separation, mixing.
// ------------------------------------------------------------------------------------------------

// Where |u|^2 overflows acc_t (|u| > ~1.8e19 in float, ~1.3e154 in double), the row is rescored scaled by
// a power of two, exactly: it brings every finite row's squares back in range (float: 3.4e38 * 2^-80 ~
// 2.8e14, and 1e5 such squares sum to < 3.4e38; double: 1.8e308 * 2^-600 ~ 4e127) while a row that
// overflowed, whose largest entry is at least |u| / sqrt(d_k), keeps normal squares (float: 5.8e16 * 2^-80 ~
// 5e-8 at d_k = 1e5; double: 4e151 * 2^-600 ~ 1e-29). The cosine of the scaled row is the row's; its
// norm is the scaled root over the scale. An inf entry stays inf: its cosines are NaN, as u / |u|.
__device__ __forceinline__ float overflow_scale(float) { return 0x1p-80f; }
__device__ __forceinline__ double overflow_scale(double) { return 0x1p-600; }

// One pass of score_tile, kPairs pairs per warp and round. kScaled: query t's entries are multiplied by
// q_scale[t] and key i's by k_scale[i] (1 for rows that did not overflow, whose scores are then the
// unscaled pass's, bit for bit); else the keys' overflow scales are written to k_scale (by the t = 0 pair
// of each key).
template <bool kScaled, int kPairs, typename acc_t>
__device__ void score_pass(const MemoryArgs<acc_t>& a, int64_t b0, int nb, const acc_t* q_den, const acc_t* q_scale,
                           int64_t n0, int count, acc_t* zw_s, acc_t* red, bool write_knorm, acc_t* k_scale) {
  const int tid = threadIdx.x, warp = tid / kLanes, lane = tid % kLanes;
  const int pairs = nb * count;
  for (int g = 0; g < pairs; g += kWarps * kPairs) {
    acc_t v[2 * kPairs];  // per pair: q.k and |k|^2
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const int p = g + j * kWarps + warp;
      v[2 * j] = v[2 * j + 1] = acc_t(0);
      if (p < pairs) {
        const acc_t* q = a.query + (b0 + p / count) * a.d_k;
        const acc_t* k = a.keys + (n0 + p % count) * a.d_k;
        if (kScaled) {
          const acc_t qs = q_scale[p / count], ks = k_scale[p % count];
          for (int64_t d = lane; d < a.d_k; d += kLanes) {
            const acc_t kv = k[d] * ks;
            v[2 * j] += (q[d] * qs) * kv;
            v[2 * j + 1] += kv * kv;
          }
        } else {
          for (int64_t d = lane; d < a.d_k; d += kLanes) {
            const acc_t kv = k[d];
            v[2 * j] += q[d] * kv;
            v[2 * j + 1] += kv * kv;
          }
        }
      }
    }
    lane_sum<2 * kPairs>(v, red);
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < kPairs; ++j) {
        const int p = g + j * kWarps + warp;
        if (p >= pairs) continue;
        const int t = p / count, i = p % count;
        const acc_t k_root = msqrt(v[2 * j + 1]);
        if (kScaled) {
          const acc_t ks = k_scale[i];
          zw_s[t * kKeyChunk + i] = v[2 * j] / (q_den[t] * mmax(k_root, acc_t(kNormEps) * ks));
          if (write_knorm && t == 0) a.knorm[n0 + i] = k_root;  // the scale was written by the unscaled pass
        } else {
          zw_s[t * kKeyChunk + i] = v[2 * j] / (q_den[t] * mmax(k_root, acc_t(kNormEps)));
          if (t == 0) {
            const acc_t ks = v[2 * j + 1] == acc_t(INFINITY) ? overflow_scale(acc_t(0)) : acc_t(1);
            k_scale[i] = ks;
            if (write_knorm) {
              a.knorm[n0 + i] = k_root;  // rewritten by the scaled pass where ks != 1
              a.kscale[n0 + i] = ks;
            }
          }
        }
      }
    }
  }
  __syncthreads();
}

// Scores of keys [n0, n0 + count) against the tile's nb queries into zw_s[t * kKeyChunk + i]. Each warp takes
// kPairsPerWarp (sample t, key i) pairs per round, so a round's lane reduction (block barriers) serves
// kWarps * kPairsPerWarp pairs. q_den[t] is the guarded norm of query t (of the scaled row, q_scale[t]
// its scale); red holds 2 * kPairsPerWarp * kThreads values; k_scale holds kKeyChunk values. Each score's
// sums run in the order of one query alone, so the scores do not depend on the tile. Where a query or a key
// of the tile overflowed (overflow_scale), the tile is scored once more, scaled: a uniform decision (both
// scales are read from shared memory after a barrier).
template <typename acc_t>
__device__ void score_tile(const MemoryArgs<acc_t>& a, int64_t b0, int nb, const acc_t* q_den, const acc_t* q_scale,
                           int64_t n0, int count, acc_t* zw_s, acc_t* red, bool write_knorm, acc_t* k_scale) {
  score_pass<false, kPairsPerWarp>(a, b0, nb, q_den, q_scale, n0, count, zw_s, red, write_knorm, k_scale);
  // Read from shared memory here rather than carried in a register through the mixing loop (which has
  // none to spare at two blocks per SM: a carried flag cost 8 bytes of stack on sm_90).
  bool rescore = false;
  for (int t = 0; t < nb && !rescore; ++t) rescore = q_scale[t] != acc_t(1);
  for (int i = 0; i < count && nb > 0 && !rescore; ++i) rescore = k_scale[i] != acc_t(1);
  // One pair per warp and round when scaled: the scales' registers fit where the mixing loop calls this
  // (with two, 8 bytes of stack on sm_90); a score's bits do not depend on how pairs share a round.
  if (rescore) score_pass<true, 1>(a, b0, nb, q_den, q_scale, n0, count, zw_s, red, write_knorm, k_scale);
}

// Row statistics of the separation: the affine denominator, or the softmax max and sum.
template <typename acc_t>
struct SepStats {
  acc_t denom, max, sum;
};

template <typename acc_t>
__device__ __forceinline__ acc_t separate_one(int sep, int64_t N, acc_t z, const SepStats<acc_t>& st) {
  switch (sep) {
    case kAffine: return N == 1 ? z : z / st.denom;
    case kSoftmax: return mexp(z - st.max) / st.sum;
    case kRelu: return z <= acc_t(0) ? acc_t(0) : z;  // keeps a NaN score NaN, as torch.relu
    case kTanh: return mtanh(z);
    case kSigmoid: return acc_t(1) / (acc_t(1) + mexp(-z));
    default: return z;
  }
}

// Sign-preserving clamp of the affine denominator: |d| >= eps, sign(0) taken as +.
template <typename acc_t>
__device__ __forceinline__ acc_t guarded_denominator(acc_t total, acc_t eps) {
  if (total >= eps || total <= -eps) return total;
  return total >= acc_t(0) ? eps : -eps;
}

// grid: sample tiles * chunks blocks. A block mixes the columns of its chunk (kColsPerBlock of the FA+FB
// columns) for the a.bt samples of its tile (fewer in the last tile): each bank element is loaded once for
// all of them, so the banks are read B / bt times instead of B times (from L2). Every block recomputes its
// samples' scores (N * d_k each, cheap next to the mixing's reads); mixing sums over n in order for each
// sample, so the results do not depend on bt.
// Two resident blocks (at most 128 registers) in float; float64, whose 32 accumulators take twice the
// registers, gets one (ptxas spilled at 128).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads, sizeof(acc_t) == 8 ? 1 : 2) mira_retrieve_kernel(const MemoryArgs<acc_t> a) {
  __shared__ acc_t red[kSampleTile * kThreads];  // block_sum<kSampleTile>, lane_sum<2 * kPairsPerWarp>
  __shared__ acc_t zw_s[kSampleTile * kKeyChunk];  // scores, then weights, per sample of the tile
  __shared__ acc_t qden_s[kSampleTile];
  __shared__ acc_t qscale_s[kSampleTile];  // overflow_scale or 1 per query
  __shared__ acc_t kscale_s[kKeyChunk];    // score_tile's key scales
  __shared__ SepStats<acc_t> st_s[kSampleTile];
  static_assert(2 * kPairsPerWarp <= kSampleTile, "red holds the score pairs' lane reduction");
  const int tid = threadIdx.x;
  const int64_t cols = a.FA + a.FB;
  const int64_t chunks = mmax<int64_t>(1, (cols + kColsPerBlock - 1) / kColsPerBlock);
  const int64_t tile = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int64_t b0 = tile * a.bt;
  const int nb = static_cast<int>(mmin<int64_t>(a.bt, a.B - b0));
  const bool lead = chunk == 0;  // one block per sample writes the per-sample side outputs

  {  // The tile's query norms, reduced together (one tree for all of them).
    acc_t qq[kSampleTile];
#pragma unroll
    for (int t = 0; t < kSampleTile; ++t) {
      qq[t] = 0;
      if (t < nb) {
        const acc_t* q = a.query + (b0 + t) * a.d_k;
        for (int64_t d = tid; d < a.d_k; d += kThreads) qq[t] += q[d] * q[d];
      }
    }
    block_sum<kSampleTile>(qq, red);
    unsigned over = 0;  // bit t: query t's squares overflowed (a mask, not an array of scales: registers)
#pragma unroll
    for (int t = 0; t < kSampleTile; ++t)
      if (t < nb && qq[t] == acc_t(INFINITY)) over |= 1u << t;
    if (over != 0) {  // uniform (block-wide sums): the squares again, scaled; rows of scale 1 sum as before
#pragma unroll
      for (int t = 0; t < kSampleTile; ++t) {
        qq[t] = 0;
        if (t < nb) {
          const acc_t* q = a.query + (b0 + t) * a.d_k;
          const acc_t scale = (over >> t) & 1u ? overflow_scale(acc_t(0)) : acc_t(1);
          for (int64_t d = tid; d < a.d_k; d += kThreads) {
            const acc_t qv = q[d] * scale;
            qq[t] += qv * qv;
          }
        }
      }
      block_sum<kSampleTile>(qq, red);
    }
    if (tid < nb) {
      acc_t q_sq = qq[0];
#pragma unroll
      for (int t = 1; t < kSampleTile; ++t)
        if (t == tid) q_sq = qq[t];
      const acc_t scale = (over >> tid) & 1u ? overflow_scale(acc_t(0)) : acc_t(1);
      const acc_t q_root = msqrt(q_sq);
      qden_s[tid] = mmax(q_root, acc_t(kNormEps) * scale);
      qscale_s[tid] = scale;
      if (lead && a.qnorm) {
        a.qnorm[b0 + tid] = q_root;
        a.qscale[b0 + tid] = scale;
      }
    }
  }
  __syncthreads();  // qden_s, qscale_s visible to the block

  const int64_t key_chunks = (a.N + kKeyChunk - 1) / kKeyChunk;
  const bool resident = key_chunks == 1;  // all scores fit: compute them once
  const bool write_knorm = lead && b0 == 0 && a.knorm != nullptr;
  if (resident) score_tile(a, b0, nb, qden_s, qscale_s, 0, static_cast<int>(a.N), zw_s, red, write_knorm, kscale_s);
  bool knorm_written = resident;

  // Separation statistics, one sample at a time (scalar partials keep the registers for the mixing's
  // accumulators); kept in shared memory for the mixing.
  if ((a.sep == kAffine && a.N > 1) || a.sep == kSoftmax) {
    for (int t = 0; t < nb; ++t) {
      // Per-thread partials over the thread's scores; softmax keeps an online (max, sum) pair.
      acc_t part_sum = 0, part_max = -INFINITY, part_exp = 0;
      for (int64_t kc = 0; kc < key_chunks; ++kc) {
        const int64_t n0 = kc * kKeyChunk;
        const int count = static_cast<int>(mmin<int64_t>(kKeyChunk, a.N - n0));
        acc_t* z_t = zw_s + t * kKeyChunk;
        if (!resident) score_tile(a, b0 + t, 1, qden_s + t, qscale_s + t, n0, count, z_t, red, write_knorm && t == 0,
                                  kscale_s);
        for (int i = tid; i < count; i += kThreads) {
          const acc_t zi = z_t[i];
          part_sum += zi;
          if (zi > part_max) {
            part_exp = part_exp * mexp(part_max - zi) + acc_t(1);
            part_max = zi;
          } else {
            part_exp += mexp(zi - part_max);
          }
        }
        if (!resident) __syncthreads();  // zw_s is rewritten by the next chunk
      }
      SepStats<acc_t> st{acc_t(1), acc_t(0), acc_t(1)};
      if (a.sep == kAffine) {
        st.denom = guarded_denominator(block_sum1(part_sum, red), a.eps);
      } else {
        st.max = block_max1(part_max, red);
        const acc_t mine = part_exp > acc_t(0) ? part_exp * mexp(part_max - st.max) : acc_t(0);
        st.sum = block_sum1(mine, red);
      }
      if (tid == 0) st_s[t] = st;
    }
    knorm_written = true;
  } else if (tid < kSampleTile) {
    st_s[tid] = SepStats<acc_t>{acc_t(1), acc_t(0), acc_t(1)};
  }
  __syncthreads();  // st_s visible to the block

  // Mix: each thread owns kColsPerThread columns, strided by kThreads (coalesced bank reads), for every
  // sample of the tile.
  // src[c] walks column c of the bank down the slots (stride FA in bank_a, FB in bank_b; bit c of in_a).
  const acc_t* src[kColsPerThread];
  unsigned in_a = 0;
  acc_t acc[kColsPerThread][kSampleTile];
#pragma unroll
  for (int c = 0; c < kColsPerThread; ++c) {
    const int64_t col = chunk * kColsPerBlock + c * kThreads + tid;
    if (col < a.FA) in_a |= 1u << c;
    src[c] = col >= cols ? nullptr : (col < a.FA ? a.bank_a + col : a.bank_b + (col - a.FA));
#pragma unroll
    for (int t = 0; t < kSampleTile; ++t) acc[c][t] = 0;
  }
  for (int64_t kc = 0; kc < key_chunks; ++kc) {
    const int64_t n0 = kc * kKeyChunk;
    const int count = static_cast<int>(mmin<int64_t>(kKeyChunk, a.N - n0));
    if (!resident)
      score_tile(a, b0, nb, qden_s, qscale_s, n0, count, zw_s, red, write_knorm && !knorm_written, kscale_s);
#pragma unroll
    for (int t = 0; t < kSampleTile; ++t) {
      if (t >= nb) continue;
      const int64_t b = b0 + t;
      for (int i = tid; i < count; i += kThreads) {
        const acc_t zi = zw_s[t * kKeyChunk + i];
        const acc_t wi = separate_one(a.sep, a.N, zi, st_s[t]);
        zw_s[t * kKeyChunk + i] = wi;  // the thread that read the score writes the weight: no race
        if (lead) {
          if (a.z) a.z[b * a.N + n0 + i] = zi;
          if (a.w) a.w[b * a.N + n0 + i] = wi;
        }
      }
    }
    __syncthreads();
    for (int i = 0; i < count; ++i) {
      acc_t v[kColsPerThread];
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        v[c] = acc_t(0);
        if (src[c]) {
          v[c] = *src[c];
          src[c] += (in_a >> c) & 1u ? a.FA : a.FB;
        }
      }
#pragma unroll
      for (int t = 0; t < kSampleTile; ++t) {
        if (t >= nb) break;
        const acc_t wt = zw_s[t * kKeyChunk + i];
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) acc[c][t] += wt * v[c];
      }
    }
    __syncthreads();  // zw_s is rewritten by the next chunk
  }
#pragma unroll
  for (int c = 0; c < kColsPerThread; ++c) {
    const int64_t col = chunk * kColsPerBlock + c * kThreads + tid;
#pragma unroll
    for (int t = 0; t < kSampleTile; ++t) {
      if (t >= nb) continue;
      if (col < a.FA)
        a.mixed_a[(b0 + t) * a.FA + col] = acc[c][t];
      else if (col < cols)
        a.mixed_b[(b0 + t) * a.FB + (col - a.FA)] = acc[c][t];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Token tiles: shrink (row dot products) and expand.
// ------------------------------------------------------------------------------------------------

// out[t * out_rs + j] = mul * sum_{i < len} in[t * in_rs + i * in_cs] * wt[j * wt_rs + i * wt_cs]
// for the tile's rows t < rows and j < J. Warp t owns row t and its lanes split i; each input element
// is loaded once for a register tile of kJTile values of j.
template <typename scalar_t, typename acc_t>
__device__ void tile_row_dots(const scalar_t* in, int64_t in_rs, int64_t in_cs, int rows, int64_t len,
                              const acc_t* wt, int64_t wt_rs, int64_t wt_cs, int64_t J, acc_t mul, acc_t* out,
                              int64_t out_rs, acc_t* red) {
  const int tid = threadIdx.x, warp = tid / kLanes, lane = tid % kLanes;
  const bool active = warp < rows;
  const scalar_t* row = in + (active ? warp : 0) * in_rs;
  for (int64_t j0 = 0; j0 < J; j0 += kJTile) {
    acc_t acc[kJTile];
#pragma unroll
    for (int jj = 0; jj < kJTile; ++jj) acc[jj] = 0;
    if (active) {
      // Rows past J repeat the last row: read, never stored.
      const acc_t* w0 = wt + j0 * wt_rs;
      const int64_t last = J - 1 - j0;
      for (int64_t i = lane; i < len; i += kLanes) {
        const acc_t xv = widen(row[i * in_cs]);
        const acc_t* wi = w0 + i * wt_cs;
#pragma unroll
        for (int jj = 0; jj < kJTile; ++jj) acc[jj] += xv * wi[mmin<int64_t>(jj, last) * wt_rs];
      }
    }
    lane_sum<kJTile>(acc, red);
    if (active && lane == 0) {
#pragma unroll
      for (int jj = 0; jj < kJTile; ++jj)
        if (j0 + jj < J) out[warp * out_rs + j0 + jj] = mul * acc[jj];
    }
  }
  __syncthreads();
}

template <typename acc_t>
__device__ __forceinline__ acc_t* tile_rows(acc_t* dyn_smem, acc_t* spill, int64_t SR) {
  // The tile's (kTokTile, SR) rows: shared memory, or this block's slice of the global spill buffer.
  return spill ? spill + static_cast<int64_t>(blockIdx.x) * kTokTile * SR : dyn_smem;
}

#ifdef __CUDACC__
#define MIRA_DYNAMIC_SMEM(type, name) \
  extern __shared__ __align__(16) unsigned char mira_dyn_smem_[]; \
  type* name = reinterpret_cast<type*>(mira_dyn_smem_)
#else
#define MIRA_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::emu::dynamic_smem())
#endif

// grid: B * tiles blocks; dynamic shared memory kTokTile * SR * sizeof(acc_t) unless row_spill is set.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) mira_apply_kernel(const TokenArgs<scalar_t, acc_t> a) {
  __shared__ acc_t red[kJTile * kThreads];
  MIRA_DYNAMIC_SMEM(acc_t, dyn);
  const int tid = threadIdx.x;
  const int64_t SR = a.S * a.r;
  const int64_t tiles = (a.T + kTokTile - 1) / kTokTile;
  const int64_t b = blockIdx.x / tiles, t0 = (blockIdx.x % tiles) * kTokTile;
  const int rows = static_cast<int>(mmin<int64_t>(kTokTile, a.T - t0));
  acc_t* h = tile_rows(dyn, a.row_spill, SR);

  // h[t, j] = x[t] . A_b[j]
  const acc_t* A = a.mixed_a + b * SR * a.d_in;
  tile_row_dots(a.x + (b * a.T + t0) * a.d_in, a.d_in, 1, rows, a.d_in, A, a.d_in, 1, SR, acc_t(1), h, SR, red);

  // out[t, off_s + e] += scale * sum_k h[t, s*r + k] B_b[s, e, k]; thread per e, tokens in registers.
  for (int64_t s = 0; s < a.S; ++s) {
    const acc_t* Bs = a.mixed_b + (b * a.S + s) * a.d_s * a.r;
    const acc_t* hs = h + s * a.r;
    for (int64_t e = tid; e < a.d_s; e += kThreads) {
      acc_t acc[kTokTile];
#pragma unroll
      for (int t = 0; t < kTokTile; ++t) acc[t] = 0;
      for (int64_t k = 0; k < a.r; ++k) {
        const acc_t bv = Bs[e * a.r + k];
#pragma unroll
        for (int t = 0; t < kTokTile; ++t)
          if (t < rows) acc[t] += hs[t * SR + k] * bv;
      }
#pragma unroll
      for (int t = 0; t < kTokTile; ++t) {
        if (t < rows) {
          scalar_t* p = a.out + b * a.out_sb + (t0 + t) * a.out_st + (slice_offset(a, s) + e) * a.out_se;
          *p = Narrow<scalar_t>::from(widen(*p) + a.scale * acc[t]);
        }
      }
    }
  }
}

// grid: B * tiles blocks. Writes h and dh (global, when a.h / a.dh are set) and dx += dh A_b (when a.dx).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) mira_bwd_tokens_kernel(const TokenArgs<scalar_t, acc_t> a) {
  __shared__ acc_t red[kJTile * kThreads];
  MIRA_DYNAMIC_SMEM(acc_t, dyn);
  const int tid = threadIdx.x;
  const int64_t SR = a.S * a.r, r = a.r, d_s = a.d_s, d_in = a.d_in;
  const int64_t tiles = (a.T + kTokTile - 1) / kTokTile;
  const int64_t b = blockIdx.x / tiles, t0 = (blockIdx.x % tiles) * kTokTile;
  const int rows = static_cast<int>(mmin<int64_t>(kTokTile, a.T - t0));
  acc_t* dh = tile_rows(dyn, a.row_spill, SR);
  const acc_t* A = a.mixed_a + b * SR * d_in;

  if (a.h) {  // the shrink, needed for dB_b
    tile_row_dots(a.x + (b * a.T + t0) * d_in, d_in, 1, rows, d_in, A, d_in, 1, SR, acc_t(1),
                  a.h + (b * a.T + t0) * SR, SR, red);
  }
  // dh[t, s*r + k] = scale * sum_e G[t, off_s + e] B_b[s, e, k], one slice at a time.
  for (int64_t s = 0; s < a.S; ++s) {
    tile_row_dots(a.grad + b * a.g_sb + t0 * a.g_st + slice_offset(a, s) * a.g_se, a.g_st, a.g_se, rows, d_s,
                  a.mixed_b + (b * a.S + s) * d_s * r, 1, r, r, a.scale, dh + s * r, SR, red);
  }
  if (a.dh) {
    for (int64_t i = tid; i < rows * SR; i += kThreads) a.dh[(b * a.T + t0) * SR + i] = dh[i];
  }
  if (a.dx) {  // dx[t, d] += sum_j dh[t, j] A_b[j, d], rounded once
    for (int64_t d = tid; d < d_in; d += kThreads) {
      acc_t acc[kTokTile];
#pragma unroll
      for (int t = 0; t < kTokTile; ++t) acc[t] = 0;
      for (int64_t j = 0; j < SR; ++j) {
        const acc_t av = A[j * d_in + d];
#pragma unroll
        for (int t = 0; t < kTokTile; ++t)
          if (t < rows) acc[t] += dh[t * SR + j] * av;
      }
#pragma unroll
      for (int t = 0; t < kTokTile; ++t) {
        if (t < rows) {
          scalar_t* p = a.dx + (b * a.T + t0 + t) * d_in + d;
          *p = Narrow<scalar_t>::from(widen(*p) + acc[t]);
        }
      }
    }
  }
}

// grid: B * chunks blocks over the FA+FB columns. Each column is reduced over T by its one thread; the
// block then reduces its columns' share of dw[b, n] = <dF_b, bank[n]> (the bulk of the dw work, spread
// over every chunk instead of one block per sample), summed over chunks in order by the scores kernel.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2) mira_bwd_factors_kernel(const TokenArgs<scalar_t, acc_t> a) {
  __shared__ acc_t red[kJTile * kThreads];
  const int tid = threadIdx.x;
  const int64_t SR = a.S * a.r, FA = SR * a.d_in, FB = a.S * a.d_s * a.r, cols = FA + FB;
  const int64_t chunks = mmax<int64_t>(1, (cols + kColsPerBlock - 1) / kColsPerBlock);
  const int64_t b = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  // Column c of dA_b: (j, d), sum_t dh[t, j] x[t, d]; of dB_b: (s, e, k), scale * sum_t G[t, off_s+e] h[t, s*r+k].
  const scalar_t* p1[kColsPerThread];
  const acc_t* p2[kColsPerThread];
  int64_t s1[kColsPerThread];
  acc_t acc[kColsPerThread];
#pragma unroll
  for (int c = 0; c < kColsPerThread; ++c) {
    const int64_t col = chunk * kColsPerBlock + c * kThreads + tid;
    acc[c] = 0;
    p1[c] = nullptr;
    p2[c] = nullptr;
    s1[c] = 0;
    if (col < FA) {
      const int64_t j = col / a.d_in, d = col % a.d_in;
      p1[c] = a.x + b * a.T * a.d_in + d;
      s1[c] = a.d_in;
      p2[c] = a.dh + b * a.T * SR + j;
    } else if (col < cols) {
      const int64_t cb = col - FA, s = cb / (a.d_s * a.r), e = (cb / a.r) % a.d_s, k = cb % a.r;
      p1[c] = a.grad + b * a.g_sb + (slice_offset(a, s) + e) * a.g_se;
      s1[c] = a.g_st;
      p2[c] = a.h + b * a.T * SR + s * a.r + k;
    }
  }
  for (int64_t t = 0; t < a.T; ++t) {
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c)
      if (p1[c]) acc[c] += widen(p1[c][t * s1[c]]) * p2[c][t * SR];
  }
  const acc_t* bank[kColsPerThread];  // column c of slot 0 in bank_a / bank_b, or null
  int64_t bank_stride[kColsPerThread];
#pragma unroll
  for (int c = 0; c < kColsPerThread; ++c) {
    const int64_t col = chunk * kColsPerBlock + c * kThreads + tid;
    bank[c] = nullptr;
    bank_stride[c] = 0;
    if (col < FA) {
      a.dmix_a[b * FA + col] = acc[c];
      bank[c] = a.bank_a + col;
      bank_stride[c] = FA;
    } else if (col < cols) {
      acc[c] *= a.scale;
      a.dmix_b[b * FB + (col - FA)] = acc[c];
      bank[c] = a.bank_b + (col - FA);
      bank_stride[c] = FB;
    }
  }
  for (int64_t n0 = 0; n0 < a.N; n0 += kDwTile) {
    acc_t v[kDwTile];
#pragma unroll
    for (int i = 0; i < kDwTile; ++i) {
      v[i] = 0;
      if (n0 + i < a.N) {
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c)
          if (bank[c]) v[i] += acc[c] * bank[c][(n0 + i) * bank_stride[c]];
      }
    }
    block_sum<kDwTile>(v, red);
    if (tid == 0) {
#pragma unroll
      for (int i = 0; i < kDwTile; ++i)
        if (n0 + i < a.N) a.dw_part[(b * chunks + chunk) * a.N + n0 + i] = v[i];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward of the memory side.
// ------------------------------------------------------------------------------------------------

// One entry of u / max(|u|, eps), from the retrieval's norm of u * scale (MemoryArgs::qnorm / knorm): scaling the
// row and the floor by the same power of two changes no bit (and scale = 1 is the unscaled row), while |u|
// itself is inf for a finite row beyond acc_t's range, and u / |u| would come out 0 there.
template <typename acc_t>
__device__ __forceinline__ acc_t unit_entry(acc_t u, acc_t norm, acc_t scale) {
  return (u * scale) / mmax(norm, acc_t(kNormEps) * scale);
}

// d/du of u / max(|u|, eps) applied to g, for one vector held in out (g on entry, the result on exit); norm and
// scale as unit_entry. Every thread of the block calls it; each owns the elements d = tid, tid + kThreads, ...
template <typename acc_t>
__device__ void normalize_backward_inplace(const acc_t* u, acc_t norm, acc_t scale, acc_t* out, int64_t len,
                                           acc_t* red) {
  const int tid = threadIdx.x;
  const acc_t eps_s = acc_t(kNormEps) * scale;  // |u| < eps exactly where norm < eps_s (scale: a power of two)
  const acc_t den = mmax(norm, eps_s);
  acc_t dot = 0;
  for (int64_t d = tid; d < len; d += kThreads) dot += ((u[d] * scale) / den) * out[d];
  dot = block_sum1(dot, red);
  for (int64_t d = tid; d < len; d += kThreads) {
    const acc_t g = out[d];
    // From ||u|| = eps on (and for NaN), as the reference's ~(norm < eps): F.normalize's clamp_min
    // passes the gradient at equality. The tangent part is divided by |u| = den / scale as (... / den) * scale:
    // for a finite row beyond acc_t's range that is its true value, tiny (|g| / |u| with |u| above the dtype's
    // max), where dividing by |u| = inf gives 0 (as the reference and the CPU backend do in float64).
    out[d] = !(norm < eps_s) ? ((g - ((u[d] * scale) / den) * dot) / den) * scale : g / acc_t(kNormEps);
  }
}

// grid: B blocks. dw row (the factors kernel's per-chunk partials summed in chunk order), dz = sep'(dw),
// and dq when asked.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads, 2) mira_bwd_scores_kernel(const MemoryArgs<acc_t> a) {
  __shared__ acc_t red[2 * kThreads];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x, N = a.N;
  const int64_t chunks = mmax<int64_t>(1, (a.FA + a.FB + kColsPerBlock - 1) / kColsPerBlock);
  acc_t* dz = a.dz + b * N;  // holds dw first, then dz
  const acc_t* z = a.z + b * N;
  const acc_t* w = a.w + b * N;

  for (int64_t n = tid; n < N; n += kThreads) {
    acc_t dw = 0;
    for (int64_t ch = 0; ch < chunks; ++ch) dw += a.dw_part[(b * chunks + ch) * N + n];
    dz[n] = dw;
  }
  __syncthreads();  // dw visible to the block

  // sep': the row statistics first (block sums over n), then element-wise.
  acc_t part[2] = {acc_t(0), acc_t(0)};  // sum(dw * w), sum(z)
  for (int64_t n = tid; n < N; n += kThreads) {
    part[0] += dz[n] * w[n];
    part[1] += z[n];
  }
  block_sum<2>(part, red);
  const acc_t through = part[0], total = part[1];
  const bool affine_sum = a.sep == kAffine && N > 1;
  const acc_t denom = affine_sum ? guarded_denominator(total, a.eps) : acc_t(1);
  const acc_t inside = (total >= a.eps || total <= -a.eps) ? acc_t(1) : acc_t(0);  // [|sum z| >= eps]
  for (int64_t n = tid; n < N; n += kThreads) {
    const acc_t g = dz[n], wn = w[n];
    acc_t out = g;
    switch (a.sep) {
      case kAffine: out = affine_sum ? (g - through * inside) / denom : g; break;
      case kSoftmax: out = wn * (g - through); break;
      case kRelu: out = z[n] <= acc_t(0) ? acc_t(0) : g; break;  // a NaN score passes g, as torch.relu's autograd
      case kTanh: out = g * (acc_t(1) - wn * wn); break;
      case kSigmoid: out = g * wn * (acc_t(1) - wn); break;
      default: break;
    }
    dz[n] = out;
  }
  __syncthreads();  // dz visible to the block

  if (a.dq) {  // dq = normalize'(q) applied to sum_n dz[n] k_n / max(|k_n|, eps)
    acc_t* dq = a.dq + b * a.d_k;
    for (int64_t d = tid; d < a.d_k; d += kThreads) {
      acc_t g = 0;
      for (int64_t n = 0; n < N; ++n) g += dz[n] * unit_entry(a.keys[n * a.d_k + d], a.knorm[n], a.kscale[n]);
      dq[d] = g;
    }
    normalize_backward_inplace(a.query + b * a.d_k, a.qnorm[b], a.qscale[b], dq, a.d_k, red);
  }
}

// grid: N * chunks blocks for dbank (when asked), then N blocks for dk (when asked).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) mira_bwd_memory_kernel(const MemoryArgs<acc_t> a) {
  __shared__ acc_t red[kThreads];
  const int tid = threadIdx.x;
  const int64_t N = a.N, B = a.B, FA = a.FA, FB = a.FB, cols = FA + FB;
  const int64_t chunks = mmax<int64_t>(1, (cols + kColsPerBlock - 1) / kColsPerBlock);
  const int64_t bank_blocks = (a.dbank_a || a.dbank_b) ? N * chunks : 0;
  if (static_cast<int64_t>(blockIdx.x) < bank_blocks) {
    // dbank[n, c] = sum_b w[b, n] dF[b, c], in order of b.
    const int64_t n = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      const int64_t col = chunk * kColsPerBlock + c * kThreads + tid;
      if (col >= cols) continue;
      const bool in_a = col < FA;
      acc_t* dst = in_a ? a.dbank_a : a.dbank_b;
      if (!dst) continue;
      const acc_t* src = in_a ? a.dmix_a + col : a.dmix_b + (col - FA);
      const int64_t stride = in_a ? FA : FB;
      acc_t acc = 0;
      for (int64_t b = 0; b < B; ++b) acc += a.w[b * N + n] * src[b * stride];
      dst[in_a ? n * FA + col : n * FB + (col - FA)] = acc;
    }
    return;  // uniform per block: no barrier below is shared with these blocks
  }
  // dk[n] = normalize'(k_n) applied to sum_b dz[b, n] q_b / max(|q_b|, eps)
  const int64_t n = blockIdx.x - bank_blocks;
  acc_t* dk = a.dk + n * a.d_k;
  for (int64_t d = tid; d < a.d_k; d += kThreads) {
    acc_t g = 0;
    for (int64_t b = 0; b < B; ++b)
      g += a.dz[b * N + n] * unit_entry(a.query[b * a.d_k + d], a.qnorm[b], a.qscale[b]);
    dk[d] = g;
  }
  normalize_backward_inplace(a.keys + n * a.d_k, a.knorm[n], a.kscale[n], dk, a.d_k, red);
}

// ------------------------------------------------------------------------------------------------
// Host-side plan: workspace layout and launch order, shared by the CUDA glue and the emulation
// (and mirrored in Python by mira_kernels/cuda_plan.py for the GPU model; tests/test_cuda_plan.py
// checks the two against each other through the emulation's plan-only mode).
// ------------------------------------------------------------------------------------------------

struct Dims {
  int64_t B, T, d_in, N, d_k, S, r, d_s;
  int64_t FA() const { return S * r * d_in; }
  int64_t FB() const { return S * d_s * r; }
  int64_t SR() const { return S * r; }
  int64_t tiles() const { return (T + kTokTile - 1) / kTokTile; }
  int64_t col_chunks() const {
    const int64_t chunks = (FA() + FB() + kColsPerBlock - 1) / kColsPerBlock;
    return chunks > 0 ? chunks : 1;  // the retrieval runs even without columns: it writes z and w
  }
  // Launches of mira_offsets_kernel a call needs: none while the offsets fit in the kernel arguments.
  int64_t offset_uploads() const { return S > kMaxSlices ? (S + kOffsetUpload - 1) / kOffsetUpload : 0; }
  // Samples per retrieval block, from B alone (never from the device, so no result depends on the GPU):
  // one while the grid must spread over the SMs, up to kSampleTile where re-reading the banks from L2
  // for every sample would dominate the retrieval (ViT-B/16: 1.47 MB per sample in fp32).
  int64_t sample_tile() const { return B <= 16 ? 1 : B <= 32 ? 2 : B <= 64 ? 4 : kSampleTile; }
  int64_t sample_tiles() const { return (B + sample_tile() - 1) / sample_tile(); }
  int64_t retrieve_blocks() const { return sample_tiles() * col_chunks(); }
};

// Whether every product of sizes that the plan and the kernels form (workspace arrays, factor columns per sample
// and per slot, token rows, x's elements) stays at or below kMaxElems, or why not. Expanded (zero-stride) inputs
// make any size without memory, and the grid limit alone does not bound these products (B = 1, T = 2^34 tokens,
// r = 2^30: every grid fits, the tile-row scratch B * T * S * r does not fit in int64). Below 2^58 each, no
// product or sum of them in int64 can wrap (no tensor comes near: 2^58 floats are 1 EiB). Checked before
// plan_workspace, whose products would otherwise overflow (undefined behaviour) and size the allocation.
constexpr int64_t kMaxElems = int64_t(1) << 58;

inline bool product_fits(std::initializer_list<int64_t> factors) {
  for (int64_t f : factors)
    if (f == 0) return true;
  int64_t p = 1;
  for (int64_t f : factors) {  // every factor >= 1 here, so the partial products only grow
    if (f < 0 || f > kMaxElems || p > kMaxElems / f) return false;
    p *= f;
  }
  return true;
}

inline const char* size_error(const Dims& d) {
  const bool fits = product_fits({d.S, d.r, d.d_in}) && product_fits({d.S, d.r, d.d_s}) &&
                    product_fits({d.B, d.S, d.r, d.d_in}) && product_fits({d.B, d.S, d.r, d.d_s}) &&
                    product_fits({d.N, d.S, d.r, d.d_in}) && product_fits({d.N, d.S, d.r, d.d_s}) &&
                    product_fits({d.B, d.T + kTokTile, d.S, d.r}) && product_fits({d.B, d.T, d.d_in}) &&
                    product_fits({d.B, d.N}) && product_fits({d.B, d.d_k}) && product_fits({d.N, d.d_k}) &&
                    product_fits({d.B, d.N, d.S, d.r, d.d_in + d.d_s});  // >= B * N * column chunks (dw_part)
  return fits ? nullptr : "a product of the sizes would exceed 2^58 elements (64-bit index arithmetic)";
}

// Offsets (in acc_t elements) of the scratch arrays inside one workspace buffer.
struct Workspace {
  int64_t z, w, qnorm, qscale, knorm, kscale, mixed_a, mixed_b, row_spill, h, dh, dmix_a, dmix_b, dw_part, dz,
      offsets, total;
  bool spill;  // tile rows live in global memory (row_spill) instead of shared memory
};

// backward: also the buffers of the backward; memory_grads: dq/dk/dbank are asked for.
// smem_budget: bytes of dynamic shared memory the tile rows may take (kSmemBudget; tests lower it).
template <typename acc_t>
inline Workspace plan_workspace(const Dims& d, bool backward, bool memory_grads, int64_t smem_budget) {
  Workspace ws{};
  int64_t at = 0;
  auto take = [&at](int64_t n) {
    const int64_t here = at;
    at += (n + 3) / 4 * 4;  // keep every array 16-byte aligned for float (and int64)
    return here;
  };
  ws.z = take(d.B * d.N);
  ws.w = take(d.B * d.N);
  ws.qnorm = take(d.B);
  ws.qscale = take(d.B);
  ws.knorm = take(d.N);
  ws.kscale = take(d.N);
  ws.mixed_a = take(d.B * d.FA());
  ws.mixed_b = take(d.B * d.FB());
  ws.spill = static_cast<int64_t>(kTokTile) * d.SR() * static_cast<int64_t>(sizeof(acc_t)) > smem_budget;
  ws.row_spill = take(ws.spill ? d.B * d.tiles() * kTokTile * d.SR() : 0);
  const bool mem = backward && memory_grads;
  ws.h = take(mem ? d.B * d.T * d.SR() : 0);
  ws.dh = take(mem ? d.B * d.T * d.SR() : 0);
  ws.dmix_a = take(mem ? d.B * d.FA() : 0);
  ws.dmix_b = take(mem ? d.B * d.FB() : 0);
  ws.dw_part = take(mem ? d.B * d.col_chunks() * d.N : 0);
  ws.dz = take(mem ? d.B * d.N : 0);
  constexpr int64_t per_offset = (static_cast<int64_t>(sizeof(int64_t)) + sizeof(acc_t) - 1) / sizeof(acc_t);
  ws.offsets = take(d.offset_uploads() > 0 ? d.S * per_offset : 0);
  ws.total = at;
  return ws;
}

inline int64_t dyn_smem_bytes(const Dims& d, const Workspace& ws, int64_t acc_size) {
  return ws.spill ? 0 : static_cast<int64_t>(kTokTile) * d.SR() * acc_size;
}

// ------------------------------------------------------------------------------------------------
// The launch list of a call: which kernels, in which order, with how many blocks and how much dynamic
// shared memory. The launch functions below walk this list, the CUDA glue checks it before any work
// (grid limits), and the emulation reports it, so there is one source for all three.
// ------------------------------------------------------------------------------------------------

enum class Kernel : int { kOffsets, kRetrieve, kApply, kBwdTokens, kBwdFactors, kBwdScores, kBwdMemory };

inline const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::kOffsets: return "mira_offsets_kernel";
    case Kernel::kRetrieve: return "mira_retrieve_kernel";
    case Kernel::kApply: return "mira_apply_kernel";
    case Kernel::kBwdTokens: return "mira_bwd_tokens_kernel";
    case Kernel::kBwdFactors: return "mira_bwd_factors_kernel";
    case Kernel::kBwdScores: return "mira_bwd_scores_kernel";
    case Kernel::kBwdMemory: return "mira_bwd_memory_kernel";
  }
  return "?";
}

struct LaunchSpec {
  Kernel kernel;
  int64_t blocks;    // 1-D grid of kThreads-thread blocks
  int64_t smem;      // dynamic shared memory in bytes
  int64_t part;      // mira_offsets_kernel: which kOffsetUpload-chunk of the offsets
};

// A call's launches, in order (a short vector: host code only).
struct LaunchList {
  std::vector<LaunchSpec> items;
  void add(Kernel k, int64_t blocks, int64_t smem = 0, int64_t part = 0) {
    items.push_back(LaunchSpec{k, blocks, smem, part});
  }
};

inline void add_offset_uploads(const Dims& d, LaunchList& list) {
  for (int64_t p = 0; p < d.offset_uploads(); ++p) list.add(Kernel::kOffsets, 1, 0, p);
}

// mira_adapter_ (and the adapter part of mira_linear): B == 0 launches nothing, and neither does an empty
// memory (N == 0), which adds exactly zero without reading x (contract section 1): the apply kernel's
// x A_b^T with A_b = 0 is NaN where x holds an inf, which its add would write into out's slices.
inline LaunchList adapter_launches(const Dims& d, const Workspace& ws, int64_t acc_size) {
  LaunchList list;
  if (d.B == 0 || d.N == 0) return list;
  const bool apply = d.T > 0 && d.d_s > 0;
  if (apply) add_offset_uploads(d, list);
  list.add(Kernel::kRetrieve, d.retrieve_blocks());
  if (apply) list.add(Kernel::kApply, d.B * d.tiles(), dyn_smem_bytes(d, ws, acc_size));
  return list;
}

// Whether the backward runs its memory kernels (factors, scores, memory) for the memory gradients asked for:
// not for an empty memory (N == 0), which reads neither query nor keys (contract section 5; the reference's
// dquery is exact zeros there, where the scores kernel's normalisation backward made NaN of a NaN or inf
// query), and whose dkeys and dbanks have no elements.
inline bool runs_memory_kernels(const Dims& d, bool need_q, bool need_k, bool need_a, bool need_b) {
  return d.N > 0 && (need_q || need_k || need_a || need_b);
}

// The adapter part of the backward: need_x (dx += sum_s dh_s A_b,s) and the memory gradients asked for.
inline LaunchList backward_launches(const Dims& d, const Workspace& ws, int64_t acc_size, bool need_x, bool need_q,
                                    bool need_k, bool need_a, bool need_b) {
  LaunchList list;
  // An empty memory adds exactly zero: dx is the G W it holds on entry (the tokens kernel's zero factors
  // would turn an inf of G into NaN), and the memory gradients are the caller's zeros.
  if (d.B == 0 || d.N == 0) return list;
  const bool mem = runs_memory_kernels(d, need_q, need_k, need_a, need_b);
  const bool tokens = d.T > 0 && (mem || need_x);
  if (tokens || mem) add_offset_uploads(d, list);
  list.add(Kernel::kRetrieve, d.retrieve_blocks());
  if (tokens) list.add(Kernel::kBwdTokens, d.B * d.tiles(), dyn_smem_bytes(d, ws, acc_size));
  if (!mem) return list;
  // With T == 0 the factor gradients are zero: the factors kernel writes them (its loop over T is empty).
  list.add(Kernel::kBwdFactors, d.B * d.col_chunks());
  list.add(Kernel::kBwdScores, d.B);
  const int64_t memory_blocks = ((need_a || need_b) ? d.N * d.col_chunks() : 0) + (need_k ? d.N : 0);
  if (memory_blocks > 0) list.add(Kernel::kBwdMemory, memory_blocks);
  return list;
}

// Whether the caller must zero the memory gradients it hands to launch_backward (dquery, dkeys, dbank_a,
// dbank_b) before the call. With B == 0 they are sums over no samples, exactly zero, and backward_launches is
// empty (a grid of zero blocks cannot be launched), so no kernel writes them; with N == 0 no memory kernel runs
// (runs_memory_kernels) and dquery is zero. Otherwise the launches write every element of each gradient asked
// for, whatever T, S or d_s (the emulation hands them over NaN-filled to check that). The CUDA glue allocates
// with at::zeros when this holds, at::empty otherwise.
inline bool caller_zeroes_memory_grads(const Dims& d) { return d.B == 0 || d.N == 0; }

// Why a launch list cannot run (a grid or shared-memory limit), or null. The CUDA glue raises it before
// it launches or allocates anything, so a call that fails changes nothing.
inline const char* grid_error(const LaunchList& list) {
  for (const LaunchSpec& l : list.items) {
    if (l.blocks > kMaxGrid) return "a grid would exceed 2^31 - 1 blocks";
    if (l.smem > kSmemBudget) return "the dynamic shared memory would exceed its budget";
  }
  return nullptr;
}

}  // namespace mira_cuda

// MIRA_LAUNCH(fn, spec, stream, args): launch kernel `fn` with the grid and shared memory of `spec`.
// The CUDA includer defines MIRA_CHECK_LAUNCH() (the launch-error check) before including.
#ifdef __CUDACC__
#define MIRA_LAUNCH(fn, spec, stream, args)                                                                   \
  do {                                                                                                        \
    fn<<<static_cast<unsigned>((spec).blocks), ::mira_cuda::kThreads, (spec).smem, (stream)>>>(args);         \
    MIRA_CHECK_LAUNCH();                                                                                      \
  } while (0)
#else
#define MIRA_LAUNCH(fn, spec, stream, args)                                                                   \
  do {                                                                                                        \
    (void)(stream); /* the emulation runs launches in order, synchronously */                                 \
    ::emu::launch(::mira_cuda::kernel_name((spec).kernel), (fn), (spec).blocks, ::mira_cuda::kThreads,        \
                  (spec).smem, (args));                                                                       \
  } while (0)
#endif

namespace mira_cuda {

// Pointers of one call; null where not used. The caller owns every buffer.
template <typename scalar_t, typename acc_t>
struct CallBuffers {
  const scalar_t* x;
  scalar_t* out;  // forward: in place
  int64_t out_sb, out_st, out_se;
  const scalar_t* grad;  // backward
  int64_t g_sb, g_st, g_se;
  scalar_t* dx;  // backward: G W on entry, or null
  const acc_t *query, *keys, *bank_a, *bank_b;
  acc_t *dq, *dk, *dbank_a, *dbank_b;  // backward outputs or null
  acc_t* ws;                           // plan_workspace(...).total elements
};

template <typename scalar_t, typename acc_t>
inline void fill_args(const Dims& d, const int64_t* offsets, int sep, double scale, double eps,
                      const CallBuffers<scalar_t, acc_t>& cb, const Workspace& ws, MemoryArgs<acc_t>& m,
                      TokenArgs<scalar_t, acc_t>& t) {
  m = MemoryArgs<acc_t>{};
  m.B = d.B, m.N = d.N, m.d_k = d.d_k, m.FA = d.FA(), m.FB = d.FB(), m.bt = d.sample_tile();
  m.sep = sep;
  m.eps = static_cast<acc_t>(eps);
  m.query = cb.query, m.keys = cb.keys, m.bank_a = cb.bank_a, m.bank_b = cb.bank_b;
  m.z = cb.ws + ws.z, m.w = cb.ws + ws.w, m.qnorm = cb.ws + ws.qnorm, m.knorm = cb.ws + ws.knorm;
  m.qscale = cb.ws + ws.qscale, m.kscale = cb.ws + ws.kscale;
  m.mixed_a = cb.ws + ws.mixed_a, m.mixed_b = cb.ws + ws.mixed_b;
  m.dmix_a = cb.ws + ws.dmix_a, m.dmix_b = cb.ws + ws.dmix_b, m.dz = cb.ws + ws.dz;
  m.dw_part = cb.ws + ws.dw_part;
  m.dq = cb.dq, m.dk = cb.dk, m.dbank_a = cb.dbank_a, m.dbank_b = cb.dbank_b;

  t = TokenArgs<scalar_t, acc_t>{};
  t.B = d.B, t.T = d.T, t.d_in = d.d_in, t.S = d.S, t.r = d.r, t.d_s = d.d_s;
  if (d.offset_uploads() > 0) {
    t.offsets_dev = reinterpret_cast<const int64_t*>(cb.ws + ws.offsets);
  } else {
    for (int64_t s = 0; s < d.S; ++s) t.offsets[s] = offsets[s];
  }
  t.scale = static_cast<acc_t>(scale);
  t.x = cb.x, t.out = cb.out, t.out_sb = cb.out_sb, t.out_st = cb.out_st, t.out_se = cb.out_se;
  t.grad = cb.grad, t.g_sb = cb.g_sb, t.g_st = cb.g_st, t.g_se = cb.g_se, t.dx = cb.dx;
  t.mixed_a = m.mixed_a, t.mixed_b = m.mixed_b;
  t.dmix_a = cb.ws + ws.dmix_a, t.dmix_b = cb.ws + ws.dmix_b;
  t.N = d.N, t.bank_a = cb.bank_a, t.bank_b = cb.bank_b, t.dw_part = cb.ws + ws.dw_part;
  t.row_spill = ws.spill ? cb.ws + ws.row_spill : nullptr;
}

// Runs one launch of a list; the kernel's arguments are m (memory kernels) or t (token kernels).
template <typename scalar_t, typename acc_t, typename stream_t>
inline void run_launch(const LaunchSpec& l, const Dims& d, const int64_t* offsets, const CallBuffers<scalar_t, acc_t>& cb,
                       const Workspace& ws, const MemoryArgs<acc_t>& m, const TokenArgs<scalar_t, acc_t>& t,
                       stream_t stream) {
  switch (l.kernel) {
    case Kernel::kOffsets: {
      OffsetUpload u{};
      const int64_t first = l.part * kOffsetUpload;
      u.dst = reinterpret_cast<int64_t*>(cb.ws + ws.offsets) + first;
      u.count = d.S - first < kOffsetUpload ? d.S - first : kOffsetUpload;
      for (int64_t i = 0; i < u.count; ++i) u.values[i] = offsets[first + i];
      auto* k = &mira_offsets_kernel;
      MIRA_LAUNCH(k, l, stream, u);
      break;
    }
    case Kernel::kRetrieve: {
      auto* k = &mira_retrieve_kernel<acc_t>;
      MIRA_LAUNCH(k, l, stream, m);
      break;
    }
    case Kernel::kApply: {
      auto* k = &mira_apply_kernel<scalar_t, acc_t>;
      MIRA_LAUNCH(k, l, stream, t);
      break;
    }
    case Kernel::kBwdTokens: {
      auto* k = &mira_bwd_tokens_kernel<scalar_t, acc_t>;
      MIRA_LAUNCH(k, l, stream, t);
      break;
    }
    case Kernel::kBwdFactors: {
      auto* k = &mira_bwd_factors_kernel<scalar_t, acc_t>;
      MIRA_LAUNCH(k, l, stream, t);
      break;
    }
    case Kernel::kBwdScores: {
      auto* k = &mira_bwd_scores_kernel<acc_t>;
      MIRA_LAUNCH(k, l, stream, m);
      break;
    }
    case Kernel::kBwdMemory: {
      auto* k = &mira_bwd_memory_kernel<acc_t>;
      MIRA_LAUNCH(k, l, stream, m);
      break;
    }
  }
}

// out[..., slices] += scale * adapter(x): adapter_launches(...) (retrieval, apply, and offset uploads when
// S > kMaxSlices). The caller has checked grid_error.
template <typename scalar_t, typename acc_t, typename stream_t>
inline void launch_adapter(const Dims& d, const int64_t* offsets, int sep, double scale, double eps,
                           const CallBuffers<scalar_t, acc_t>& cb, const Workspace& ws, stream_t stream) {
  const LaunchList list = adapter_launches(d, ws, sizeof(acc_t));
  if (list.items.empty()) return;
  MemoryArgs<acc_t> m;
  TokenArgs<scalar_t, acc_t> t;
  fill_args(d, offsets, sep, scale, eps, cb, ws, m, t);
  for (const LaunchSpec& l : list.items) run_launch(l, d, offsets, cb, ws, m, t, stream);
}

// The adapter part of the backward: dx += sum_s dh_s A_b,s (dx holds G W on entry; cb.dx null when not asked)
// and the memory gradients asked for (need_q, need_k, need_a, need_b). The caller has checked grid_error.
template <typename scalar_t, typename acc_t, typename stream_t>
inline void launch_backward(const Dims& d, const int64_t* offsets, int sep, double scale, double eps,
                            const CallBuffers<scalar_t, acc_t>& cb, const Workspace& ws, bool need_q, bool need_k,
                            bool need_a, bool need_b, stream_t stream) {
  const LaunchList list = backward_launches(d, ws, sizeof(acc_t), cb.dx != nullptr, need_q, need_k, need_a, need_b);
  if (list.items.empty()) return;
  MemoryArgs<acc_t> m;
  TokenArgs<scalar_t, acc_t> t;
  fill_args(d, offsets, sep, scale, eps, cb, ws, m, t);
  if (!need_q) m.dq = nullptr;
  if (!need_k) m.dk = nullptr;
  if (!need_a) m.dbank_a = nullptr;
  if (!need_b) m.dbank_b = nullptr;
  if (runs_memory_kernels(d, need_q, need_k, need_a, need_b)) {
    t.h = cb.ws + ws.h;
    t.dh = cb.ws + ws.dh;
  }
  for (const LaunchSpec& l : list.items) run_launch(l, d, offsets, cb, ws, m, t, stream);
}

}  // namespace mira_cuda
