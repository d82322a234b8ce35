// Decode attention for XLA:CPU: one query token per row against the KV cache, float32.
//
// out[b, k, g, :] = softmax_s(scale * q[b, k, g, :] . K[b, k, s, :]) @ V[b, k, s, :]
// over the visible keys start[b] <= s < end[b] (decode_range in attention.py turns every
// MaskSpec without segments into that interval); a row with no visible key gives 0.
// Axis legend: B batch, K kv heads, G query heads per kv head, S cache length, H head dim.
//
// Why: as XLA ops at batch 8 (416 cache slots), the q.K dot, the max/exp/sum and the
// multiply-reduce for probs @ V cost ~40 ms of thread time per decode step in tiny fusions,
// against ~80 MB of cache the step must read (~4 ms). Here each (b, k) pair is one task:
// it streams its K rows once per query head (from cache after the first), keeps the G x n
// logits in a thread-local buffer, and streams its V rows once for all G heads (GQA without
// repeating K/V). Tasks are shared out over XLA's intra-op pool by mmjax_pool::ParallelFor
// (pool.h).
//
// For head dims that are multiples of 16 (Logits / WeightedSum, unrolled per head dim): the
// dot products of 16 keys are reduced together (Sums16: 15 shuffle-adds, not 16 lane-by-lane
// sums), max / exp / normalise run on vectors, and probs @ V keeps the output rows of a few
// heads in registers. That took one (b, k) task of 3 heads x 330 keys from 27 to 9.5 us;
// other head dims take plain loops.
//
// Numerics follow xla_attention: logits * scale, max, exp(l - max), sum, probs = e / sum,
// out = sum_s probs * v, all float32; only the summation order differs. exp is a degree-7
// polynomial after range reduction (relative error ~1e-7, like XLA's own).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "pool.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
using namespace mmjax_simd;

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

// logits[s] = scale * q . k[s0 + s] for s < n, head dim HV vectors of 16.
template <int HV>
void Logits(const float* __restrict__ q, const float* __restrict__ k, int64_t n, float scale,
            float* __restrict__ logits) {
  constexpr int64_t H = HV * kLanes;
  Vec qv[HV];
  for (int h = 0; h < HV; ++h) qv[h] = Load(q + h * kLanes);
  int64_t s = 0;
  for (; s + kLanes <= n; s += kLanes) {
    Vec acc[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      const float* kr = k + (s + i) * H;
      Vec a = qv[0] * Load(kr);
      for (int h = 1; h < HV; ++h) a += qv[h] * Load(kr + h * kLanes);
      acc[i] = a;
    }
    Store(logits + s, Sums16(acc) * scale);
  }
  for (; s < n; ++s) {
    const float* kr = k + s * H;
    Vec a = qv[0] * Load(kr);
    for (int h = 1; h < HV; ++h) a += qv[h] * Load(kr + h * kLanes);
    logits[s] = HSum(a) * scale;
  }
}

// out[g] = sum_s probs[g, s] v[s0 + s] for g < G, the G x HV output vectors in registers.
template <int HV, int GC>
void WeightedSum(const float* __restrict__ probs, int64_t n, const float* __restrict__ v, int64_t G,
                 float* __restrict__ out) {
  constexpr int64_t H = HV * kLanes;
  for (int64_t g0 = 0; g0 < G; g0 += GC) {
    const int gc = static_cast<int>(std::min<int64_t>(GC, G - g0));
    Vec acc[GC][HV];
    for (int g = 0; g < GC; ++g)
      for (int h = 0; h < HV; ++h) acc[g][h] = Vec{};
    for (int64_t s = 0; s < n; ++s) {
      const float* vr = v + s * H;
      Vec vv[HV];
      for (int h = 0; h < HV; ++h) vv[h] = Load(vr + h * kLanes);
      for (int g = 0; g < GC; ++g) {
        if (g >= gc) break;
        const float p = probs[(g0 + g) * n + s];
        for (int h = 0; h < HV; ++h) acc[g][h] += p * vv[h];
      }
    }
    for (int g = 0; g < gc; ++g)
      for (int h = 0; h < HV; ++h) Store(out + (g0 + g) * H + h * kLanes, acc[g][h]);
  }
}

