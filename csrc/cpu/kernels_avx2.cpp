// AVX2 + FMA (+ F16C) variant of the hot loops; chosen at run time only on CPUs that report all three
// (every AVX2 CPU made has F16C: Intel since Ivy Bridge, AMD since Piledriver).
#include <cstdint>

#include "cpu/kernels.h"

#if MIRA_CPU_X86  // the whole file: an x86-64 instruction set
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace mira_cpu::avx2 {
namespace {

#include "cpu/widen16.inc"

// 16 ymm registers: smaller register tiles than AVX-512 so the accumulators do not spill.
struct VF {
  using T = float;
  using R = __m256;
  static constexpr int W = 8, DT = 2, DJ = 4, AJ = 2, AK = 4;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const T* p) { return _mm256_loadu_ps(p); }
  static void store(T* p, R v) { _mm256_storeu_ps(p, v); }
  static void stream(T* p, R v) { _mm256_stream_ps(p, v); }  // p aligned to sizeof(R)
  static R set1(T a) { return _mm256_set1_ps(a); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static T hsum(R v) {
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)));
  }
  static T sfma(T a, T b, T c) { return __builtin_fmaf(a, b, c); }
  // 8 16-bit bank elements widened exactly: bfloat16 by a 16-bit shift, binary16 by F16C.
  static R load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static R load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
};

struct VD {
  using T = double;
  using R = __m256d;
  static constexpr int W = 4, DT = 2, DJ = 4, AJ = 2, AK = 4;
  static R zero() { return _mm256_setzero_pd(); }
  static R load(const T* p) { return _mm256_loadu_pd(p); }
  static void store(T* p, R v) { _mm256_storeu_pd(p, v); }
  static void stream(T* p, R v) { _mm256_stream_pd(p, v); }
  static R set1(T a) { return _mm256_set1_pd(a); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static T hsum(R v) {
    const __m128d q = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
  }
  static T sfma(T a, T b, T c) { return __builtin_fma(a, b, c); }
  static R load_f32(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }  // exact widening
};

#include "cpu/kernels_impl.inc"

}  // namespace

IsaTable table() { return IsaTable{"avx2", make_kernels<VF>(), make_kernels<VD>()}; }

}  // namespace mira_cpu::avx2

#pragma GCC pop_options

#endif  // MIRA_CPU_X86
