// C++ CPU backend of the MIRA ops: mira::_cpu_mira_linear, _cpu_mira_linear_backward, _cpu_mira_adapter_.
//
// Semantics are mira_kernels/reference.py's (the specification). How the work is laid out:
//
// Forward, float32/float64 ("seeded accumulator"): ATen's addmm for a Linear with bias first
// writes the broadcast bias into the output and then runs one GEMM with beta = 1 over it. This
// kernel writes `bias + scale * (x A_b^T) B_b^T` into the Q/V slices (and the bias elsewhere) in
// that same write pass, then calls the same beta = 1 GEMM over the whole batch. The adapter
// therefore costs no pass over the output beyond the one the stock Linear makes anyway, and the
// base GEMM is one call over all B*T rows, MKL's weight packing amortised over them (per-sample
// GEMM calls, plain or MKL-packed for M = T, were slower than one call in every measurement here:
// benchmarks/results/op_cpu.md). No packed weight is cached, so nothing needs invalidating. With
// an empty memory (N = 0) the op is the stock Linear for contiguous x, bit for bit: ATen's addmm's
// two steps (bias copy, beta = 1 GEMM), the copy made with streaming stores where the rule below
// says so, so that the adapter path and its base path differ by the adapter only. (For strided x,
// at::linear takes its matmul path while the op makes x contiguous first: a different summation.)
// Tried at batch 1, where the output (1.8 MB) stays in cache: the GEMM first (beta = 0, so that the
// output's reads-for-ownership happen under the compute-bound GEMM instead of in the seeding pass),
// then bias and adapter added in place. Zen 5 (AMD family 26 model 2, AVX-512, 2 threads, ViT-B/16
// block 0's installed projection, caches evicted before each call, 2500 rounds interleaved with the
// seeded order in one process, 2026-12-06): +0.1 us [-4.4, +5.4] per call. No gain; not kept.
// Also tried there (2026-12-07): the memory side on the calling thread alone while the other thread
// computed the first 16 output columns (bias + x W^T, one single-threaded MKL call inside the region),
// the seeding pass then adding the adapter to those columns and the beta = 1 GEMM covering the rest,
// so that the banks' DRAM stream would run beside GEMM work. Slower: +66 us [44, 102] and +45 us
// [33, 56] per call (two runs of 400 rounds interleaved with this layout call by call, block 0's
// projection, caches evicted). One thread draws almost what two do, but not quite: alone, retrieval
// 13.3 and mixing 43.6 us against 8.7 and 30.8 on two threads; the other thread's 16 columns took
// 65-93 us cold (55 hot) plus 4-6 us to enter ATen from a worker, so the region outlasted the memory
// side, and the remaining GEMM was not the 16 columns' share shorter. On two cores the bank stream
// and the GEMM compete for the same cores: the floor's max(arithmetic, bytes) is not reachable here.
//
// The memory side runs once per call: cosine scores, separation, and the per-sample mixed
// factors A_b (S*r, d_in) and B_b, kept transposed and pre-scaled as (S, r, d_s). Tokens are
// processed in blocks of up to kRowBlock rows of one sample (the threads split the rows evenly):
// the shrink h = x A_b^T (dot_block), then each output row written left to right, the slices'
// expand (axpy_block) and the bias between them, row block in cache (apply_rows).
//
// Backward: a pass over token blocks recomputes h, forms dh = G_s B_b and writes the adapter part
// of dx (dh A_b); a pass over (sample, feature chunk) reduces dA_b = dh^T x and dB_b = scale G_s^T h
// over the sample's tokens in token order; then dx += G W with one beta = 1 GEMM, and the small
// (B, N)-sized tail: dw, separation and cosine backward, dbank = w^T dA / w^T dB (ordered over b).
// Streaming stores: the seeding pass writes the whole output (14.5 MB at B = 8), which the GEMM
// then reads back; with ordinary stores each written line is first read from memory (the write
// allocates it in cache) and is long evicted by the time the GEMM gets to it. When the output
// cannot stay in the threads' L2 caches anyway, the seeding pass writes it with non-temporal
// stores, which skip that read: measured at B = 8, the op over nn.Linear went from +1.40% to +0.92%
// (benchmarks/results/op_cpu.md). Two cases where they lose, both measured: an output that stays
// in cache (B = 1, 1.7 MiB: on the Zen 5 +0.27%, on a Zen 3 with 512 KiB L2 per core ~100 us per
// call; see kStreamMinBytes), and freshly mapped pages (B >= 24: glibc maps blocks over 32 MiB anew
// on every allocation, the first touch of each page faults, the kernel zeroes it through the cache,
// and a streaming store to a cached line costs more than a plain one: +1.6%). So the pass streams
// only when the output exceeds (threads x L2), 2 MiB and a quarter of the last-level cache (a 300 MiB
// L3 keeps a 14.5 MB output for the GEMM; see kStreamLlcShare) and its pages are resident (mincore); the stored
// values are the same either way. Only a pass that writes each element once streams (an expand
// over more than one register block of coefficients re-reads its output between blocks: kernels.h,
// axpy_block_nt), so the backward's dx seeding pass (K = S*r) streams under the same rule only
// where S*r fits one block.
//
// Every reduction of this file has a fixed order, so results are bitwise identical run to run
// (and across thread counts); only the two MKL GEMMs (base projection and G W) are the GEMM
// library's, which is deterministic run to run at a fixed thread count for a given alignment.
//
// 16-bit x: the adapter path runs in float32 (x, the memory side and grad_out converted once);
// the base projection runs in x's dtype through at::linear / at::mm, and the sum is rounded once
// to x's dtype, as the reference does. This path favours exact reference semantics over speed
// (it keeps a float32 copy of x and of the output).
//
// 16-bit banks (contract section 4: bfloat16 / float16 bank_a, bank_b with float32 compute): the
// mixing reads them in their 2-byte storage and widens each element exactly as it loads it
// (axpy_block_bf16 / _f16), so the call computes the bits of the same call with a float32 copy of
// the banks while reading half the bytes; at batch 1 those bytes come from DRAM on every call and
// set the adapter's floor (benchmarks/latency.py). The backward, not on that path, converts them.
//
// Instruction sets: the hot loops (kernels_<isa>.cpp) are compiled for baseline x86-64, AVX2+FMA
// and AVX-512; the best one the CPU supports is used, or the one named by the environment
// variable MIRA_CPU_ISA (auto | baseline | avx2 | avx512), read at every call by active_table().
// MIRA_CPU_STREAM (auto | 0 | 1) forces the store choice above, for tests and benchmarks.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <sys/mman.h>
#include <unistd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/mira_linear_cpu.h"
#include "env.h"
#include "validation.h"

#if MIRA_CPU_X86
#include <xmmintrin.h>
#else
#include <atomic>
#endif

namespace mira_cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Instruction-set selection.
// ---------------------------------------------------------------------------------------------

bool cpu_supports(std::string_view isa) {
  if (isa == "baseline") return true;
#if MIRA_CPU_X86
  __builtin_cpu_init();  // libgcc's checks include the OS's XSAVE support of the wider registers
  // F16C too: the avx2 kernels widen binary16 banks with it (every AVX2 CPU made has it).
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == "avx2") return avx2;
  if (isa == "avx512") return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#endif
  return false;  // off x86-64 only the portable baseline exists
}

// Makes this thread's streaming stores visible before another thread reads what they wrote.
inline void store_fence() {
#if MIRA_CPU_X86
  _mm_sfence();
#else
  std::atomic_thread_fence(std::memory_order_release);  // no streaming stores here: ordinary ordering
#endif
}

constexpr std::array<const char*, 3> kIsas = {"baseline", "avx2", "avx512"};

// Each table is built on first use only, and only after the CPU check: the avx2/avx512 table()
// functions are themselves compiled for that instruction set.
const IsaTable& table_of(std::string_view isa) {
#if MIRA_CPU_X86
  if (isa == "avx512") {
    static const IsaTable t = avx512::table();
    return t;
  }
  if (isa == "avx2") {
    static const IsaTable t = avx2::table();
    return t;
  }
#endif
  static const IsaTable t = baseline::table();
  return t;
}

// The one place MIRA_CPU_ISA is read (documented in mira_kernels/_config.py, parsed by csrc/env.h).
const IsaTable& active_table() {
  const std::string want = mira::env_choice("MIRA_CPU_ISA", "auto", {"auto", "baseline", "avx2", "avx512"});
  if (want == "auto") {
    for (auto it = kIsas.rbegin(); it != kIsas.rend(); ++it)
      if (cpu_supports(*it)) return table_of(*it);
  }
  TORCH_CHECK(cpu_supports(want), "MIRA_CPU_ISA=", want, " but this CPU does not support that instruction set");
  return table_of(want);
}

template <typename T>
const Kernels<T>& kernels_of(const IsaTable& t);
template <>
const Kernels<float>& kernels_of<float>(const IsaTable& t) {
  return t.f32;
}
template <>
const Kernels<double>& kernels_of<double>(const IsaTable& t) {
  return t.f64;
}

// [active, supported...]: for tests and benchmark records.
std::vector<std::string> isa_info() {
  std::vector<std::string> out{active_table().name};
  for (const char* isa : kIsas)
    if (cpu_supports(isa)) out.emplace_back(isa);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Store choice of the seeding passes (see the file comment).
// ---------------------------------------------------------------------------------------------

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? int64_t(v) : int64_t(1) << 20;  // unknown: assume 1 MiB
  }();
  return bytes;
}

// Whether the pages under [p, p + bytes) have been touched: looked at the first, middle and last
// page (an allocation is either recycled heap memory, all resident, or a fresh mapping, none).
bool pages_resident(const void* p, int64_t bytes) {
  static const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p), hi = lo + uintptr_t(bytes) - 1;
  for (const uintptr_t at : {lo, lo + (hi - lo) / 2, hi}) {
    unsigned char in_core = 0;
    if (mincore(reinterpret_cast<void*>(at & ~(page - 1)), page, &in_core) != 0 || !(in_core & 1)) return false;
  }
  return true;
}

