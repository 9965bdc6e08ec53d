// Per-instruction-set inner loops of the CPU MIRA kernel: the interface between the torch-facing
// code (mira_linear_cpu.cpp, compiled for baseline x86-64) and the hot loops (kernels_<isa>.cpp,
// each compiled under its own `#pragma GCC target`).
//
// ODR hazard this layout avoids: an inline or template function compiled under several target
// pragmas is emitted in several objects as the same weak symbol, and the linker may keep the
// AVX-512 copy for baseline callers. So the per-ISA files include no torch and no C++ standard
// headers with inline code, their code sits in per-ISA namespaces with internal linkage, and the
// only things that cross this boundary are the plain function pointers of the tables below.
#pragma once

#include <cstdint>

// The x86 instruction-set variants (kernels_avx2.cpp, kernels_avx512.cpp) and streaming stores
// exist only on x86-64; everywhere else (aarch64, ...) the portable baseline kernel is the only one.
#if defined(__x86_64__) || defined(_M_X64)
#define MIRA_CPU_X86 1
#else
#define MIRA_CPU_X86 0
#endif

namespace mira_cpu {

// Kernels for one element type. All are single-threaded; callers parallelise around them.
// Every output element is a fixed-order reduction that does not depend on how the caller blocks
// or splits rows, so results are bitwise identical at any thread count.
template <typename T>
struct Kernels {
  // out[t*ldo + j] = alpha * sum_i X[t*ldx + i] * Wt[j*ldw + i]      t < rows, j < J, i < n
  // (vector lanes accumulate over i in order, then a fixed-order horizontal sum, then the tail.)
  void (*dot_block)(int64_t rows, int64_t J, int64_t n, const T* X, int64_t ldx, const T* Wt, int64_t ldw, T* out,
                    int64_t ldo, T alpha);
  // C[j*ldc + i] = start + sum_k coef[j*csj + k*csk] * V[k*ldv + i]   j < J, k < K (in order), i < n
  // start = C[j*ldc + i] if accumulate, else init[i] if init, else 0.
  void (*axpy_block)(int64_t J, int64_t K, int64_t n, const T* coef, int64_t csj, int64_t csk, const T* V,
                     int64_t ldv, T* C, int64_t ldc, const T* init, bool accumulate);
  // axpy_block, and copy (dst[i] = src[i], i < n), writing C / dst with non-temporal (streaming)
  // stores wherever a whole vector lands on an address aligned to the vector's size (axpy_block_nt:
  // only when K fits one register block, AK, so that each element of C is written once; otherwise
  // it is axpy_block). The values are bit for bit those of the cached versions. The stores are
  // weakly ordered: the writing thread must issue a store fence (store_fence) before another
  // thread reads C / dst.
  void (*axpy_block_nt)(int64_t J, int64_t K, int64_t n, const T* coef, int64_t csj, int64_t csk, const T* V,
                        int64_t ldv, T* C, int64_t ldc, const T* init, bool accumulate);
  void (*copy_nt)(int64_t n, const T* src, T* dst);
};

struct IsaTable {
  const char* name;
  Kernels<float> f32;
  Kernels<double> f64;
};

// Each returns its table; call avx2/avx512 only on a CPU that supports them (the functions
// themselves are compiled for that instruction set). avx2/avx512 are defined on x86-64 only.
namespace baseline {
IsaTable table();
}
#if MIRA_CPU_X86
namespace avx2 {
IsaTable table();
}
namespace avx512 {
IsaTable table();
}
#endif

}  // namespace mira_cpu