// The per-head-dim kernels: Logits and WeightedSum for head dims that are 16-lane multiples.
struct HeadDimKernels {
  void (*logits)(const float*, const float*, int64_t, float, float*);
  void (*weighted_sum)(const float*, int64_t, const float*, int64_t, float*);
};
template <int HV>
constexpr HeadDimKernels KernelsFor() {
  // GC heads at a time: GC x HV accumulators + HV v vectors stay within 32 registers.
  return {Logits<HV>, WeightedSum<HV, std::max(1, 24 / HV - 1)>};
}
// Index HV = H / 16 for H = 16 .. 128; nullptr (other head dims): the generic loops.
const HeadDimKernels* ForHeadDim(int64_t H) {
  static const HeadDimKernels table[] = {KernelsFor<1>(), KernelsFor<2>(), KernelsFor<3>(), KernelsFor<4>(),
                                         KernelsFor<5>(), KernelsFor<6>(), KernelsFor<7>(), KernelsFor<8>()};
  if (H % kLanes != 0 || H / kLanes < 1 || H / kLanes > 8) return nullptr;
  return &table[H / kLanes - 1];
}

// l[0:n] = softmax(l[0:n]) in place: max, exp(l - max), sum, l / sum (vectors of 16, then the
// n % 16 last one by one).
void Softmax(float* l, int64_t n) {
  const int64_t nv = n / kLanes * kLanes;
  float m = l[0];
  if (nv > 0) {
    Vec mv = Load(l);
    for (int64_t s = kLanes; s < nv; s += kLanes) {
      const Vec x = Load(l + s);
      mv = x > mv ? x : mv;
    }
    m = std::max(m, HMax(mv));
  }
  for (int64_t s = nv; s < n; ++s) m = std::max(m, l[s]);
  Vec tv{};
  for (int64_t s = 0; s < nv; s += kLanes) {
    const Vec e = Exp(Load(l + s) - m);
    Store(l + s, e);
    tv += e;
  }
  float total = HSum(tv);
  for (int64_t s = nv; s < n; ++s) {
    l[s] = ExpScalar(l[s] - m);
    total += l[s];
  }
  const Vec tot = Splat(total);
  for (int64_t s = 0; s < nv; s += kLanes) Store(l + s, Load(l + s) / tot);
  for (int64_t s = nv; s < n; ++s) l[s] = l[s] / total;
}

struct Problem {
  const float *q, *k, *v;
  const int32_t *start, *end;
  float* out;
  int64_t B, K, G, S, H;
  float scale;
  int64_t tasks;

  // One (b, kv head) pair.
  void Task(int64_t bk, std::vector<float>& logits) const {
    const int64_t b = bk / K;
    const int64_t s0 = std::clamp<int64_t>(start[b], 0, S);
    const int64_t s1 = std::clamp<int64_t>(end[b], 0, S);
    const float* qp = q + bk * G * H;  // [G, H]
    const float* kp = k + bk * S * H;  // [S, H]
    const float* vp = v + bk * S * H;
    float* op = out + bk * G * H;
    const int64_t n = s1 - s0;
    if (n <= 0) {
      std::memset(op, 0, G * H * sizeof(float));
      return;
    }
    logits.resize(G * n);
    const HeadDimKernels* fast = ForHeadDim(H);
    // logits[g, s] = scale * q[g] . k[s]
    for (int64_t g = 0; g < G; ++g) {
      if (fast != nullptr) {
        fast->logits(qp + g * H, kp + s0 * H, n, scale, logits.data() + g * n);
        continue;
      }
      const float* qr = qp + g * H;
      for (int64_t s = 0; s < n; ++s) {
        const float* kr = kp + (s0 + s) * H;
        float dot = 0;
        for (int64_t h = 0; h < H; ++h) dot += qr[h] * kr[h];
        logits[g * n + s] = dot * scale;
      }
    }
    for (int64_t g = 0; g < G; ++g) Softmax(logits.data() + g * n, n);  // probs, per g
    // out[g] = sum_s probs[g, s] v[s]
    if (fast != nullptr) {
      fast->weighted_sum(logits.data(), n, vp + s0 * H, G, op);
      return;
    }
    std::memset(op, 0, G * H * sizeof(float));
    for (int64_t s = 0; s < n; ++s) {
      const float* vr = vp + (s0 + s) * H;
      for (int64_t g = 0; g < G; ++g) {
        const float p = logits[g * n + s];
        float* o = op + g * H;
        for (int64_t h = 0; h < H; ++h) o[h] += p * vr[h];
      }
    }
  }

};