// Size of the largest cache level, from sysfs (under KVM glibc's sysconf can report a bogus or no
// L3: on the Xeon below it reports none), else sysconf's L3, else 0 (unknown).
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t best = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string path = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size";
      FILE* f = std::fopen(path.c_str(), "r");
      if (!f) continue;
      long long v = 0;
      char unit = 0;
      const int got = std::fscanf(f, "%lld%c", &v, &unit);
      std::fclose(f);
      if (got < 1 || v <= 0) continue;
      const int64_t scale = unit == 'K' ? 1 << 10 : unit == 'M' ? 1 << 20 : unit == 'G' ? 1 << 30 : 1;
      best = std::max(best, int64_t(v) * scale);
    }
    if (best == 0) {
      const long v = sysconf(_SC_LEVEL3_CACHE_SIZE);
      best = v > 0 ? int64_t(v) : 0;
    }
    return best;
  }();
  return bytes;
}

// An output up to this share of the last-level cache stays there until the GEMM reads it back
// (beside the GEMM's own x and weights), so ordinary stores win: a ViT-B/16 qkv output at B = 8,
// 14.5 MB, is 45% of a Zen 5 / Zen 3 CCD's 32 MiB L3, where streaming won (+1.40% -> +0.92%, see
// above), and 5% of a 2-core Xeon VM's 300 MiB L3 (GenuineIntel family 6 model 207), where
// streaming lost: module over nn.Linear, cold caches, 120 interleaved rounds in one process,
// +652 us per call streaming against +109 us with ordinary stores (the GEMM then reads the
// streamed output back from DRAM, ~30 GB/s there, instead of from the L3).
constexpr int64_t kStreamLlcShare = 4;  // stream only above LLC / 4

// Outputs up to this size stay cached until the GEMM reads them back, on every machine measured
// (the last-level caches there are 32 MiB): a ViT-B/16 qkv output at B = 1, 1.7 MiB, lost with
// streaming stores on the Zen 5 (2 x 1 MiB L2: +0.27%) and on a 2-core Zen 3 (2 x 512 KiB L2, where
// threads x L2 alone would stream it: module over nn.Linear, cold caches, streaming 335 us
// [284, 381] per call against 234 us [190, 289] with ordinary stores); at B = 2 (3.5 MiB) streaming
// won on the Zen 5.
constexpr int64_t kStreamMinBytes = int64_t(2) << 20;

// The seeding pass streams an output (pages resident) larger than this many bytes: one that would
// not stay in the threads' L2 caches, nor in a quarter of the last-level cache.
int64_t stream_threshold_bytes() {
  return std::max({at::get_num_threads() * l2_cache_bytes(), kStreamMinBytes,
                   last_level_cache_bytes() / kStreamLlcShare});
}

// The one place MIRA_CPU_STREAM is read (documented in mira_kernels/_config.py, parsed by csrc/env.h).
std::string stream_mode() { return mira::env_choice("MIRA_CPU_STREAM", "auto", {"auto", "1", "0"}); }

bool stream_seeding(const at::Tensor& out) {
  const std::string want = stream_mode();
  if (want == "0") return false;
  if (want == "1") return true;
  if (!MIRA_CPU_X86) return false;  // no streaming stores there: the portable kernel's are ordinary
  const int64_t bytes = out.nbytes();
  return bytes > stream_threshold_bytes() && pages_resident(out.const_data_ptr(), bytes);
}

// ---------------------------------------------------------------------------------------------
// Phase clock of the forward: where one call's time goes (benchmarks/budget.py). Off, it costs a
// thread-local load per phase; _cpu_phase_clock(True) turns it on for the calling thread, and
// _cpu_last_phases() reads the last forward's phases there (the fast path's calls included).
// ---------------------------------------------------------------------------------------------

enum Phase { kEntry, kRetrieval, kMixing, kSeeding, kGemm, kPhases };

struct PhaseClock {
  std::array<double, kPhases> seconds{};
  std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
};

thread_local PhaseClock* phase_clock = nullptr;
thread_local PhaseClock phase_clock_state;

void set_phase_clock(bool on) { phase_clock = on ? &phase_clock_state : nullptr; }

// [entry: checks and allocation, retrieval, mixing, seeding pass (bias and shrink/expand; for
// 16-bit x the whole adapter), GEMM], seconds. An N = 0 call with a bias charges its bias copy to
// seeding (one without a bias, or in 16 bits, is a single at::linear, charged to the GEMM).
std::vector<double> last_phases() {
  return std::vector<double>(phase_clock_state.seconds.begin(), phase_clock_state.seconds.end());
}

// Charges the time since the previous mark to phase p.
void mark(Phase p) {
  if (!phase_clock) return;
  const auto now = std::chrono::steady_clock::now();
  phase_clock->seconds[p] += std::chrono::duration<double>(now - phase_clock->last).count();
  phase_clock->last = now;
}

// ---------------------------------------------------------------------------------------------
// Memory side: scores, separation, mixed factors.
// ---------------------------------------------------------------------------------------------

constexpr double kNormEps = 1e-12;  // reference.NORM_EPS, the cosine's norm floor
constexpr int64_t kRowBlock = 16;   // tokens per task: x rows (16 x d_in) and the output rows stay in L1/L2
constexpr int64_t kFeatureGrain = 1024;
// Mixing (mix_columns): threads split the columns in whole cache lines of floats, at least
// kMixGrainLines (4 KiB) each; a pass over the slots covers up to kMixAccumulator accumulator
// elements (64 KiB in float32: L2-resident on any x86-64 or Arm core in use).
constexpr int64_t kMixLine = 16, kMixGrainLines = 64, kMixAccumulator = 16384;

enum class Sep { Affine, Softmax, Relu, Tanh, Sigmoid, Identity };

Sep parse_separation(std::string_view s) {
  if (s == "affine") return Sep::Affine;
  if (s == "softmax") return Sep::Softmax;
  if (s == "relu") return Sep::Relu;
  if (s == "tanh") return Sep::Tanh;
  if (s == "sigmoid") return Sep::Sigmoid;
  if (s == "identity") return Sep::Identity;
  TORCH_CHECK(false, "unknown separation '", std::string(s),
              "'; expected one of affine, softmax, relu, tanh, sigmoid, identity");
}

struct Shapes {
  int64_t B, T, d_in, N, d_k, S, r, d_s, SR;
  std::vector<int64_t> offsets;
};

// The problem's sizes. The arguments have passed the op contract's checks (csrc/validation.h,
// run first by every op here); what is left is this backend's own precondition.
Shapes shapes_of(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& bank_a, const at::Tensor& bank_b,
                 at::IntArrayRef slice_offsets) {
  TORCH_CHECK(x.device().is_cpu(), "mira CPU kernel: the inputs must be CPU tensors, got ", x.device());
  // Both variables are judged on every call, whichever path (N = 0, 16-bit, ...) it takes.
  active_table();
  stream_mode();
  Shapes s{x.size(0), x.size(1), x.size(2), keys.size(0), keys.size(1), bank_a.size(1), bank_a.size(2),
           bank_b.size(2), 0, std::vector<int64_t>(slice_offsets.begin(), slice_offsets.end())};
  s.SR = s.S * s.r;
  return s;
}

// Scratch for the mixed factors, one buffer per calling thread, reused across calls. The factors
// are 2*B*S*r*d floats (384 KiB at ViT-B/16 qkv shapes, B = 8): allocated fresh, a buffer that size
// comes from mmap and page-faults on every call (measured: ~70 minor faults per forward at B = 8).
// A buffer grown beyond kScratchKeep bytes is released when its lease ends, so one huge batch does
// not pin memory. A lease taken while another is live on the same thread (no op nests, but nothing
// here relies on that) gets a private buffer instead.
constexpr size_t kScratchKeep = size_t(16) << 20;

template <typename T>
class ScratchLease {
 public:
  explicit ScratchLease(size_t n) : shared_(!slot().busy), buf_(shared_ ? slot().buf : own_) {
    if (shared_) slot().busy = true;
    if (buf_.size() < n) buf_.resize(n);
  }
  ~ScratchLease() {
    if (!shared_) return;
    if (buf_.capacity() * sizeof(T) > kScratchKeep) std::vector<T>().swap(buf_);
    slot().busy = false;
  }
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  T* data() { return buf_.data(); }

 private:
  struct Slot {
    std::vector<T> buf;
    bool busy = false;
  };
  static Slot& slot() {
    thread_local Slot s;
    return s;
  }
  bool shared_;
  std::vector<T> own_;
  std::vector<T>& buf_;
};

// Everything the adapter needs that does not depend on the tokens, in compute dtype T.
template <typename T>
struct Memory {
  explicit Memory(const Shapes& s) : factors(s.B * s.SR * (s.d_in + s.d_s)) {
    A = factors.data();
    Bt = A + s.B * s.SR * s.d_in;
  }
  // The retrieval in double (retrieve_in_double), kept for the backward's (B, N)-sized tail, which
  // runs in double too: a zero query's gradient is its unit gradient / 1e-12 (the norm floor), so
  // float rounding in dz (e.g. softmax's w (g - <w, g>), exactly zero-sum in double) came out
  // amplified by 1e12 (found by tests/test_properties.py: -7450 where the reference gives 0).
  std::vector<double> q_unit, k_unit, q_norm, k_norm;  // (B, d_k), (N, d_k), (B), (N); units only
  std::vector<double> scores, weights64;               // (B, N); units only
  std::vector<T> weights;                              // (B, N), for the mixing
  ScratchLease<T> factors;
  T* A;   // (B, S*r, d_in): sum_n w[b,n] bank_a[n]
  T* Bt;  // (B, S, r, d_s): scale * (sum_n w[b,n] bank_b[n])^T, or unscaled (out_scale)
  T out_scale = T(1);  // what the finished sums h B_b^T (forward) and G B_b (backward) are multiplied by: 1, or scale
};

