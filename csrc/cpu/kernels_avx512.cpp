// AVX-512 (F + DQ) variant of the hot loops; chosen at run time only on CPUs that report AVX-512F/DQ.
#include <cstdint>

#include "cpu/kernels.h"

#if MIRA_CPU_X86  // the whole file: an x86-64 instruction set
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
// GCC 12's _mm512_extract*/cast* intrinsics read an _mm256_undefined_*() value on purpose, and
// -Wall flags that as uninitialised once they are inlined; the warning is about the header.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace mira_cpu::avx512 {
namespace {

#include "cpu/widen16.inc"

struct VF {
  using T = float;
  using R = __m512;
  static constexpr int W = 16, DT = 4, DJ = 4, AJ = 4, AK = 4;
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const T* p) { return _mm512_loadu_ps(p); }
  static void store(T* p, R v) { _mm512_storeu_ps(p, v); }
  static void stream(T* p, R v) { _mm512_stream_ps(p, v); }  // p aligned to sizeof(R)
  static R set1(T a) { return _mm512_set1_ps(a); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static T hsum(R v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)));
  }
  static T sfma(T a, T b, T c) { return __builtin_fmaf(a, b, c); }
  // 16 16-bit bank elements widened exactly: bfloat16 by a 16-bit shift, binary16 by AVX-512F's
  // vcvtph2ps.
  static R load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static R load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};

struct VD {
  using T = double;
  using R = __m512d;
  static constexpr int W = 8, DT = 4, DJ = 4, AJ = 4, AK = 4;
  static R zero() { return _mm512_setzero_pd(); }
  static R load(const T* p) { return _mm512_loadu_pd(p); }
  static void store(T* p, R v) { _mm512_storeu_pd(p, v); }
  static void stream(T* p, R v) { _mm512_stream_pd(p, v); }
  static R set1(T a) { return _mm512_set1_pd(a); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static T hsum(R v) {
    const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    const __m128d q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
    return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
  }
  static T sfma(T a, T b, T c) { return __builtin_fma(a, b, c); }
  static R load_f32(const float* p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }  // exact widening
};

#include "cpu/kernels_impl.inc"

}  // namespace

IsaTable table() { return IsaTable{"avx512", make_kernels<VF>(), make_kernels<VD>()}; }

}  // namespace mira_cpu::avx512

#pragma GCC pop_options

#endif  // MIRA_CPU_X86
