// Vector helpers shared by mmjax's CPU kernels (GCC/Clang vector extensions: 16 floats, which
// the compiler maps to one AVX-512 register or splits where the CPU has narrower ones).
#pragma once

#include <cstdint>
#include <cstring>

namespace mmjax_simd {

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * 4)));
typedef float VecU __attribute__((vector_size(kLanes * 4), aligned(4)));
typedef int32_t IVec __attribute__((vector_size(kLanes * 4)));
inline Vec Load(const float* p) { return *reinterpret_cast<const VecU*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<VecU*>(p) = v; }
inline Vec Splat(float a) { return Vec{} + a; }

// exp(x) for x <= 0 (x - max): 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 in two parts.
inline Vec Exp(Vec x) {
  x = x < Splat(-87.0f) ? Splat(-87.0f) : x;  // below: 0 in float32 anyway
  const Vec n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest
  const Vec r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  Vec p = Splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;  // 2^n
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float ExpScalar(float x) {
  Vec v = Splat(x);
  return Exp(v)[0];
}

inline float HMax(Vec v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = m > v[i] ? m : v[i];
  return m;
}

inline float HSum(Vec v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}


}  // namespace mmjax_simd