template <typename T>
void separate_rows(Sep sep, const T* z, T* w, int64_t B, int64_t N, T eps) {
  for (int64_t b = 0; b < B; ++b) {
    const T* zb = z + b * N;
    T* wb = w + b * N;
    switch (sep) {
      case Sep::Affine: {
        if (N == 1) {  // one slot: the raw cosine is the weight
          wb[0] = zb[0];
          break;
        }
        T total = 0;
        for (int64_t n = 0; n < N; ++n) total += zb[n];
        // Sign-preserving clamp of the denominator (sign of 0 taken as +), as the reference.
        const T denom = std::abs(total) >= eps ? total : (total >= 0 ? eps : -eps);
        for (int64_t n = 0; n < N; ++n) wb[n] = zb[n] / denom;
        break;
      }
      case Sep::Softmax: {
        T m = -INFINITY;
        for (int64_t n = 0; n < N; ++n) m = std::max(m, zb[n]);
        T total = 0;
        for (int64_t n = 0; n < N; ++n) total += (wb[n] = std::exp(zb[n] - m));
        for (int64_t n = 0; n < N; ++n) wb[n] /= total;
        break;
      }
      case Sep::Relu:  // `z <= 0 ? 0 : z` keeps a NaN score NaN, as torch.relu (`z > 0 ? z : 0` dropped it)
        for (int64_t n = 0; n < N; ++n) wb[n] = zb[n] <= 0 ? T(0) : zb[n];
        break;
      case Sep::Tanh:
        for (int64_t n = 0; n < N; ++n) wb[n] = std::tanh(zb[n]);
        break;
      case Sep::Sigmoid:
        for (int64_t n = 0; n < N; ++n) wb[n] = T(1) / (T(1) + std::exp(-zb[n]));
        break;
      case Sep::Identity:
        for (int64_t n = 0; n < N; ++n) wb[n] = zb[n];
        break;
    }
  }
}

// Contiguous tensor of dtype `dt` (no copy when it already is one).
at::Tensor as(const at::Tensor& t, at::ScalarType dt) { return t.to(dt).contiguous(); }

// Scores and weights are computed in double for every input dtype, then rounded once. Affine
// separation divides by sum_n z, which is near zero for a few percent of queries (more as N grows)
// and then amplifies the scores' rounding error by up to 1/eps: in float32 the kernel exceeded
// twice plain PyTorch's error at N = 100. The cost, B*N*d_k multiply-adds, is nothing next to the
// projection.
//
// The (B, d_k) and (N, d_k) inputs are read straight into double, whatever their dtype and strides:
// two Tensor::to(kDouble) conversions cost ~45 us per call here, more than the arithmetic.
void row_in_double(const at::Tensor& t, int64_t i, double* out) {
  const int64_t n = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "mira_row_in_double", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>() + i * s0;
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<double>(p[j * s1]);
  });
}

// z[b,n] = (q_b . k_n) / (max(|q_b|, 1e-12) max(|k_n|, 1e-12)), the contract's cosine, from one
// pass over the keys: each key row is read once, into double, and dotted with itself and with every
// query; no normalised copy of the keys is written unless the backward needs it (`units`). The
// forward and the backward both score this way, so they see the same weights. `serial`: all keys on
// the calling thread (see prepare_memory); else parallel over the keys: cold after the GEMM, two
// threads keep twice the misses in flight (serial, an older two-region version of this was ~55 us
// at B = 8, N = 30).
// The norm of row u (n doubles) and the cosine's denominator for it, max(||u||, 1e-12), exact: where
// ||u||^2 overflows (float64 rows beyond ~1e154, or an inf entry) the row is divided in place by
// m = max_j |u_j| first (||u|| = m ||u / m||, as reference.normalize); the denominator is then that of
// the scaled row, so the scores and unit vectors computed from it are unchanged. An inf entry makes
// the scaled row NaN, as u / ||u|| does. Returns {||u||, denominator}.
std::pair<double, double> exact_norm(const Kernels<double>& K, double* u, int64_t n) {
  double sq;
  K.dot_block(1, 1, n, u, n, u, n, &sq, 1, 1.0);
  if (!std::isinf(sq)) {
    const double norm = std::sqrt(sq);
    return {norm, std::max(norm, kNormEps)};
  }
  double m = 0;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, std::abs(u[j]));
  for (int64_t j = 0; j < n; ++j) u[j] /= m;
  K.dot_block(1, 1, n, u, n, u, n, &sq, 1, 1.0);
  const double scaled = std::sqrt(sq);
  return {m * scaled, scaled};
}

// Below this many multiply-adds (B * N * d_k) a forward call scores the keys inside the mixing's
// parallel region (prepare_memory): 30 keys of 768 at batch 1 are 23K.
// Tried and measured slower (batch 1, N = 30, Zen 4 AVX-512, 2 threads, one process, interleaved):
// keys scored 8 at a time (a unit-stride conversion of 8 rows, their 8 norm chains and the 8 dots as
// one dot_block tile, bit-identical) took the retrieval phase from 19.5 to 26.0 us cold and 14.7 to
// 17.2 us warm, and chunks of 2 and 4 lay in between; prefetching the next key rows changed nothing.
// perf (one thread, warm) puts a third of the phase in the row conversion's loads.
// What did pay: float32 keys read as float32 and summed in one pass per key (key_dot_f32: square and
// dot sums with four accumulators each, where dot_block's single chain per sum was latency-bound and
// ran twice per key after a scalar conversion): retrieval phase 19.0-19.4 -> 12.9-13.5 us cold and
// 14.8-15.4 -> 6.7-9.0 us warm (benchmarks.budget, B = 1, runs alternated with the previous build).
// Then all queries at once per key (key_dots_f32: the key widened and squared once, not per query):
// Xeon family 6 model 207 (AVX-512), B = 8, caches evicted, 3 runs alternated with the previous
// build, 2026-12-06: retrieval 44.5 / 51.4 / 44.0 -> 39.7 / 42.4 / 43.5 us. What is left there is
// memory latency, not arithmetic (phase marks inside, same machine, B = 8 cold: scratch allocation
// 4.5 us, query rows 4.7, their norms 1.9, the scoring region 19.5, separation 1.6); prefetching the
// query rows or the keys at op entry, or a kept query buffer, moved that time between the parts.
// Raising the threshold to 2^18 (B = 8 scored inside the mixing's region, on every thread) measured no
// better on a 2-vCPU Xeon (family 6 model 207, B = 8, caches evicted, 3 alternated runs, 2026-12-06):
// retrieval + mixing 105.7-116.3 us against 107.6-121.7.
constexpr int64_t kKeyGrain = 8, kSerialScoreMacs = int64_t(1) << 16;

template <typename T>
void retrieve_in_double(const IsaTable& isa, const Shapes& s, const at::Tensor& query, const at::Tensor& keys,
                        Sep sep, double eps, bool serial, std::vector<T>& weights_out, Memory<T>* units_out) {
  const bool units = units_out != nullptr;
  const Kernels<double>& K = kernels_of<double>(isa);
  std::vector<double> q(s.B * s.d_k), q_norm(s.B), k_norm(s.N), dots(s.B * s.N), k_unit(units ? s.N * s.d_k : 0);
  std::vector<double> q_den(s.B), k_den(s.N);  // the cosine's denominators (exact_norm)
  for (int64_t b = 0; b < s.B; ++b) {
    double* qb = q.data() + b * s.d_k;
    row_in_double(query, b, qb);
    std::tie(q_norm[b], q_den[b]) = exact_norm(K, qb, s.d_k);
  }
  // float32 keys in rows of unit stride (the layers' keys): each key row is read once, as float32,
  // and its square and dot sums run in one pass (key_dots_f32, all queries at once). A row whose square sum overflows
  // goes the exact way below (scaled first), as every other key layout does.
  const float* keys32 = keys.scalar_type() == at::kFloat && (keys.stride(1) == 1 || s.d_k <= 1) && s.B > 0
                            ? keys.const_data_ptr<float>()
                            : nullptr;
  const auto score = [&](int64_t begin, int64_t end) {
    std::vector<double> row;  // a key row in double, for the general path only
    for (int64_t n = begin; n < end; ++n) {
      if (keys32) {
        const float* k = keys32 + n * keys.stride(0);
        double sq = 0;
        K.key_dots_f32(s.B, s.d_k, q.data(), s.d_k, k, dots.data() + n, s.N, &sq);
        if (!std::isinf(sq)) {
          k_norm[n] = std::sqrt(sq);
          k_den[n] = std::max(k_norm[n], kNormEps);
          if (units) {
            const double inv = 1.0 / k_den[n];
            for (int64_t j = 0; j < s.d_k; ++j) k_unit[n * s.d_k + j] = static_cast<double>(k[j]) * inv;
          }
          continue;
        }
      }
      row.resize(s.d_k);
      row_in_double(keys, n, row.data());
      std::tie(k_norm[n], k_den[n]) = exact_norm(K, row.data(), s.d_k);
      K.dot_block(s.B, 1, s.d_k, q.data(), s.d_k, row.data(), s.d_k, dots.data() + n, s.N, 1.0);
      if (units) {
        const double inv = 1.0 / k_den[n];
        for (int64_t j = 0; j < s.d_k; ++j) k_unit[n * s.d_k + j] = row[j] * inv;
      }
    }
  };
  if (serial)
    score(0, s.N);
  else
    at::parallel_for(0, s.N, kKeyGrain, score);
  std::vector<double> weights(s.B * s.N);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t n = 0; n < s.N; ++n)
      dots[b * s.N + n] /= q_den[b] * k_den[n];
  separate_rows(sep, dots.data(), weights.data(), s.B, s.N, eps);
  weights_out.assign(weights.begin(), weights.end());
  if (!units) return;
  Memory<T>& m = *units_out;
  m.q_unit.resize(s.B * s.d_k);
  for (int64_t b = 0; b < s.B; ++b) {
    const double inv = 1.0 / q_den[b];
    for (int64_t j = 0; j < s.d_k; ++j) m.q_unit[b * s.d_k + j] = q[b * s.d_k + j] * inv;
  }
  m.k_unit = std::move(k_unit);
  m.q_norm = std::move(q_norm);
  m.k_norm = std::move(k_norm);
  m.scores = std::move(dots);
  m.weights64 = std::move(weights);
}

// Contiguous view of t in dtype ct without a dispatcher call when it already is one (Tensor::to
// always goes through the dispatcher, which costs microseconds with the caches cold).
at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType ct) {
  return t.scalar_type() == ct && t.is_contiguous() ? t : as(t, ct);
}

// One bank as the mixing reads it: contiguous, in its stored dtype when that is 16-bit storage and
// T is float (widened exactly on load by the axpy_block_bf16 / _f16 kernels, so the 2-byte bank is
// read, never copied to float32), else converted to T (float32 banks are already so: no copy).
struct BankOperand {
  at::Tensor t;
  at::ScalarType dt;
};

