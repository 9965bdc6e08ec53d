// Standalone driver that runs the CUDA kernels of csrc/cuda/mira_kernels.cuh on the CPU through the
// SIMT emulation (simt_emu.h). Built and run by tests/test_cuda_emulation.py; never loaded into a
// Python process.
//
//   driver <case.bin> <result.bin>
//
// case.bin (little endian): 25 int64 header fields (see Header), S int64 slice offsets, 2 float64
// (scale, eps), then the tensors in the order below, raw. result.bin: the outputs in the order below.
// With out_is_x (forward only), mira_adapter_(x, x, ...): no out tensor is sent, the kernels read and
// write one buffer, and x is written back.
// It runs the same host plan (plan_workspace, launch_adapter, launch_backward) as csrc/cuda/mira_cuda.cu;
// what the CUDA glue does with ATen (the base GEMMs, dtype conversions) the test does in Python.
#include "simt_emu.h"
// clang-format off
#include "cuda/mira_kernels.cuh"
// clang-format on

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace {

struct Header {
  int64_t magic, dtype, mode, B, T, d_in, N, d_k, S, r, d_s;
  int64_t sep, need_x, need_q, need_k, need_a, need_b, smem_budget;
  int64_t io_len, io_sb, io_st, io_se;  // storage length and strides of out (forward) or grad (backward)
  int64_t plan_only;                    // 1: no tensors follow; record the launches, run nothing
  int64_t io_offset;                    // storage offset of out / grad, in elements
  int64_t out_is_x;                     // 1: forward into x itself (out and x one buffer, as the contract allows)
};
static_assert(sizeof(Header) == 25 * 8, "header layout");
constexpr int64_t kMagic = 0x4d495241454d55;  // "MIRAEMU"

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "driver: %s\n", msg.c_str());
  std::exit(2);
}

struct Reader {
  std::ifstream in;
  explicit Reader(const char* path) : in(path, std::ios::binary) {
    if (!in) die(std::string("cannot open ") + path);
  }
  template <typename T>
  std::vector<T> read(int64_t n) {
    std::vector<T> v(static_cast<size_t>(n));
    if (n > 0 && !in.read(reinterpret_cast<char*>(v.data()), n * static_cast<int64_t>(sizeof(T))))
      die("case file is too short");
    return v;
  }
};

struct Writer {
  std::ofstream out;
  explicit Writer(const char* path) : out(path, std::ios::binary) {
    if (!out) die(std::string("cannot open ") + path);
  }
  template <typename T>
  void write(const std::vector<T>& v) {
    out.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(T)));
  }
};

// Deliberately broken kernels: the tests run them to show that the emulation's checks fire.
__global__ void selftest_divergent_barrier_kernel(int unused) {
  (void)unused;
  if (threadIdx.x == 7) return;  // thread 7 skips the barrier the others wait at
  __syncthreads();
}

__global__ void selftest_smem_overflow_kernel(int floats) {
  MIRA_DYNAMIC_SMEM(float, buf);
  buf[threadIdx.x * 2] = 1.0f;  // half the threads write past `floats` values
  __syncthreads();
  if (threadIdx.x == 0 && buf[0] != 1.0f) std::printf("unreachable %d\n", floats);
}

__global__ void selftest_shared_race_kernel(float* out) {
  __shared__ float buf[mira_cuda::kThreads];
  buf[threadIdx.x] = static_cast<float>(threadIdx.x);
  // A __syncthreads() is missing here: the read below races with another thread's write.
  out[threadIdx.x] = buf[(threadIdx.x + 1) % mira_cuda::kThreads];
}

// The launches of one call, printed one per line after the summary line.
void report(long workspace, bool spill) {
  std::printf("launches=%ld blocks=%ld spill=%d workspace=%ld\n", emu::launches.load(), emu::blocks_run.load(),
              spill ? 1 : 0, workspace);
  for (const auto& l : emu::launch_log) std::printf("launch %s %ld %ld\n", l.name, l.blocks, l.smem);
}