// ---- bfloat16 and int8 caches -------------------------------------------------------------
// K and V rows are widened to float32 in registers as they stream (LoadW, simd.h: native-width
// vectors, kN floats); int8 values carry a float32 scale per (b, kv head, token). Everything after
// the widening is float32. Native width because on AVX2 the 16-float Vec of the float32 path
// lives in memory (docs/kernels.md, "Native-width vectors").
using mmjax_simd::LoadW;
using mmjax_simd::NLoad;
using mmjax_simd::NStore;
using mmjax_simd::NVec;
using mmjax_simd::ToFloat;
constexpr int kN = mmjax_simd::kNLanes;

// r[i] = HSum(v[i]) for kN vectors (Sums16 at native width).
#if defined(__AVX512F__)
inline NVec NSums(const NVec* v) { return Sums16(v); }  // kN == 16: NVec is Vec
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
  for (int i = 0; i < kN; ++i) r[i] = HSum(v[i]);
  return r;
}
#endif

// l[0:n] = softmax(l[0:n]) * v_scale[0:n] (v_scale null: 1), in place; v[s] * v_scale[s] is
// folded into the probabilities. Softmax's steps at native width: with the 16-float vectors of
// the float32 path, AVX2 spilled every step of exp and the softmax cost as much as the logits.
void NarrowSoftmax(float* l, int64_t n, const float* v_scale) {
  const int64_t nv = n / kN * kN;
  float m = l[0];
  if (nv > 0) {
    NVec mv = NLoad(l);
    for (int64_t s = kN; s < nv; s += kN) {
      const NVec x = NLoad(l + s);
      mv = x > mv ? x : mv;
    }
    m = std::max(m, HMax(mv));
  }
  for (int64_t s = nv; s < n; ++s) m = std::max(m, l[s]);
  NVec tv{};
  for (int64_t s = 0; s < nv; s += kN) {
    const NVec e = mmjax_simd::NExp(NLoad(l + s) - m);
    NStore(l + s, e);
    tv += e;
  }
  float total = HSum(tv);
  for (int64_t s = nv; s < n; ++s) {
    l[s] = mmjax_simd::NExp(mmjax_simd::NSplat(l[s] - m))[0];
    total += l[s];
  }
  for (int64_t s = 0; s < nv; s += kN) {
    const NVec p = NLoad(l + s) / total;
    NStore(l + s, v_scale != nullptr ? p * NLoad(v_scale + s) : p);
  }
  for (int64_t s = nv; s < n; ++s) l[s] = l[s] / total * (v_scale != nullptr ? v_scale[s] : 1.0f);
}