template <typename T>
BankOperand bank_operand(const at::Tensor& bank) {
  const at::ScalarType dt = bank.scalar_type();
  if (std::is_same_v<T, float> && (dt == at::kBFloat16 || dt == at::kHalf))
    return {bank.is_contiguous() ? bank : bank.contiguous(), dt};
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  return {as_contiguous(bank, ct), ct};
}

// From this many rows of C (the batch) on, the mixing keeps every slot's term in registers
// (mix_block); below, it takes axpy_block's AK-slot tiles, whose AK concurrent row streams the
// hardware prefetchers follow better when the banks come from DRAM and nothing else is to be saved.
// (mix_block at B = 1, with its prefetches, measured the same: mixing 36.3-41.0 us against 38.3-39.0,
// Xeon family 6 model 207, caches evicted, 3 alternated runs.)
constexpr int64_t kMixResidentRows = 2;

// C[j, :] = sum_k coef[j, k] V[k, :] (axpy_block) with V the bank's elements from `offset` on.
template <typename T>
void mix_rows(const Kernels<T>& K, const BankOperand& bank, int64_t offset, int64_t J, int64_t Kn, int64_t n,
              const T* coef, int64_t csj, int64_t csk, int64_t ldv, T* C, int64_t ldc) {
  const void* base = bank.t.const_data_ptr();
  const bool resident = J >= kMixResidentRows;
  switch (bank.dt) {
    case at::kBFloat16:
      (resident ? K.mix_block_bf16 : K.axpy_block_bf16)(J, Kn, n, coef, csj, csk,
                                                         static_cast<const Bf16*>(base) + offset, ldv, C, ldc, nullptr,
                                                         false);
      break;
    case at::kHalf:
      (resident ? K.mix_block_f16 : K.axpy_block_f16)(J, Kn, n, coef, csj, csk, static_cast<const F16*>(base) + offset,
                                                       ldv, C, ldc, nullptr, false);
      break;
    default:
      (resident ? K.mix_block : K.axpy_block)(J, Kn, n, coef, csj, csk, static_cast<const T*>(base) + offset, ldv, C,
                                              ldc, nullptr, false);
  }
}

// Bt (S, r, d_s) of one sample = sc * the columns [f0, f1) of its mixed bank_b row t (t[0] is
// column f0), column f being (slice, e, k) with f = (slice * d_s + e) * r + k. Runs of whole
// e-groups inside one slice go k by k, each a contiguous run of Bt read at stride r. Element by
// element with the index arithmetic, this transpose took ~6 us of one thread at ViT-B/16 shapes,
// all of it on the thread that mixes bank_b's columns at batch 1; this form cut the mixing phase
// from 76.5 / 75.8 to 69.2 / 73.3 us single-threaded (Zen 4, alternated runs, load ~3).
// Tried (Xeon family 6 model 207, AVX-512, 2026-12-06): each run as one transpose that GCC 12
// vectorizes (constant r, whole-vector loads and vpermt2ps). Mixing phase, alternated runs: B = 8
// 85.9 / 83.3 / 81.1 -> 77.9 / 70.8 / 75.7 us cold, but B = 1 53-55 -> 58-59 us cold and 25-29 ->
// 26-33 warm, and perf (B = 1, warm) put 4.3 us of CPU in the vector transpose against 1.2 us for
// this loop inlined. Not kept: batch 1 is the tighter target.
template <typename T>
void write_bt(const Shapes& s, const T* t, int64_t f0, int64_t f1, T sc, T* Bt) {
  const int64_t group = s.r * s.d_s;
  for (int64_t f = f0; f < f1;) {
    const int64_t sl = f / group, e = f % group / s.r, k = f % s.r;
    const int64_t e_end = std::min(s.d_s, e + (f1 - f) / std::max<int64_t>(s.r, 1));
    if (k != 0 || e_end == e) {  // a partial e-group at either end: element by element
      Bt[(sl * s.r + k) * s.d_s + e] = sc * t[f - f0];
      ++f;
      continue;
    }
    for (int64_t kk = 0; kk < s.r; ++kk) {
      const T* src = t + (f - f0) + kk;
      T* dst = Bt + (sl * s.r + kk) * s.d_s;
      for (int64_t i = 0; i < e_end - e; ++i) dst[e + i] = sc * src[i * s.r];
    }
    f += (e_end - e) * s.r;
  }
}

// The mixing: A_b = sum_n w[b,n] bank_a[n] and Bt_b = scale * (sum_n w[b,n] bank_b[n])^T, seen as
// one row of F = Fa + Fb columns per slot (bank_a's row, then bank_b's; each bank's rows are
// contiguous, so the whole of it is one array). Each thread takes one contiguous range of these
// columns, whole cache lines, and sweeps every slot's part of it in slot order: every bank byte is
// read once, in long sequential runs that the hardware prefetchers follow, and at batch 1, where
// the banks come from DRAM on every call, the threads stream equal shares concurrently. (Split over
// slots instead, the partial sums would need a reduction in a thread-dependent order.) The earlier
// layout, 48 tasks of 1 KiB columns each reading its 1 KiB piece of all 30 bank rows, took 65.5 us
// against 54.6 us for this one (Zen 4, batch 1, ViT-B/16 qkv, N = 30, 2 threads, the banks of 12
// blocks cycled so that they come from DRAM, medians interleaved in one process), and
// single-threaded 104 us against 72 us.
// A pass over the slots covers at most kMixAccumulator accumulator elements (B rows of its
// columns), so that at larger batches the accumulators stay in L2 while the bank rows stream past.
// Tried at batch 1 (Zen 5, AMD family 26 model 2, AVX-512, 2026-12-07): 16 bank rows per sweep over
// the accumulator instead of axpy_block's 4 (one output row needs 16 + 2 registers). In a standalone
// harness, two threads each mixing 737 KB cold, 15-16 us against 20-21 (8 rows: 20; 24 or 30: 25-30);
// called as the op right after a 96 MB read, mixing phase 21-29 us against 28-34. But where it counts,
// block 0's installed projection with the caches as benchmarks.budget leaves them, 300 rounds
// alternated call by call in one process: +1.1 us [+0.2, +1.7]. Not kept.
// And at batch 1 on a Zen 4 (AMD family 25 model 17, AVX-512, 2 threads, block 0's shapes, caches evicted,
// each variant in its own process, alternated, 2026-12-08): software prefetches into L2 in axpy_block's
// rows, 1, 2 or 4 KiB ahead (mix_block's prefetches into L2 took its B = 8 phase from ~111 to ~80 us
// there): mixing 45.9 / 46.2 / 47.6 and 44.8 / 42.0 / 47.9 us against 45.8 / 44.8 without. Its four row
// streams are already followed by the hardware prefetchers; not kept. Nor mix_block at batch 1 with
// those prefetches: 28.5 / 46.6 / 49.2 against 42.8 / 42.7 / 42.9 (the first a run whose entry phase,
// 5.9 us, says its caches were not cold).
// B's columns are mixed in the bank's (S, d_s, r) order into a per-thread buffer, then written
// transposed and scaled into Bt. Every element is the same ordered FMA chain over n (axpy_block),
// whatever the split, the pass width or the thread count.
// This function mixes the columns of cache lines [begin, end) (kMixLine columns each, mix_lines in
// all); the caller splits the lines among the threads (prepare_memory).
template <typename T>
void mix_columns(const Kernels<T>& K, const Shapes& s, const BankOperand& ba, const BankOperand& bb, const T* w,
                 T sc, T* A, T* Bt, int64_t begin, int64_t end) {
  const int64_t Fa = s.SR * s.d_in, Fb = s.SR * s.d_s, F = Fa + Fb;
  const int64_t width = std::max<int64_t>(kMixLine, kMixAccumulator / std::max<int64_t>(s.B, 1) / kMixLine * kMixLine);
  std::vector<T> tmp;  // (B, this pass's columns of bank_b), in the bank's order
  const int64_t f_end = std::min(end * kMixLine, F);
  for (int64_t c0 = begin * kMixLine; c0 < f_end; c0 += width) {
    const int64_t c1 = std::min(c0 + width, f_end);
    if (c0 < Fa) mix_rows<T>(K, ba, c0, s.B, s.N, std::min(c1, Fa) - c0, w, s.N, 1, Fa, A + c0, Fa);
    if (c1 <= Fa) continue;
    const int64_t b0 = std::max(c0, Fa) - Fa, nb = c1 - Fa - b0;
    tmp.resize(s.B * nb);
    mix_rows<T>(K, bb, b0, s.B, s.N, nb, w, s.N, 1, Fb, tmp.data(), nb);
    for (int64_t b = 0; b < s.B; ++b) write_bt(s, tmp.data() + b * nb, b0, b0 + nb, sc, Bt + b * Fb);
  }
}

// Cache lines of mixing columns, F = S*r*(d_in + d_s) columns in all.
int64_t mix_lines(const Shapes& s) { return (s.SR * (s.d_in + s.d_s) + kMixLine - 1) / kMixLine; }

