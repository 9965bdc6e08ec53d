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

// 16-bit storage of the memory banks (contract section 4): the bits of a bfloat16 / an IEEE
// binary16 value. Distinct types so that the two widenings cannot be confused; plain data, so a
// pointer to them crosses the per-ISA boundary as freely as a float pointer. Both widen to float32
// exactly (every bfloat16 and binary16 value is a float32 value): bfloat16 is the top half of a
// float32 (a 16-bit shift), binary16 converts with F16C where the ISA has it (avx2, avx512) and in
// portable integer code elsewhere (baseline).
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};
static_assert(sizeof(Bf16) == 2 && sizeof(F16) == 2, "16-bit bank elements must be 2 bytes");

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
  // axpy_block with V stored in 16 bits, each element widened exactly to T before its FMA: the
  // same ordered chain as axpy_block over the widened values, so the result is bit for bit
  // axpy_block's over a float32 copy of V (the mixing of 16-bit banks, without that copy).
  // Only for T = float (nullptr in the double table: 16-bit banks need float32 compute).
  void (*axpy_block_bf16)(int64_t J, int64_t K, int64_t n, const T* coef, int64_t csj, int64_t csk, const Bf16* V,
                          int64_t ldv, T* C, int64_t ldc, const T* init, bool accumulate);
  void (*axpy_block_f16)(int64_t J, int64_t K, int64_t n, const T* coef, int64_t csj, int64_t csk, const F16* V,
                         int64_t ldv, T* C, int64_t ldc, const T* init, bool accumulate);
  // axpy_block's result, bit for bit, with every k kept in registers (C stored once per element, not
  // once per AK coefficients), V in T, bfloat16 or binary16 (the 16-bit ones float-only, as above).
  // For the mixing's several rows of C (J >= 2: the batch) over its N slots.
  void (*mix_block)(int64_t J, int64_t K, int64_t n, const T* coef, int64_t csj, int64_t csk, const T* V,
                    int64_t ldv, T* C, int64_t ldc, const T* init, bool accumulate);
  void (*mix_block_bf16)(int64_t J, int64_t K, int64_t n, const T* coef, int64_t csj, int64_t csk, const Bf16* V,
                         int64_t ldv, T* C, int64_t ldc, const T* init, bool accumulate);
  void (*mix_block_f16)(int64_t J, int64_t K, int64_t n, const T* coef, int64_t csj, int64_t csk, const F16* V,
                        int64_t ldv, T* C, int64_t ldc, const T* init, bool accumulate);
  // The retrieval's sums over one float32 key row k (n values, each widened exactly to T on load),
  // for nq >= 1 query rows q (row j at q + j * ldq): out[j * ldo] = sum_i q_j[i] k[i], and
  // *sq = sum_i k[i]^2 (unless sq is null), all in T, in one pass over k with several accumulators
  // per sum. A fixed order per sum: the same key and query give the same bits whatever nq and the
  // query's place among them. Only for T = double (nullptr in the float table: the cosines are
  // computed in double).
  void (*key_dots_f32)(int64_t nq, int64_t n, const T* q, int64_t ldq, const float* k, T* out, int64_t ldo, T* sq);
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
