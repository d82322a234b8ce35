// Vector helpers shared by mmjax's CPU kernels (GCC/Clang vector extensions: 16 floats, which
// the compiler maps to one AVX-512 register or splits where the CPU has narrower ones).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace mmjax_simd {

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * 4)));
typedef float VecU __attribute__((vector_size(kLanes * 4), aligned(4)));
typedef int32_t IVec __attribute__((vector_size(kLanes * 4)));
inline Vec Load(const float* p) { return *reinterpret_cast<const VecU*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<VecU*>(p) = v; }
inline Vec Splat(float a) { return Vec{} + a; }

// Native-width vectors: one register of the CPU the library is compiled for (-march=native).
// Without AVX-512, GCC keeps a 16-float Vec in memory and splits each operation through the
// stack; in a register-tiled loop that is ~10x slower (measured on an AVX2 EPYC: the prefill
// kernel's products ran at ~1.5 GFLOP/s). Loops bound by register tiles use NVec.
#if defined(__AVX512F__)
constexpr int kNLanes = 16;
#elif defined(__AVX__)
constexpr int kNLanes = 8;
#else
constexpr int kNLanes = 4;
#endif
typedef float NVec __attribute__((vector_size(kNLanes * 4)));
typedef float NVecU __attribute__((vector_size(kNLanes * 4), aligned(4)));
typedef int32_t NIVec __attribute__((vector_size(kNLanes * 4)));
inline NVec NLoad(const float* p) { return *reinterpret_cast<const NVecU*>(p); }
inline void NStore(float* p, NVec v) { *reinterpret_cast<NVecU*>(p) = v; }
inline NVec NSplat(float a) { return NVec{} + a; }
// *p in every lane, as one broadcast load: NSplat(*p) costs an add and a register shuffle,
// which bound a loop that splats a new value for every few FMAs (panels.cc).
inline NVec NBroadcast(const float* p) {
#if defined(__AVX512F__)
  return (NVec)_mm512_set1_ps(*p);
#elif defined(__AVX__)
  return (NVec)_mm256_broadcast_ss(p);
#else
  return NSplat(*p);
#endif
}
inline NIVec NIota() {
  NIVec v{};
  for (int i = 0; i < kNLanes; ++i) v[i] = i;
  return v;
}

// One narrow value as float32: bfloat16 is the high half of a float32, int8 converts exactly.
inline float ToFloat(float w) { return w; }
inline float ToFloat(int8_t w) { return float(w); }
inline float ToFloat(uint16_t w) {
  const uint32_t bits = uint32_t(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// kNLanes consecutive values (float32, bfloat16 as uint16_t, int8) widened to one native float32
// register (gemv's weights, decode attention's bf16 / int8 K and V rows). Intrinsics, because
// GCC's __builtin_convertvector scalarises int8 -> float and spills the bfloat16 shift on AVX2
// (one vcvtsi2ss per weight: int8 decode ran at 1.2 GB/s).
inline NVec LoadW(const float* p) { return NLoad(p); }
inline NVec LoadW(const uint16_t* p) {  // bfloat16: zero-extend to 32 bits, shift into the high half
#if defined(__AVX512F__)
  return (NVec)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
#elif defined(__AVX2__)
  return (NVec)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
#else
  NVec v;
  for (int i = 0; i < kNLanes; ++i) v[i] = ToFloat(p[i]);
  return v;
#endif
}
inline NVec LoadW(const int8_t* p) {  // int8: sign-extend and convert (exact)
#if defined(__AVX512F__)
  return (NVec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  return (NVec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
  NVec v;
  for (int i = 0; i < kNLanes; ++i) v[i] = ToFloat(p[i]);
  return v;
#endif
}

// exp(x) for x <= 0 (x - max): 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 in two parts.
// V a float vector type, IV the int32 vector type of as many lanes.
template <typename V, typename IV>
inline V ExpT(V x) {
  const V lowest = V{} - 87.0f;
  x = x < lowest ? lowest : x;  // below: 0 in float32 anyway
  const V n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest
  const V r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  V p = V{} + 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const IV bits = (__builtin_convertvector(n, IV) + 127) << 23;  // 2^n
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline Vec Exp(Vec x) { return ExpT<Vec, IVec>(x); }
inline NVec NExp(NVec x) { return ExpT<NVec, NIVec>(x); }

inline float ExpScalar(float x) {
  Vec v = Splat(x);
  return Exp(v)[0];
}

template <typename V>
inline float HMax(V v) {
  float m = v[0];
  for (int i = 1; i < int(sizeof(V) / 4); ++i) m = m > v[i] ? m : v[i];
  return m;
}

template <typename V>
inline float HSum(V v) {
  float s = 0;
  for (int i = 0; i < int(sizeof(V) / 4); ++i) s += v[i];
  return s;
}

// r[i] = HSum(v[i]) for 16 vectors at once: four levels of pairwise shuffle + add (15 merges)
// instead of 16 lane-by-lane sums. Keys come out in bit-reversed order; the last shuffle
// puts them back.
inline Vec Merge8(Vec a, Vec b) {  // halves: [a0..7 + a8..15 | b0..7 + b8..15]
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
inline Vec Merge4(Vec a, Vec b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
inline Vec Merge2(Vec a, Vec b) {
  return __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
         __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
inline Vec Merge1(Vec a, Vec b) {
  return __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
inline Vec Sums16(const Vec* v) {
  Vec t[8], u[4];
  for (int j = 0; j < 8; ++j) t[j] = Merge8(v[2 * j], v[2 * j + 1]);
  for (int j = 0; j < 4; ++j) u[j] = Merge4(t[2 * j], t[2 * j + 1]);
  const Vec y = Merge1(Merge2(u[0], u[1]), Merge2(u[2], u[3]));
  return __builtin_shufflevector(y, y, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// r[i] = HSum(v[i]) for kNLanes native vectors: Sums16 at native width.
#if defined(__AVX512F__)
inline NVec NSums(const NVec* v) { return Sums16(v); }  // kNLanes == 16: NVec is Vec
#elif defined(__AVX__)
inline NVec NSums(const NVec* v) {  // 3 levels of shuffle + add; keys come out bit-reversed
  NVec t[4], u[2];
  for (int j = 0; j < 4; ++j)
    t[j] = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(v[2 * j], v[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int j = 0; j < 2; ++j)
    u[j] = __builtin_shufflevector(t[2 * j], t[2 * j + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(t[2 * j], t[2 * j + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  const NVec y = __builtin_shufflevector(u[0], u[1], 0, 8, 2, 10, 4, 12, 6, 14) +
                 __builtin_shufflevector(u[0], u[1], 1, 9, 3, 11, 5, 13, 7, 15);
  return __builtin_shufflevector(y, y, 0, 4, 2, 6, 1, 5, 3, 7);
}
#else
inline NVec NSums(const NVec* v) {
  NVec r;
  for (int i = 0; i < kNLanes; ++i) r[i] = HSum(v[i]);
  return r;
}
#endif

}  // namespace mmjax_simd