// Fills m (constructed for s): retrieval in double, then the mixing (mix_columns), the threads
// splitting the columns. A small retrieval (below kSerialScoreMacs) of a forward call runs inside
// the mixing's parallel region instead, on every thread: each thread scores the keys itself (the
// same code on the same inputs, so the same weights, bit for bit) and goes on to its columns, with
// no barrier between. Why: at batch 1 the scoring is tiny, and its own parallel region costs more
// than it saves. The first region of a call pays for waking the other threads (~8 us here between
// calls), wherever it is: on a 2-core Zen 4 with the retrieval serial, its phase took 25.5 us
// against 33.5 us parallel, but the mixing then took 61.3 us against 52.2 (medians, one process).
// In one region the calling thread scores while the others wake up: retrieval + mixing measured
// 73 / 85 / 85 us against 76 / 92 / 98 us for the two regions (3 alternated runs, load ~2.1), and
// it is one region fewer per call: with other work on the machine (load 3-4 on 2 cores) each
// region, waiting for a descheduled thread, cost ~8 ms. The backward, which keeps the unit vectors, and larger
// retrievals score the keys first (serially too when small, in parallel over the keys otherwise).
// Tried and measured no better (batch 1, Zen 4 AVX-512, 2 threads, caches evicted, benchmarks.budget, runs
// alternated with the unchanged build): each thread requesting its first 64-512 KiB of bank lines into L2
// (prefetcht1, a share after each key) while it scores. The mixing phase fell from ~44 to ~34 us, but the
// retrieval rose from ~20 to ~30 us: retrieval + mixing stayed at 59-68 us either way. The two phases
// together already draw the banks at ~28 GB/s of the ~35 GB/s the machine streams (2 threads).
// Also tried at batch 1 (same machine and method, 2026-12-05, the output bit for bit the same): one
// task per slice in a single region (mix its A rows, shrink all tokens, mix its B rows, write its own
// output columns), with bank_b's lines prefetched to L2 during the shrink so that those DRAM reads
// would overlap its arithmetic. Retrieval + mixing + seeding: 161-249 us against 149-153 us for
// this layout; the prefetches stalled the shrink (17.6 -> 45.5 us: the misses they queue fill the
// core's miss buffers) and without them the split only moved the same work between the phases.
// And on a 2-vCPU Xeon (family 6 model 207, AVX-512; benchmarks.budget, B = 1, 3 runs alternated with
// the unchanged build, 2026-12-06): the other threads, instead of scoring too, claimed 2 KiB column
// chunks from one counter and prefetched them into L2 (they held 5-6 of 24, ~370 KB, when the weights
// were published ~18 us in), then everyone mixed the rest by claims. Retrieval + mixing: 70.7-74.2 us
// against 74.5-77.1 with guided claims, and 69.3-75.5 against 67.6-74.3 with claims from both ends;
// the scoring thread's phase rose by 2-4 us (its key reads now share the memory with the prefetches),
// and the mixing after it, ~21 GB/s, is bound by what one core draws from L3 or DRAM (~16-27 GB/s
// here), not by the bytes left. No gain beyond the machine's drift between runs.
// And on Zen 5 (AMD family 26 model 2, AVX-512, 2 threads, B = 1, N = 30, affine, 2026-12-06): the scoring
// folded into the mixing, 4 keys scored and then their bank rows mixed, the sample's affine factor
// (1 / the clamped sum) applied to the mixed columns at the end, so that the key reads go with the bank
// stream instead of before it (identity, relu, tanh and sigmoid bit for bit as before). Retrieval + mixing,
// caches evicted, 800 rounds interleaved in one process: 48.9 us against 44.2, and 46.9 with the next
// 4 keys prefetched during each step's mixing; at module level, -1.3 us [-8.4, +5.6]. Not kept.
// Also on that Zen 5 (same method, 300 rounds, 2026-12-06): the keys shared among the region's threads
// (claims of 4 keys from one counter, a spin wait until all are scored, then every thread separating on
// its own), the output bit for bit the same. Retrieval phase +0.8 us [+0.6, +1.0], retrieval + mixing
// +0.6 [+0.2, +1.0]. Timestamps inside one call say why: both threads enter ~1.5 us after the region
// starts, their query rows take ~2.5 us, and then a claim of 4 keys costs ~1 us (the first ~2): the
// scoring of all 30 keys is ~8 us of the phase on one thread, ~4 us split, and the wait and the copies
// took the rest back. And the banks and keys in 2 MiB pages (madvise(MADV_HUGEPAGE), so that the
// bank stream meets no 4 KiB page walk or prefetcher stop): mixing 35.6 against 36.3 us cold, 35.8
// against 35.8 warm; retrieval 10.6 against 10.8. The stream is bound by what the two cores draw.
// And the prefetching helpers again on that Zen 5 (B = 1, caches evicted, benchmarks.budget, each
// variant behind an environment switch and alternated with it off in the same build, 2026-12-07),
// retrieval + mixing in us, variant against the unchanged path: the second thread requesting its
// whole column share into L2 (prefetcht1) before it scores, 61.5 / 48.5 against 64.0 / 47.8; the
// second thread not scoring but prefetching its share while the first scores, then mixing with the
// first's weights, 45.0 / 45.1 against 44.0 / 43.6 (the first thread's share, alone on the memory
// after its scoring, is the longer path); and it prefetching (or loading) 2 KiB column chunks
// claimed from a counter until the weights are published, then both mixing the rest by claims,
// 58.0 / 57.1 (prefetches) and 55.5 / 60.6 (loads) against 45.6 / 55.8 (claims cut each slot's
// stream into 2 KiB runs that the hardware prefetchers must start again).
// And overlapping the bank stream with the base GEMM instead (same Zen 5, B = 1, caches evicted,
// 2026-12-07). Retrieval + mixing on one thread alone take 53-60 us against 12.6 + 41.6 on both: the
// second thread buys almost nothing there, so the calling thread ran a panel of the GEMM meanwhile
// (columns no slice touches, ATen's addmm_ on a column view; MKL runs single-threaded inside the
// region; output bit for bit the same). But every GEMM call packs all of x (197 x 768) whatever its
// width: the panel took 121 / 122 / 165 / 267 us at 8 / 16 / 32 / 64 columns (alone, cold: 112 /
// 116 / 156 / 256 us), and the module came out +36 us [18, 51] over the unchanged one (32 columns,
// 192 interleaved rounds). Packing x on that thread with MKL's packed API instead (cblas_sgemm_pack,
// ~81 us cold on one thread, longer than the window), then cblas_sgemm_compute (bit-identical to
// addmm here), saves only ~17 us of the GEMM (paired median of 150 rounds). Not kept.
// And within one thread, the bank stream interleaved with the shrink's arithmetic so that the core
// would run FMAs while bank lines arrive (same Zen 5, 2026-12-07; a standalone harness on the B = 1
// shapes, one thread, banks cold, x and A_b in cache, AVX-512): mixing B_b alone 39-40 us, the shrink
// alone 20-24, one after the other 61-64; each mixed row of B_b followed by an eighth of the shrink,
// 57-59; every shrink step issuing 2 / 3 / 4 vector steps of the mixing, 62 / 56-58 / 52 (with
// software prefetches 50-55); A_b mixed and shrunk column chunk by column chunk, 62-97 (short runs
// of each bank row). One core's stream is bound by the misses it keeps in flight, and FMAs queued
// behind them fill the reorder window: at best 12 us of the 62 are hidden, where a perfect overlap
// would hide the shorter part, ~22. Not pursued.
// Where scale goes. For |scale| <= 1 it is folded into Bt: one multiply per mixed element instead of
// one per token, and it cannot overflow there. Otherwise (and for a NaN scale) Bt is mixed unscaled
// and m.out_scale = scale multiplies each finished sum, in the reference's order: the forward's
// h B_b^T (apply_rows) and the backward's dh = G B_b (the dot's alpha, applied after its sum).
// Folded in, a large scale overflowed where the reference stays finite: scale * B_b itself (scale
// 1e30, banks 1e10 in float32: every adapted output inf), and the products h_j (scale B_j) or
// G_e (scale B_e) whose sum cancels or lies near the dtype's largest value (found by probing,
// 2026-12-07 for the forward, 2026-12-08 for the backward, whose dx, dquery, dkeys and dbank_a came
// out inf / NaN where the reference's are 0; docs/contract.md section 6).
template <typename T>
void prepare_memory(const IsaTable& isa, const Shapes& s, const at::Tensor& query, const at::Tensor& keys,
                    const at::Tensor& bank_a, const at::Tensor& bank_b, Sep sep, double scale, double eps,
                    Memory<T>& m, bool units) {
  const bool scale_last = !(std::abs(scale) <= 1.0);
  const Kernels<T>& K = kernels_of<T>(isa);
  const BankOperand ba = bank_operand<T>(bank_a), bb = bank_operand<T>(bank_b);
  const bool small = s.B * s.N * s.d_k < kSerialScoreMacs;
  const T sc = scale_last ? T(1) : T(scale);
  if (scale_last) m.out_scale = T(scale);
  if (units || !small || s.B == 0) {
    retrieve_in_double(isa, s, query, keys, sep, eps, small, m.weights, units ? &m : nullptr);
    mark(kRetrieval);
    if (s.B == 0) return;
    at::parallel_for(0, mix_lines(s), kMixGrainLines, [&](int64_t begin, int64_t end) {
      mix_columns<T>(K, s, ba, bb, m.weights.data(), sc, m.A, m.Bt, begin, end);
    });
  } else {
    at::parallel_for(0, mix_lines(s), kMixGrainLines, [&](int64_t begin, int64_t end) {
      std::vector<T> w;
      retrieve_in_double<T>(isa, s, query, keys, sep, eps, true, w, nullptr);
      mark(kRetrieval);  // the calling thread's (the phase clock is thread-local; no-op elsewhere)
      mix_columns<T>(K, s, ba, bb, w.data(), sc, m.A, m.Bt, begin, end);
    });
  }
  mark(kMixing);
}

// ---------------------------------------------------------------------------------------------
// Forward rows: y = (accumulate ? y : bias) + adapter, one (sample, token block) per task.
// ---------------------------------------------------------------------------------------------