// logits[s] = scale * k_scale[s] * q . k[s] for s < n (k_scale null: 1), head dim HV x kN.
template <typename T, int HV>
void NarrowLogits(const float* __restrict__ q, const T* __restrict__ k, const float* __restrict__ k_scale,
                  int64_t n, float scale, float* __restrict__ logits) {
  constexpr int64_t H = HV * kN;
  int64_t s = 0;
  for (; s + kN <= n; s += kN) {
    NVec acc[kN];
#pragma GCC unroll 16
    for (int i = 0; i < kN; ++i) {
      const T* kr = k + (s + i) * H;
      NVec a = NLoad(q) * LoadW(kr);
      for (int h = 1; h < HV; ++h) a += NLoad(q + h * kN) * LoadW(kr + h * kN);
      acc[i] = a;
    }
    NVec l = NSums(acc) * scale;
    if (k_scale != nullptr) l *= NLoad(k_scale + s);
    NStore(logits + s, l);
  }
  for (; s < n; ++s) {
    const T* kr = k + s * H;
    NVec a = NLoad(q) * LoadW(kr);
    for (int h = 1; h < HV; ++h) a += NLoad(q + h * kN) * LoadW(kr + h * kN);
    logits[s] = HSum(a) * scale * (k_scale != nullptr ? k_scale[s] : 1.0f);
  }
}