// Plan-only: the host plan at any size (no data, nothing executed). Pointers are placeholders that no
// kernel dereferences. Exits 3 with the glue's message when the plan exceeds a launch limit.
template <typename scalar_t, typename acc_t>
void plan(const Header& h, const std::vector<int64_t>& offsets) {
  using namespace mira_cuda;
  const Dims d{h.B, h.T, h.d_in, h.N, h.d_k, h.S, h.r, h.d_s};
  const bool backward = h.mode == 1;
  const bool memory_grads = h.need_q || h.need_k || h.need_a || h.need_b;
  if (const char* why = size_error(d)) {  // as the glue, before plan_workspace multiplies the sizes
    std::fprintf(stderr, "driver: %s\n", why);
    std::exit(3);
  }
  const Workspace ws = plan_workspace<acc_t>(d, backward, memory_grads, h.smem_budget);
  const LaunchList list = backward ? backward_launches(d, ws, sizeof(acc_t), h.need_x, h.need_q, h.need_k, h.need_a,
                                                       h.need_b)
                                   : adapter_launches(d, ws, sizeof(acc_t));
  if (const char* why = grid_error(list)) {
    std::fprintf(stderr, "driver: %s\n", why);
    std::exit(3);
  }
  emu::plan_only = true;
  alignas(16) static acc_t placeholder[4];
  alignas(16) static scalar_t placeholder_x[4];
  CallBuffers<scalar_t, acc_t> cb{};
  cb.x = placeholder_x, cb.out = placeholder_x, cb.grad = placeholder_x;
  cb.dx = h.need_x ? placeholder_x : nullptr;
  cb.query = cb.keys = cb.bank_a = cb.bank_b = placeholder;
  cb.dq = cb.dk = cb.dbank_a = cb.dbank_b = placeholder;
  cb.ws = placeholder;
  Workspace at_zero = ws;  // every scratch array at the placeholder: no pointer arithmetic past it
  at_zero.z = at_zero.w = at_zero.qnorm = at_zero.qscale = at_zero.knorm = at_zero.kscale = 0;
  at_zero.mixed_a = at_zero.mixed_b = 0;
  at_zero.row_spill = at_zero.h = at_zero.dh = at_zero.dmix_a = at_zero.dmix_b = at_zero.dw_part = 0;
  at_zero.dz = at_zero.offsets = 0;
  if (backward)
    launch_backward<scalar_t, acc_t>(d, offsets.data(), static_cast<int>(h.sep), 1.0, 1e-2, cb, at_zero, h.need_q,
                                     h.need_k, h.need_a, h.need_b, nullptr);
  else
    launch_adapter<scalar_t, acc_t>(d, offsets.data(), static_cast<int>(h.sep), 1.0, 1e-2, cb, at_zero, nullptr);
  report(static_cast<long>(ws.total), ws.spill);
}