// stream: write y with streaming stores (only when not accumulating: an update reads y anyway).
//
// Layout of the pass (at B = 1 on a 2-core Zen 3 its arithmetic is ~30 us, and the earlier layout
// took ~190 us, about what writing the 1.8 MB output cold costs when it is not written linearly):
//  - the threads split the B*T rows evenly (a split into whole 16-row blocks gave 112 / 85 rows at
//    T = 197), a block of up to kRowBlock rows never crossing a sample;
//  - per block, the shrink h = x A_b^T, then the output is written kRowsPerSweep rows at a time,
//    left to right: the slices' expand (bias + h B_b^T) and the bias copies of the columns between
//    them in one ascending sweep, so every written line is a sequential store stream that the
//    hardware prefetchers follow (the old layout swept each slice over all rows of the block,
//    then the gaps: three interleaved strided streams per row). Four rows per sweep, the expand's
//    register tile on AVX-512 (two tiles of two on AVX2), load each B_b vector once for the four
//    (with two rows per sweep the AVX-512 expand ran two one-row tiles): single-threaded on a Zen 4
//    (batch 1, 12 blocks cycled, cold output) the pass's time over the bias-only pass went from
//    141 us to 91 us; one row per sweep, the stores one stream but B_b reloaded for every row,
//    was slower than either;
//  - the shrink of a sweep's rows right before their stores, not of the whole block up front: the
//    output's stores are the pass's bottleneck (each line a read-for-ownership from L3 or DRAM), and
//    a 4-row shrink (~800 cycles of FMAs and x reads) runs while the store buffer still drains the
//    previous sweep, where a 16-row one left the stores idle for most of its ~3000 cycles. Measured
//    on a 2-vCPU Xeon (family 6 model 207, AVX-512; ViT-B/16 qkv, N = 30, caches evicted, both forms
//    interleaved call by call in one process, 100 rounds, the seeding pass over the bias-only one,
//    paired medians, 2026-12-06): B = 8: 281 / 174 -> 213 / 132 us in two runs; B = 1: 6.0 -> 3.6 us.
//    (Software prefetches of the next sweeps' x rows measured worse: 134-159 us against 115; the
//    shrink of every row in a pass of its own, before the stores, took 284 us alone with x coming
//    from L3, while the expand pass after it cost nothing over the bias-only one.)
//  - what the pass's extra time is made of, Zen 5 (AMD family 26 model 2, AVX-512, 2026-12-06): the
//    hot loops alone (kernels_avx512.cpp linked into a small harness, one thread, hot caches, the
//    B = 1 shapes) run the shrink at 81 GMAC/s, the peak at the 2.6 GHz that /proc/cpuinfo reports
//    (83), and the expand with its stores at 59 GMAC/s (15 and 20 us; the bias copy of the whole
//    output 16 us). Inside the op (one thread, repeated calls) the pass took 57 us over the bias-only
//    one, 38 without the shrink, 40 without the expand, 11.5 with neither (the sweeps' bias copies
//    against ATen's copy_), each in its own process: about twice the arithmetic. The rest is memory,
//    x's and the output's lines coming from L3 or DRAM (an L3 shared with the host's other tenants).
//    Requesting the next sweep's output lines for writing (prefetchw) before each shrink took 4 us
//    off the pass (repeated calls, interleaved), but nothing measurable off the projection with the
//    caches as a network leaves them (-0.8 us [-6.4, +5.0], 2500 interleaved rounds): not kept.
//  - tried (Zen 4, AMD family 25 model 17, AVX-512, 2 threads, block 0's shapes, caches evicted, each
//    variant in its own process, alternated, 2026-12-08): the bias copies of the columns between the
//    slices made during the shrink, a few vector stores after each of its vector steps, so that the
//    stores would drain while the FMAs ran (outputs bit for bit the same). Seeding phase, medians of
//    150-300 calls: B = 8 615.6 / 622.4 us against 611.8 / 604.8; B = 1 142.2 / 142.8 / 129.4 / 128.3 /
//    134.4 against 90.4 / 88.6 / 89.6 / 91.8 / 90.9. Not kept: the stores do not stall the shrink's
//    FMAs as that idea assumed, and at B = 1, where the output's lines are read for ownership, the
//    interleaved stores slowed the shrink.
// Every element is still the same ordered FMA chain (dot_block, axpy_block), so the values are unchanged.
template <typename T>
void apply_rows(const Kernels<T>& K, const Shapes& s, const Memory<T>& m, const T* x, T* y, int64_t d_out,
                const T* bias, bool accumulate, bool stream) {
  TORCH_INTERNAL_ASSERT(!(stream && accumulate), "streaming stores are for the seeding pass only");
  if (s.B == 0 || s.T == 0) return;
  // An output row in ascending column order: slices (slice >= 0) and the columns between them (-1).
  struct Segment {
    int64_t lo, hi, slice;
  };
  std::vector<Segment> segments;
  {
    std::vector<int64_t> order(s.S);
    for (int64_t i = 0; i < s.S; ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s.offsets[a] < s.offsets[b]; });
    int64_t lo = 0;
    for (const int64_t sl : order) {
      const int64_t off = s.offsets[sl];
      if (off > lo) segments.push_back({lo, off, -1});
      segments.push_back({off, off + s.d_s, sl});
      lo = off + s.d_s;
    }
    if (lo < d_out) segments.push_back({lo, d_out, -1});
  }
  const int64_t Fa = s.SR * s.d_in, Fb = s.S * s.r * s.d_s;
  constexpr int64_t kRowsPerSweep = 4;  // rows written together: B_b's vectors loaded once for them
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(s.N > 0, "the ops handle an empty memory without the row pass");
  const bool scale_last = m.out_scale != T(1);
  at::parallel_for(0, s.B * s.T, kRowBlock, [&](int64_t begin, int64_t end) {
    std::vector<T> h(kRowBlock * std::max<int64_t>(s.SR, 1));  // one buffer per thread, not per block
    std::vector<T> sum(scale_last ? kRowsPerSweep * s.d_s : 0);  // scale_last: a sweep's h B_b^T
    for (int64_t row = begin; row < end;) {
      const int64_t b = row / s.T, t0 = row % s.T;
      const int64_t rows = std::min({kRowBlock, s.T - t0, end - row});
      const T* xr = x + row * s.d_in;
      T* yr = y + row * d_out;
      const T* A = m.A + b * Fa;
      const T* Bt = m.Bt + b * Fb;
      for (int64_t t = 0; t < rows; t += kRowsPerSweep) {
        const int64_t n = std::min(kRowsPerSweep, rows - t);
        K.dot_block(n, s.SR, s.d_in, xr + t * s.d_in, s.d_in, A, s.d_in, h.data() + t * s.SR, s.SR, T(1));  // shrink
        T* yt = yr + t * d_out;
        for (const Segment& g : segments) {
          if (g.slice >= 0 && !scale_last) {  // expand: (bias or y or 0) + h_slice (scale B_slice)^T
            (stream ? K.axpy_block_nt : K.axpy_block)(n, s.r, s.d_s, h.data() + t * s.SR + g.slice * s.r, s.SR, 1,
                                                      Bt + g.slice * s.r * s.d_s, s.d_s, yt + g.lo, d_out,
                                                      bias ? bias + g.lo : nullptr, accumulate);
          } else if (g.slice >= 0) {  // (bias or y or 0) + scale * (h_slice B_slice^T), the reference's order
            K.axpy_block(n, s.r, s.d_s, h.data() + t * s.SR + g.slice * s.r, s.SR, 1, Bt + g.slice * s.r * s.d_s,
                         s.d_s, sum.data(), s.d_s, nullptr, false);
            for (int64_t i = 0; i < n; ++i) {
              T* dst = yt + i * d_out + g.lo;
              const T* src = sum.data() + i * s.d_s;
              for (int64_t j = 0; j < s.d_s; ++j)
                dst[j] = (accumulate ? dst[j] : bias ? bias[g.lo + j] : T(0)) + m.out_scale * src[j];
            }
          } else if (!accumulate) {
            for (int64_t i = 0; i < n; ++i) {
              T* dst = yt + i * d_out;
              if (bias && stream)
                K.copy_nt(g.hi - g.lo, bias + g.lo, dst + g.lo);
              else if (bias)
                std::copy(bias + g.lo, bias + g.hi, dst + g.lo);
              else
                std::fill(dst + g.lo, dst + g.hi, T(0));
            }
          }
        }
      }
      row += rows;
    }
    if (stream) store_fence();  // this thread's streaming stores, visible before the GEMM reads y
  });
}

// y = broadcast bias with streaming stores: the seeding pass of a Linear without an adapter (the
// N = 0 op) where the store rule streams; elsewhere that op makes ATen's addmm's bias copy.
template <typename T>
void stream_bias(const Kernels<T>& K, const T* bias, T* y, int64_t rows, int64_t d_out) {
  at::parallel_for(0, rows, kRowBlock, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) K.copy_nt(d_out, bias, y + t * d_out);
    store_fence();
  });
}

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

at::ScalarType compute_type(at::ScalarType x) { return is_half(x) ? at::kFloat : x; }

template <typename T>
void adapter_into(const Shapes& s, const at::Tensor& x_ct, at::Tensor& y_ct, const at::Tensor& query,
                  const at::Tensor& keys, const at::Tensor& bank_a, const at::Tensor& bank_b, Sep sep, double scale,
                  double eps, const at::Tensor* bias_ct, bool accumulate) {
  const IsaTable& isa = active_table();
  const Kernels<T>& K = kernels_of<T>(isa);
  Memory<T> m(s);
  // |scale| > 1 is applied last, as the reference does: folded into B_b (one multiply per mixed
  // element instead of one per output element) it can overflow where the reference is finite.
  prepare_memory<T>(isa, s, query, keys, bank_a, bank_b, sep, scale, eps, m, false);
  const bool stream = !accumulate && stream_seeding(y_ct);
  apply_rows<T>(K, s, m, x_ct.data_ptr<T>(), y_ct.data_ptr<T>(), y_ct.size(-1),
                bias_ct ? bias_ct->data_ptr<T>() : nullptr, accumulate, stream);
}

void adapter_dispatch(const Shapes& s, const at::Tensor& x_ct, at::Tensor& y_ct, const at::Tensor& query,
                      const at::Tensor& keys, const at::Tensor& bank_a, const at::Tensor& bank_b, Sep sep,
                      double scale, double eps, const at::Tensor* bias_ct, bool accumulate) {
  if (x_ct.scalar_type() == at::kDouble)
    adapter_into<double>(s, x_ct, y_ct, query, keys, bank_a, bank_b, sep, scale, eps, bias_ct, accumulate);
  else
    adapter_into<float>(s, x_ct, y_ct, query, keys, bank_a, bank_b, sep, scale, eps, bias_ct, accumulate);
}

// ---------------------------------------------------------------------------------------------
// The ops.
// ---------------------------------------------------------------------------------------------

}  // namespace