// out[g, 0:HC kN] += sum_s probs[g * ld + s] v[s, 0:HC kN] for g < GC, s < n; rows of v and out
// H apart. GC x HC accumulators stay in registers while the rows stream.
template <typename T, int GC, int HC>
void NarrowWeightedSum(const float* __restrict__ probs, int64_t ld, int64_t n, const T* __restrict__ v,
                       int64_t H, float* __restrict__ out) {
  NVec acc[GC][HC];
  for (int g = 0; g < GC; ++g)
    for (int h = 0; h < HC; ++h) acc[g][h] = NLoad(out + g * H + h * kN);
  for (int64_t s = 0; s < n; ++s) {
    const T* vr = v + s * H;
    for (int h = 0; h < HC; ++h) {
      const NVec w = LoadW(vr + h * kN);
      for (int g = 0; g < GC; ++g) acc[g][h] += probs[g * ld + s] * w;
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int h = 0; h < HC; ++h) NStore(out + g * H + h * kN, acc[g][h]);
}

// Heads per NarrowWeightedSum: 2 x GC accumulators + 2 widened rows + broadcasts fit the
// 16 (AVX2) or 32 (AVX-512) registers.
constexpr int kGC = kN >= 16 ? 8 : 4;
template <typename T>
using WeightedSumFn = void (*)(const float*, int64_t, int64_t, const T*, int64_t, float*);
template <typename T, int HC, size_t... GC>
constexpr std::array<WeightedSumFn<T>, sizeof...(GC)> WeightedSums(std::index_sequence<GC...>) {
  return {NarrowWeightedSum<T, int(GC) + 1, HC>...};
}
// kWeightedSum<T>[hc - 1][gc - 1]: hc in 1..2 vectors of the head dim, gc in 1..kGC heads.
template <typename T>
const std::array<WeightedSumFn<T>, kGC> kWeightedSum[2] = {WeightedSums<T, 1>(std::make_index_sequence<kGC>()),
                                                           WeightedSums<T, 2>(std::make_index_sequence<kGC>())};

template <typename T>
using LogitsFn = void (*)(const float*, const T*, const float*, int64_t, float, float*);
template <typename T, size_t... HV>
constexpr std::array<LogitsFn<T>, sizeof...(HV)> NarrowLogitsTable(std::index_sequence<HV...>) {
  return {NarrowLogits<T, int(HV) + 1>...};
}
// Head dims kN .. 256 in whole native vectors (AVX2: 8, 16, .., 256); others: plain loops.
constexpr int kMaxHV = 256 / kN;
template <typename T>
LogitsFn<T> NarrowLogitsFor(int64_t H) {
  static const auto table = NarrowLogitsTable<T>(std::make_index_sequence<kMaxHV>());
  if (H % kN != 0 || H / kN < 1 || H / kN > kMaxHV) return nullptr;
  return table[H / kN - 1];
}

// Decode attention over a cache of T (uint16_t: bfloat16, int8_t: int8 with k_scale / v_scale
// [B, K, S]). q, out float32 [B, K, G, H].
template <typename T>
struct NarrowProblem {
  const float* q;
  const T *k, *v;
  const float *k_scale, *v_scale;  // null for bfloat16
  const int32_t *start, *end;
  float* out;
  int64_t B, K, G, S, H;
  float scale;

  void Task(int64_t bk, std::vector<float>& logits) const {
    const int64_t b = bk / K;
    const int64_t s0 = std::clamp<int64_t>(start[b], 0, S);
    const int64_t s1 = std::clamp<int64_t>(end[b], 0, S);
    const int64_t n = s1 - s0;
    const float* qp = q + bk * G * H;  // [G, H]
    const T* kp = k + (bk * S + s0) * H;  // [n, H], the visible rows
    const T* vp = v + (bk * S + s0) * H;
    const float* ks = k_scale != nullptr ? k_scale + bk * S + s0 : nullptr;  // [n]
    const float* vs = v_scale != nullptr ? v_scale + bk * S + s0 : nullptr;
    float* op = out + bk * G * H;
    std::memset(op, 0, G * H * sizeof(float));
    if (n <= 0) return;
    logits.resize(G * n);
    // Keys in tiles of ~16 KiB of cache, so a tile read for the first head is in L1 for the
    // other G - 1 (each head widens its own copy in registers: no float32 copy of the cache).
    const int64_t tile = std::max<int64_t>(kN, 16384 / (H * int64_t(sizeof(T))) / kN * kN);
    const LogitsFn<T> fast = NarrowLogitsFor<T>(H);
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
      const int64_t m = std::min(tile, n - t0);
      for (int64_t g = 0; g < G; ++g) {
        float* l = logits.data() + g * n + t0;
        if (fast != nullptr) {
          fast(qp + g * H, kp + t0 * H, ks != nullptr ? ks + t0 : nullptr, m, scale, l);
          continue;
        }
        for (int64_t s = 0; s < m; ++s) {
          const T* kr = kp + (t0 + s) * H;
          float dot = 0;
          for (int64_t h = 0; h < H; ++h) dot += qp[g * H + h] * ToFloat(kr[h]);
          l[s] = dot * scale * (ks != nullptr ? ks[t0 + s] : 1.0f);
        }
      }
    }
    for (int64_t g = 0; g < G; ++g) NarrowSoftmax(logits.data() + g * n, n, vs);
    // out[g] = sum_s probs[g, s] v[s]: per tile of keys, per pair of head-dim vectors, per kGC
    // heads; the tile stays in L1 for the passes after the first.
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
      const int64_t m = std::min(tile, n - t0);
      if (fast == nullptr) {
        for (int64_t s = 0; s < m; ++s) {
          const T* vr = vp + (t0 + s) * H;
          for (int64_t g = 0; g < G; ++g) {
            const float p = logits[g * n + t0 + s];
            for (int64_t h = 0; h < H; ++h) op[g * H + h] += p * ToFloat(vr[h]);
          }
        }
        continue;
      }
      for (int64_t h0 = 0; h0 < H; h0 += 2 * kN) {
        const int hc = H - h0 >= 2 * kN ? 2 : 1;
        for (int64_t g0 = 0; g0 < G; g0 += kGC) {
          const int gc = int(std::min<int64_t>(kGC, G - g0));
          kWeightedSum<T>[hc - 1][gc - 1](logits.data() + g0 * n + t0, n, m, vp + t0 * H + h0, H,
                                          op + g0 * H + h0);
        }
      }
    }
  }
};