template <typename scalar_t, typename acc_t>
void run(const Header& h, const std::vector<int64_t>& offsets, double scale, double eps, Reader& rd, Writer& wr) {
  using namespace mira_cuda;
  const Dims d{h.B, h.T, h.d_in, h.N, h.d_k, h.S, h.r, h.d_s};
  const bool backward = h.mode == 1;
  const bool need_q = h.need_q, need_k = h.need_k, need_a = h.need_a, need_b = h.need_b;
  const bool memory_grads = need_q || need_k || need_a || need_b;
  if (const char* why = size_error(d)) die(why);
  {
    const Workspace ws = plan_workspace<acc_t>(d, backward, memory_grads, h.smem_budget);
    const LaunchList list = backward ? backward_launches(d, ws, sizeof(acc_t), h.need_x, need_q, need_k, need_a,
                                                         need_b)
                                     : adapter_launches(d, ws, sizeof(acc_t));
    if (const char* why = grid_error(list)) die(why);
  }

  auto io = rd.read<scalar_t>(h.out_is_x ? 0 : h.io_len);  // out (forward, in place) or grad (backward)
  auto x = rd.read<scalar_t>(h.B * h.T * h.d_in);
  std::vector<scalar_t> dx;
  if (backward && h.need_x) dx = rd.read<scalar_t>(h.B * h.T * h.d_in);  // G W
  auto query = rd.read<acc_t>(h.B * h.d_k);
  auto keys = rd.read<acc_t>(h.N * h.d_k);
  auto bank_a = rd.read<acc_t>(h.N * d.FA());
  auto bank_b = rd.read<acc_t>(h.N * d.FB());

  const Workspace ws = plan_workspace<acc_t>(d, backward, memory_grads, h.smem_budget);
  // NaN-filled: a kernel that reads scratch it did not write shows NaN in the results.
  std::vector<acc_t> work(static_cast<size_t>(ws.total > 0 ? ws.total : 1), static_cast<acc_t>(NAN));
  // The gradients as the glue allocates them: zeros where caller_zeroes_memory_grads says the launches leave
  // them to the caller, else uninitialised (at::empty), here NaN-filled, so an element no kernel writes shows.
  const acc_t unwritten = caller_zeroes_memory_grads(d) ? acc_t(0) : static_cast<acc_t>(NAN);
  std::vector<acc_t> dq(need_q ? h.B * h.d_k : 0, unwritten), dk(need_k ? h.N * h.d_k : 0, unwritten);
  std::vector<acc_t> dba(need_a ? h.N * d.FA() : 0, unwritten), dbb(need_b ? h.N * d.FB() : 0, unwritten);

  CallBuffers<scalar_t, acc_t> cb{};
  cb.x = x.data();
  cb.query = query.data(), cb.keys = keys.data(), cb.bank_a = bank_a.data(), cb.bank_b = bank_b.data();
  cb.ws = work.data();
  if (!backward && h.out_is_x) {  // what the glue passes when out is x (contiguous): one pointer for both
    cb.out = x.data(), cb.out_sb = h.T * h.d_in, cb.out_st = h.d_in, cb.out_se = 1;
    launch_adapter<scalar_t, acc_t>(d, offsets.data(), static_cast<int>(h.sep), scale, eps, cb, ws, nullptr);
    wr.write(x);
  } else if (!backward) {
    cb.out = io.data() + h.io_offset, cb.out_sb = h.io_sb, cb.out_st = h.io_st, cb.out_se = h.io_se;
    launch_adapter<scalar_t, acc_t>(d, offsets.data(), static_cast<int>(h.sep), scale, eps, cb, ws, nullptr);
    wr.write(io);
  } else {
    cb.grad = io.data() + h.io_offset, cb.g_sb = h.io_sb, cb.g_st = h.io_st, cb.g_se = h.io_se;
    cb.dx = h.need_x ? dx.data() : nullptr;
    cb.dq = need_q ? dq.data() : nullptr, cb.dk = need_k ? dk.data() : nullptr;
    cb.dbank_a = need_a ? dba.data() : nullptr, cb.dbank_b = need_b ? dbb.data() : nullptr;
    launch_backward<scalar_t, acc_t>(d, offsets.data(), static_cast<int>(h.sep), scale, eps, cb, ws, need_q, need_k,
                                     need_a, need_b, nullptr);
    wr.write(dx);
    wr.write(dq);
    wr.write(dk);
    wr.write(dba);
    wr.write(dbb);
  }
  report(static_cast<long>(ws.total), ws.spill);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) die("usage: driver <case.bin> <result.bin>");
  Reader rd(argv[1]);
  const auto hv = rd.read<Header>(1);
  const Header& h = hv[0];
  if (h.magic != kMagic) die("bad magic");
  if (h.mode == 2) {  // self-test: must abort
    emu::launch("selftest", &selftest_divergent_barrier_kernel, 2, mira_cuda::kThreads, 0, 0);
    return 0;
  }
  if (h.mode == 4) {  // self-test: must be reported by ThreadSanitizer
    std::vector<float> out(mira_cuda::kThreads);
    emu::launch("selftest", &selftest_shared_race_kernel, 1, mira_cuda::kThreads, 0, out.data());
    return 0;
  }
  if (h.mode == 3) {  // self-test: must abort (AddressSanitizer)
    emu::launch("selftest", &selftest_smem_overflow_kernel, 1, mira_cuda::kThreads, mira_cuda::kThreads * 4, mira_cuda::kThreads);
    return 0;
  }
  if (h.S < 1) die("S out of range");
  if (h.out_is_x && (h.mode != 0 || h.plan_only)) die("out_is_x is a forward case");
  const auto offsets = rd.read<int64_t>(h.S);
  const auto sc = rd.read<double>(2);
  if (h.plan_only) {
    switch (h.dtype) {
      case 0: plan<float, float>(h, offsets); break;
      case 1: plan<double, double>(h, offsets); break;
      case 2: plan<__half, float>(h, offsets); break;
      case 3: plan<__nv_bfloat16, float>(h, offsets); break;
      default: die("unknown dtype code");
    }
    return 0;
  }
  Writer wr(argv[2]);
  switch (h.dtype) {
    case 0: run<float, float>(h, offsets, sc[0], sc[1], rd, wr); break;
    case 1: run<double, double>(h, offsets, sc[0], sc[1], rd, wr); break;
    case 2: run<__half, float>(h, offsets, sc[0], sc[1], rd, wr); break;
    case 3: run<__nv_bfloat16, float>(h, offsets, sc[0], sc[1], rd, wr); break;
    default: die("unknown dtype code");
  }
  return 0;
}