at::Tensor mira_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& query, const at::Tensor& keys, const at::Tensor& bank_a,
                           const at::Tensor& bank_b, at::IntArrayRef slice_offsets, c10::string_view separation,
                           double scale, double eps) {
  if (phase_clock) *phase_clock = PhaseClock{};
  // The checks cost ~0.1-0.2 us of the entry phase's 4-6 us at batch 1 (benchmarks.budget on a Zen 5
  // with them switched off, 2026-12-07): an eval plan gains nothing by skipping them. Nor did
  // requesting the forward's code into L2 here (the first 4 or 8 KiB of each of 11 hot functions,
  // in case cold instruction fetches were the phases' cold-cache excess): entry +2 to +6 us, the
  // later phases within their run-to-run spread (same machine and method, two alternated pairs of
  // runs per size).
  mira::check_linear_args(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps);
  const int64_t d_out = weight.size(0);
  const Shapes s = shapes_of(x, keys, bank_a, bank_b, slice_offsets);
  const Sep sep = parse_separation(std::string_view(separation.data(), separation.size()));
  const bool has_bias = bias.has_value() && bias->defined();

  // An empty memory adds nothing: the op is then the stock Linear, bit for bit for contiguous x. Without a bias
  // (nothing to seed: one beta = 0 GEMM) and in 16 bits it is the same ATen call; with a bias in
  // float32/float64 it is ATen's addmm's two steps (bias copy, beta = 1 GEMM), the copy made with
  // streaming stores where the store rule says so (below).
  if (s.N == 0 && (!has_bias || is_half(x.scalar_type()))) {
    mark(kEntry);
    at::Tensor y = at::linear(x, weight, has_bias ? *bias : at::Tensor());
    mark(kGemm);
    return y;
  }
  if (is_half(x.scalar_type())) {
    // Base projection in x's dtype (as F.linear), adapter in float32, the sum rounded once.
    mark(kEntry);
    at::Tensor y = at::linear(x, weight, has_bias ? *bias : at::Tensor());
    mark(kGemm);
    at::Tensor y32 = as(y, at::kFloat);
    adapter_dispatch(s, as(x, at::kFloat), y32, query, keys, bank_a, bank_b, sep, scale, eps, nullptr, true);
    y.copy_(y32);
    mark(kSeeding);
    return y;
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({s.B, s.T, d_out}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
  mark(kEntry);
  if (s.N == 0) {
    // Where streaming does not pay, ATen's own addmm's two steps (its bias copy measured faster
    // than this file's ordinary-store seeding on freshly faulted pages: +1.3% at B = 32): the copy
    // of the broadcast bias, then the beta = 1 GEMM below, the calls addmm_out makes, so the bits
    // are at::linear's. Made here rather than inside addmm_out so that the phase clock charges the
    // bias copy to seeding, as for the adapter path: benchmarks/budget.py's shrink/expand is the
    // seeding phase over this one (when the copy was charged to the GEMM, the budget showed the
    // whole cold write of the output, ~150 us at B = 1 on a 2-core Zen 3, as adapter cost).
    if (!stream_seeding(y)) {
      y.view({s.B * s.T, d_out}).copy_(bias_c.expand({s.B * s.T, d_out}));
    } else {
      AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mira_stream_bias", [&] {
        stream_bias<scalar_t>(kernels_of<scalar_t>(active_table()), bias_c.const_data_ptr<scalar_t>(),
                              y.data_ptr<scalar_t>(), s.B * s.T, d_out);
      });
    }
  } else {
    adapter_dispatch(s, xc, y, query, keys, bank_a, bank_b, sep, scale, eps, has_bias ? &bias_c : nullptr, false);
  }
  mark(kSeeding);
  // The same beta = 1 GEMM that at::linear / addmm runs after writing the broadcast bias.
  y.view({s.B * s.T, d_out}).addmm_(xc.view({s.B * s.T, s.d_in}), weight.t());
  mark(kGemm);
  return y;
}

namespace {

void mira_adapter_cpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& query, const at::Tensor& keys,
                      const at::Tensor& bank_a, const at::Tensor& bank_b, at::IntArrayRef slice_offsets,
                      c10::string_view separation, double scale, double eps) {
  mira::check_adapter_args(out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps);
  const at::ScalarType ct = compute_type(x.scalar_type());
  const Shapes s = shapes_of(x, keys, bank_a, bank_b, slice_offsets);
  const Sep sep = parse_separation(std::string_view(separation.data(), separation.size()));
  if (out.numel() == 0 || s.N == 0) return;  // an empty memory adds exactly zero
  // Work on a contiguous compute-dtype view of out; copy back only if that had to be a copy.
  at::Tensor work = as(out, ct);
  adapter_dispatch(s, as(x, ct), work, query, keys, bank_a, bank_b, sep, scale, eps, nullptr, true);
  if (work.is_same(out)) return;
  // Back into out's slices only: the columns between them are not the op's to write. A whole-tensor
  // copy_ would round-trip them through the compute dtype, which keeps every number but not a 16-bit
  // NaN's payload (bfloat16 0xFFC3 came back 0xFFFF).
  for (const int64_t off : s.offsets)
    const_cast<at::Tensor&>(out).narrow(-1, off, s.d_s).copy_(work.narrow(-1, off, s.d_s));
}

// ---------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------

template <typename T>
void separate_backward(Sep sep, const T* gw, const T* z, const T* w, T* gz, int64_t B, int64_t N, T eps) {
  for (int64_t b = 0; b < B; ++b) {
    const T *g = gw + b * N, *zb = z + b * N, *wb = w + b * N;
    T* o = gz + b * N;
    switch (sep) {
      case Sep::Identity:
        for (int64_t n = 0; n < N; ++n) o[n] = g[n];
        break;
      case Sep::Affine: {
        if (N == 1) {
          o[0] = g[0];
          break;
        }
        T total = 0, through = 0;
        for (int64_t n = 0; n < N; ++n) total += zb[n];
        for (int64_t n = 0; n < N; ++n) through += g[n] * wb[n];
        const bool open = std::abs(total) >= eps;  // inside the clamp the denominator is a constant
        const T denom = open ? total : (total >= 0 ? eps : -eps);
        if (!open) through = 0;
        for (int64_t n = 0; n < N; ++n) o[n] = (g[n] - through) / denom;
        break;
      }
      case Sep::Softmax: {
        T dot = 0;
        for (int64_t n = 0; n < N; ++n) dot += g[n] * wb[n];
        for (int64_t n = 0; n < N; ++n) o[n] = wb[n] * (g[n] - dot);
        break;
      }
      case Sep::Relu:  // as autograd of torch.relu: `z <= 0 ? 0 : g` passes g for a NaN score (`z > 0` dropped it)
        for (int64_t n = 0; n < N; ++n) o[n] = zb[n] <= 0 ? T(0) : g[n];
        break;
      case Sep::Tanh:
        for (int64_t n = 0; n < N; ++n) o[n] = g[n] * (T(1) - wb[n] * wb[n]);
        break;
      case Sep::Sigmoid:
        for (int64_t n = 0; n < N; ++n) o[n] = g[n] * wb[n] * (T(1) - wb[n]);
        break;
    }
  }
}