// The shapes every variant expects: q [B, K, G, H], k/v [B, K, S, H], start/end [B] and, for
// int8, k_scale / v_scale [B, K, S].
ffi::Error CheckShapes(const char* name, ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd,
                       ffi::Span<const int64_t> vd, ffi::Span<const int64_t> sd, ffi::Span<const int64_t> ed,
                       const ffi::Span<const int64_t>* scales = nullptr) {
  bool ok = qd.size() == 4 && kd.size() == 4 && vd.size() == 4 && kd[0] == qd[0] && kd[1] == qd[1] &&
            kd[3] == qd[3] && std::equal(kd.begin(), kd.end(), vd.begin()) && sd.size() == 1 &&
            sd[0] == qd[0] && ed.size() == 1 && ed[0] == qd[0];
  for (int i = 0; ok && scales != nullptr && i < 2; ++i)
    ok = scales[i].size() == 3 && std::equal(scales[i].begin(), scales[i].end(), kd.begin());
  if (ok) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(name) + ": expects q [B, K, G, H], k/v [B, K, S, H], start/end [B]" +
                                     (scales != nullptr ? ", k_scale/v_scale [B, K, S]" : ""));
}

template <typename T>
void RunNarrow(ffi::ThreadPool& pool, const float* q, const T* k, const T* v, const float* k_scale,
               const float* v_scale, const int32_t* start, const int32_t* end, float* out,
               ffi::Span<const int64_t> qd, int64_t S, float scale) {
  const NarrowProblem<T> p{q, k, v, k_scale, v_scale, start, end, out, qd[0], qd[1], qd[2], S, qd[3], scale};
  mmjax_pool::ParallelFor(pool, p.B * p.K, [&p](int64_t t) {
    thread_local std::vector<float> logits;
    p.Task(t, logits);
  });
}

ffi::Error DecodeAttentionBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::BF16> k,
                               ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::S32> end,
                               ffi::ResultBuffer<ffi::F32> out, float scale) {
  if (auto e = CheckShapes("mmjax_decode_attention_bf16", q.dimensions(), k.dimensions(), v.dimensions(),
                           start.dimensions(), end.dimensions());
      e.failure())
    return e;
  RunNarrow<uint16_t>(pool, q.typed_data(), k.typed_data(),
                      v.typed_data(), nullptr, nullptr, start.typed_data(),
                      end.typed_data(), out->typed_data(), q.dimensions(), k.dimensions()[2], scale);
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionS8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S8> k,
                             ffi::Buffer<ffi::S8> v, ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale,
                             ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::S32> end,
                             ffi::ResultBuffer<ffi::F32> out, float scale) {
  const ffi::Span<const int64_t> scales[2] = {k_scale.dimensions(), v_scale.dimensions()};
  if (auto e = CheckShapes("mmjax_decode_attention_s8", q.dimensions(), k.dimensions(), v.dimensions(),
                           start.dimensions(), end.dimensions(), scales);
      e.failure())
    return e;
  RunNarrow<int8_t>(pool, q.typed_data(), k.typed_data(), v.typed_data(), k_scale.typed_data(),
                    v_scale.typed_data(), start.typed_data(), end.typed_data(), out->typed_data(), q.dimensions(),
                    k.dimensions()[2], scale);
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> start,
                               ffi::Buffer<ffi::S32> end, ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (auto e = CheckShapes("mmjax_decode_attention_f32", qd, kd, v.dimensions(), start.dimensions(),
                           end.dimensions());
      e.failure())
    return e;
  auto p = std::make_unique<Problem>();
  p->q = q.typed_data();
  p->k = k.typed_data();
  p->v = v.typed_data();
  p->start = start.typed_data();
  p->end = end.typed_data();
  p->out = out->typed_data();
  p->B = qd[0];
  p->K = qd[1];
  p->G = qd[2];
  p->H = qd[3];
  p->S = kd[2];
  p->scale = scale;
  p->tasks = p->B * p->K;
  mmjax_pool::ParallelFor(pool, p->tasks, [&p](int64_t t) {
    thread_local std::vector<float> logits;
    p->Task(t, logits);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxDecodeAttentionF32, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxDecodeAttentionBF16, DecodeAttentionBF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxDecodeAttentionS8, DecodeAttentionS8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
