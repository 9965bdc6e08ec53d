// Baseline variant of the hot loops: SSE2 on x86-64 (every x86-64 CPU has it), GCC's generic
// 128-bit vectors elsewhere (NEON on aarch64). No FMA here, so both the vector and the scalar paths
// round the product and the sum separately (setup.py's -std=c++20 disables floating-point
// contraction, so `a * b + c` is not fused behind our back). Both forms add the lanes in the same
// order, so they give the same bits.
#include <cstdint>

#include "cpu/kernels.h"

#if MIRA_CPU_X86
#include <emmintrin.h>
#endif

namespace mira_cpu::baseline {
namespace {

#include "cpu/widen16.inc"

#if MIRA_CPU_X86
struct VF {
  using T = float;
  using R = __m128;
  static constexpr int W = 4, DT = 2, DJ = 4, AJ = 2, AK = 4;
  static R zero() { return _mm_setzero_ps(); }
  static R load(const T* p) { return _mm_loadu_ps(p); }
  static void store(T* p, R v) { _mm_storeu_ps(p, v); }
  static void stream(T* p, R v) { _mm_stream_ps(p, v); }  // p aligned to sizeof(R)
  static R set1(T a) { return _mm_set1_ps(a); }
  static R fma(R a, R b, R c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
  static T hsum(R v) {
    const __m128 p = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)));
  }
  static T sfma(T a, T b, T c) { return a * b + c; }
  // 4 16-bit bank elements widened exactly: bfloat16 by interleaving zero low halves (SSE2), binary16
  // in integer code (SSE2 has no conversion for it).
  static R load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
  }
  static R load_f16(const uint16_t* p) {
    return _mm_setr_ps(f16_to_float(p[0]), f16_to_float(p[1]), f16_to_float(p[2]), f16_to_float(p[3]));
  }
};

struct VD {
  using T = double;
  using R = __m128d;
  static constexpr int W = 2, DT = 2, DJ = 4, AJ = 2, AK = 4;
  static R zero() { return _mm_setzero_pd(); }
  static R load(const T* p) { return _mm_loadu_pd(p); }
  static void store(T* p, R v) { _mm_storeu_pd(p, v); }
  static void stream(T* p, R v) { _mm_stream_pd(p, v); }
  static R set1(T a) { return _mm_set1_pd(a); }
  static R fma(R a, R b, R c) { return _mm_add_pd(_mm_mul_pd(a, b), c); }
  static T hsum(R v) { return _mm_cvtsd_f64(_mm_add_sd(v, _mm_unpackhi_pd(v, v))); }
  static T sfma(T a, T b, T c) { return a * b + c; }
  static R load_f32(const float* p) { return _mm_setr_pd(p[0], p[1]); }  // exact widening
};
#else
// Portable form: GCC/Clang vector extensions, unaligned loads and stores through memcpy; there are
// no streaming stores (stream is an ordinary store), and hsum adds the lanes as the SSE2 form does.
template <typename Elem, int Lanes>
struct VGeneric {
  using T = Elem;
  typedef T R __attribute__((vector_size(Lanes * sizeof(T))));
  static constexpr int W = Lanes, DT = 2, DJ = 4, AJ = 2, AK = 4;
  static R zero() { return R{}; }
  static R load(const T* p) {
    R v;
    __builtin_memcpy(&v, p, sizeof(R));
    return v;
  }
  static void store(T* p, R v) { __builtin_memcpy(p, &v, sizeof(R)); }
  static void stream(T* p, R v) { store(p, v); }
  static R set1(T a) { return R{} + a; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static T hsum(R v) {
    if constexpr (Lanes == 4) return (v[0] + v[2]) + (v[1] + v[3]);
    else return v[0] + v[1];
  }
  static T sfma(T a, T b, T c) { return a * b + c; }
  // 16-bit bank elements widened exactly, lane by lane (used for float lanes only).
  static R load_bf16(const uint16_t* p) {
    R v;
    for (int i = 0; i < Lanes; ++i) v[i] = bf16_to_float(p[i]);
    return v;
  }
  static R load_f16(const uint16_t* p) {
    R v;
    for (int i = 0; i < Lanes; ++i) v[i] = f16_to_float(p[i]);
    return v;
  }
  // float32 values widened exactly (used for double lanes only).
  static R load_f32(const float* p) {
    R v;
    for (int i = 0; i < Lanes; ++i) v[i] = static_cast<T>(p[i]);
    return v;
  }
};
using VF = VGeneric<float, 4>;
using VD = VGeneric<double, 2>;
#endif

#include "cpu/kernels_impl.inc"

}  // namespace

IsaTable table() { return IsaTable{"baseline", make_kernels<VF>(), make_kernels<VD>()}; }

}  // namespace mira_cpu::baseline