// d/du of u / max(||u||, eps) applied to grad_unit, row-wise (reference._normalize_backward).
template <typename T>
void normalize_backward(const Kernels<T>& K, const T* unit, const T* norm, const T* gu, int64_t rows, int64_t n,
                        T* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* u = unit + i * n;
    const T* g = gu + i * n;
    T proj;
    K.dot_block(1, 1, n, u, n, g, n, &proj, 1, T(1));
    const T nrm = norm[i];
    // The unit-vector branch from ||u|| = 1e-12 on (and for NaN), as the reference's `~(norm < eps)`:
    // `nrm > eps` sent a norm of exactly 1e-12 (e.g. u = [1e-12, 0, ...]) to g / eps, dropping the
    // projection that removes g's component along u.
    if (!(nrm < T(kNormEps))) {
      for (int64_t j = 0; j < n; ++j) out[i * n + j] = (g[j] - u[j] * proj) / nrm;
    } else {
      for (int64_t j = 0; j < n; ++j) out[i * n + j] = g[j] / T(kNormEps);
    }
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& bank_a, const at::Tensor& bank_b, const Shapes& s, Sep sep,
    double scale, double eps, std::array<bool, 5> mask) {
  const auto [need_x, need_q, need_k, need_a, need_b] = mask;
  const bool need_w = need_q || need_k;
  const bool need_adapter = need_w || need_a || need_b;
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const IsaTable& isa = active_table();
  const Kernels<T>& K = kernels_of<T>(isa);
  const int64_t d_out = weight.size(0);
  Memory<T> m(s);
  prepare_memory<T>(isa, s, query, keys, bank_a, bank_b, sep, scale, eps, m, true);
  const at::Tensor g = as(grad_out, ct), xc = as(x, ct);
  const T* G = g.data_ptr<T>();
  const T* X = xc.data_ptr<T>();
  const int64_t Fa = s.SR * s.d_in, Fb = s.S * s.r * s.d_s;

  // An empty memory adds exactly zero, and grad_out is not read for it (as x is not in the forward):
  // no pass over the token blocks, whose zero factors would turn an inf of grad_out into NaN.
  const bool empty_memory = s.N == 0;
  at::Tensor dx_adapter = !need_x ? at::Tensor()
                          : empty_memory ? at::zeros({s.B, s.T, s.d_in}, x.options().dtype(ct))
                                         : at::empty({s.B, s.T, s.d_in}, x.options().dtype(ct));
  std::vector<T> dA(need_adapter ? s.B * Fa : 0), dBt(need_adapter ? s.B * Fb : 0);

  // Two parallel phases, so that even B = 1 keeps every thread busy:
  //  1. per (sample, token block): dh = G_s (scale B_b) (Bt pre-scaled, or scale after the sum:
  //     prepare_memory), the adapter part of dx
  //     (dh A_b), and h = x A_b^T when the memory side needs gradients;
  //  2. per (sample, feature chunk): dA_b = dh^T x and dB_b^T = scale h_s^T G_s, each element an
  //     ordered sum over the sample's tokens (no atomics, same bits at any thread count).
  const int64_t blocks = (s.T + kRowBlock - 1) / kRowBlock;
  std::vector<T> h(need_adapter ? s.B * s.T * s.SR : 0), dh(s.B * s.T * s.SR);
  if ((need_x || need_adapter) && s.B * s.T > 0 && !empty_memory) {
    T* DX = need_x ? dx_adapter.data_ptr<T>() : nullptr;
    // dx's adapter part seeds the beta = 1 GEMM below (in 16 bits it is added to, so no streaming).
    const bool stream = need_x && !is_half(x.scalar_type()) && stream_seeding(dx_adapter);
    at::parallel_for(0, s.B * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, t0 = (task % blocks) * kRowBlock;
        const int64_t rows = std::min(kRowBlock, s.T - t0), row0 = b * s.T + t0;
        const T* A = m.A + b * Fa;
        const T* Bt = m.Bt + b * Fb;
        T* dhr = dh.data() + row0 * s.SR;
        for (int64_t sl = 0; sl < s.S; ++sl)
          K.dot_block(rows, s.r, s.d_s, G + row0 * d_out + s.offsets[sl], d_out, Bt + sl * s.r * s.d_s, s.d_s,
                      dhr + sl * s.r, s.SR, m.out_scale);  // dh = G (scale B_b): scale in Bt, or here
        if (need_x)
          (stream ? K.axpy_block_nt : K.axpy_block)(rows, s.SR, s.d_in, dhr, s.SR, 1, A, s.d_in,
                                                    DX + row0 * s.d_in, s.d_in, nullptr, false);
        if (need_adapter)
          K.dot_block(rows, s.SR, s.d_in, X + row0 * s.d_in, s.d_in, A, s.d_in, h.data() + row0 * s.SR, s.SR, T(1));
      }
      if (stream) store_fence();
    });
  }
  if (need_adapter && s.B > 0) {
    constexpr int64_t kChunk = 256;  // feature columns per task: x/G column strips stay in L1/L2
    const int64_t a_chunks = (s.d_in + kChunk - 1) / kChunk, b_chunks = (s.d_s + kChunk - 1) / kChunk;
    const int64_t per_sample = a_chunks + s.S * b_chunks;
    const T sc = T(scale);
    at::parallel_for(0, s.B * per_sample, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / per_sample, c = task % per_sample;
        const T* dhb = dh.data() + b * s.T * s.SR;
        if (c < a_chunks) {
          const int64_t c0 = c * kChunk, n = std::min(kChunk, s.d_in - c0);
          K.axpy_block(s.SR, s.T, n, dhb, 1, s.SR, X + b * s.T * s.d_in + c0, s.d_in, dA.data() + b * Fa + c0, s.d_in,
                       nullptr, false);
        } else {
          const int64_t sl = (c - a_chunks) / b_chunks, e0 = ((c - a_chunks) % b_chunks) * kChunk;
          const int64_t n = std::min(kChunk, s.d_s - e0);
          T* dst = dBt.data() + b * Fb + sl * s.r * s.d_s + e0;
          K.axpy_block(s.r, s.T, n, h.data() + b * s.T * s.SR + sl * s.r, 1, s.SR,
                       G + b * s.T * d_out + s.offsets[sl] + e0, d_out, dst, s.d_s, nullptr, false);
          for (int64_t k2 = 0; k2 < s.r; ++k2)
            for (int64_t i = 0; i < n; ++i) dst[k2 * s.d_s + i] *= sc;
        }
      }
    });
  }

  at::Tensor dx, dq, dk, da, db;
  const auto empty = [&] { return at::empty({0}, x.options()); };
  if (need_x) {
    if (is_half(x.scalar_type())) {
      // Base part in x's dtype (as grad_out @ weight in the reference), the sum rounded once.
      const at::Tensor base = at::mm(grad_out.reshape({s.B * s.T, d_out}), weight);
      dx = dx_adapter.add_(base.view({s.B, s.T, s.d_in}).to(ct)).to(x.scalar_type());
    } else {
      dx = dx_adapter;
      if (dx.numel() > 0) dx.view({s.B * s.T, s.d_in}).addmm_(g.view({s.B * s.T, d_out}), weight);
    }
  }
  if (need_adapter) {
    // dB in the bank's (S, d_s, r) layout per sample.
    std::vector<T> dB(s.B * Fb);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t sl = 0; sl < s.S; ++sl)
        for (int64_t k2 = 0; k2 < s.r; ++k2)
          for (int64_t e = 0; e < s.d_s; ++e)
            dB[((b * s.S + sl) * s.d_s + e) * s.r + k2] = dBt[((b * s.S + sl) * s.r + k2) * s.d_s + e];
    const at::Tensor ba = as(bank_a, ct), bb = as(bank_b, ct);
    if (need_a || need_b) {  // dbank = w^T dA, w^T dB: ordered over samples, parallel over features
      at::Tensor ga = at::empty(bank_a.sizes(), x.options().dtype(ct));
      at::Tensor gb = at::empty(bank_b.sizes(), x.options().dtype(ct));
      T* pga = ga.data_ptr<T>();
      T* pgb = gb.data_ptr<T>();
      const T* w = m.weights.data();
      at::parallel_for(0, Fa + Fb, kFeatureGrain, [&](int64_t begin, int64_t end) {
        if (begin < Fa && need_a) {
          const int64_t e = std::min(end, Fa);
          K.axpy_block(s.N, s.B, e - begin, w, 1, s.N, dA.data() + begin, Fa, pga + begin, Fa, nullptr, false);
        }
        if (end > Fa && need_b) {
          const int64_t b0 = std::max(begin, Fa) - Fa, b1 = end - Fa;
          K.axpy_block(s.N, s.B, b1 - b0, w, 1, s.N, dB.data() + b0, Fb, pgb + b0, Fb, nullptr, false);
        }
      });
      if (need_a) da = ga.to(bank_a.scalar_type());
      if (need_b) db = gb.to(bank_b.scalar_type());
    }
    if (need_w) {
      std::vector<T> gw(s.B * s.N), gw_b(s.B * s.N);
      at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {  // dw = <dA_b, bank_a[n]> + <dB_b, bank_b[n]>
        K.dot_block(end - begin, s.N, Fa, dA.data() + begin * Fa, Fa, ba.data_ptr<T>(), Fa, gw.data() + begin * s.N,
                    s.N, T(1));
        K.dot_block(end - begin, s.N, Fb, dB.data() + begin * Fb, Fb, bb.data_ptr<T>(), Fb,
                    gw_b.data() + begin * s.N, s.N, T(1));
      });
      // The (B, N)-sized tail in double (see Memory): dw, separation and cosine backward.
      const Kernels<double>& K64 = kernels_of<double>(isa);
      std::vector<double> gw64(s.B * s.N), gz64(s.B * s.N);
      for (int64_t i = 0; i < s.B * s.N; ++i) gw64[i] = double(gw[i]) + double(gw_b[i]);
      separate_backward<double>(sep, gw64.data(), m.scores.data(), m.weights64.data(), gz64.data(), s.B, s.N, eps);
      const auto opts64 = x.options().dtype(at::kDouble);
      if (need_q) {  // dq = normalize'(q) (gz k_unit)
        std::vector<double> gu(s.B * s.d_k);
        K64.axpy_block(s.B, s.N, s.d_k, gz64.data(), s.N, 1, m.k_unit.data(), s.d_k, gu.data(), s.d_k, nullptr,
                       false);
        at::Tensor t = at::empty({s.B, s.d_k}, opts64);
        normalize_backward(K64, m.q_unit.data(), m.q_norm.data(), gu.data(), s.B, s.d_k, t.data_ptr<double>());
        dq = t.to(query.scalar_type());
      }
      if (need_k) {  // dk = normalize'(k) (gz^T q_unit)
        std::vector<double> gu(s.N * s.d_k);
        K64.axpy_block(s.N, s.B, s.d_k, gz64.data(), 1, s.N, m.q_unit.data(), s.d_k, gu.data(), s.d_k, nullptr,
                       false);
        at::Tensor t = at::empty({s.N, s.d_k}, opts64);
        normalize_backward(K64, m.k_unit.data(), m.k_norm.data(), gu.data(), s.N, s.d_k, t.data_ptr<double>());
        dk = t.to(keys.scalar_type());
      }
    }
  }
  // The schema returns Tensors: a gradient not asked for is an empty tensor.
  return {dx.defined() ? dx : empty(), dq.defined() ? dq : empty(), dk.defined() ? dk : empty(),
          da.defined() ? da : empty(), db.defined() ? db : empty()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mira_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& bank_a, const at::Tensor& bank_b, at::IntArrayRef slice_offsets,
    c10::string_view separation, double scale, double eps, std::array<bool, 5> output_mask) {
  mira::check_linear_backward_args(grad_out, x, weight, query, keys, bank_a, bank_b, slice_offsets, separation, scale,
                                   eps);
  const at::ScalarType ct = compute_type(x.scalar_type());
  const Shapes s = shapes_of(x, keys, bank_a, bank_b, slice_offsets);
  const Sep sep = parse_separation(std::string_view(separation.data(), separation.size()));
  if (ct == at::kDouble)
    return backward_impl<double>(grad_out, x, weight, query, keys, bank_a, bank_b, s, sep, scale, eps, output_mask);
  return backward_impl<float>(grad_out, x, weight, query, keys, bank_a, bank_b, s, sep, scale, eps, output_mask);
}

}  // namespace
}  // namespace mira_cpu

TORCH_LIBRARY_FRAGMENT(mira, m) {
  // Introspection for tests and benchmark records: [active ISA, ISAs this CPU supports...].
  m.def("_cpu_isa_info() -> str[]", &mira_cpu::isa_info);
  // Whether a seeding pass into `out` would use streaming stores (the rule in the file comment).
  m.def("_cpu_streams_into(Tensor out) -> bool", &mira_cpu::stream_seeding);
  m.def("_cpu_stream_threshold_bytes() -> int", &mira_cpu::stream_threshold_bytes);
  // The forward's phase clock (benchmarks/budget.py): on/off for the calling thread, and the last
  // forward's seconds per phase there.
  m.def("_cpu_phase_clock(bool on) -> ()", &mira_cpu::set_phase_clock);
  m.def("_cpu_last_phases() -> float[]", &mira_cpu::last_phases);
}

TORCH_LIBRARY_IMPL(mira, CPU, m) {
  m.impl("_cpu_mira_linear", &mira_cpu::mira_linear_cpu);
  m.impl("_cpu_mira_linear_backward", &mira_cpu::mira_linear_backward_cpu);
  m.impl("_cpu_mira_adapter_", &mira_cpu::mira_adapter_cpu);
}
