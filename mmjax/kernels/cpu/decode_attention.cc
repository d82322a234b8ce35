// Decode attention for XLA:CPU: one query token per row against the KV cache, read as it is
// stored: float32, bfloat16, or int8 with k_scale / v_scale.
//
// out[b, k, g, :] = softmax_s(scale * q[b, k, g, :] . K[b, k, s, :]) @ V[b, k, s, :] over the
// visible keys start[b] <= s < end[b] (decode_range in attention.py turns every MaskSpec without
// segments into that interval); a row with no visible key gives 0. q and out are float32
// [B, K, G, H]; K, V are [B, K, S, H] float32, bfloat16, or int8 with k_scale / v_scale float32
// [B, K, S] (K[b, k, s, :] = int8 * k_scale[b, k, s]: one symmetric scale per token and kv head).
// Axis legend: B batch, K kv heads, G query heads per kv head, S cache length, H head dim.
// Paged variants (mmjax_paged_decode_attention_{f32,bf16,s8}): the serving engine's pools
// [K, P, Z, H] (scales [K, P, Z]) through block tables [B, L], keys s < lengths[b]. Both read
// through a list of row offsets (rows.h), so a paged row sums in the order of its gathered copy.
//
// Why: as XLA ops at batch 8 the q.K dot, the max/exp/sum and probs @ V ran as tiny fusions
// (~40 ms of thread time a step against ~4 ms of cache to read). A narrow cache halves or
// quarters the step's largest read after the weights; its rows are widened to float32 in
// registers as they stream (LoadW, simd.h, as cpu.gemv does for weights). Everything after the
// load is float32, and one template serves the three dtypes.
//
// One task per (b, kv head), shared out by mmjax_pool::ParallelFor (pool.h), keys in tiles of
// ~16 KiB of cache:
//  * logits (NarrowLogits): each key row widened once and dotted with all G query rows, 2-8 rows
//    x up to 4 heads of dot products interleaved (LogitRows); the dot products of kN keys
//    reduced together (NSums), * scale * k_scale. Widening each row once per head instead ran
//    ~1.4x slower at G 3;
//  * softmax over the row, v_scale folded into the probabilities (NarrowSoftmax);
//  * probs @ V per tile, up to kGC heads x as many head-dim vectors as the registers hold of
//    accumulators (NarrowWeightedSum); the passes over a tile after the first find it in L1.
// Both products keep 8-12 independent accumulators in flight: with one dot product at a time
// (logits) and 2 head-dim vectors x 3 heads (probs @ V), each FMA waited on the one before it.
// Interleaved, benchmarks.kv_cache_attention (K 4, G 3, S 2048, H 64; two alternating runs)
// went at batch 1 from 0.29 / 0.20 / 0.17 ms a call (float32 / bfloat16 / int8) to
// 0.21 / 0.13 / 0.10, at batch 8 from 1.9-2.3 / 1.1-1.6 / 0.77-0.87 to 1.5-1.6 / 0.89-0.94 /
// 0.70-0.72. Each (row, head) still sums its products in head-dim order and each output lane
// its key rows in order.
// Head dims that are not whole native vectors take plain loops.
// A row that sees more than kSplitRows (1024) keys runs in parts of about equal size, each its
// own task, merged by the row's last part (flash-decoding: each part's sum of exp(logit - max) V
// with its max and sum, rescaled to the common max). Before, one kv head at batch 1 (MQA) ran the
// whole attention on one core: K 1, G 8, S 4096, H 64 went 0.30-0.33 -> 0.15-0.18 ms (float32),
// 0.18-0.19 -> 0.10-0.13 (int8). Where the rows already fill the threads it costs ~2% (batch 8,
// K 4, S 2048, int8, interleaved: 0.689 ms unsplit, 0.705 split). The split depends on the
// row's length and the split_rows attribute only, so a row's result is the same in any batch
// and with any thread count (not across vector widths: parts and sums follow kN).
//
// Native-width vectors (NVec, kN = 8 floats on AVX2, 16 on AVX-512) throughout. The float32 cache
// had its own kernel on 16-float vectors, which live in memory on AVX2 (docs/cpu_kernels.md,
// "Native-width vectors"); this template ran it 1.8x faster at batch 1 (12 layers of a 420-key
// cache, 12 heads of 64: 186 -> 99 us a layer) and ~1.1x at batch 8. exp is a degree-7 polynomial
// after range reduction (relative error ~1e-7, like XLA's own).
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "pool.h"
#include "rows.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
using namespace mmjax_simd;

constexpr int kN = kNLanes;

// l[0:n] = softmax(l[0:n]) * v_scale[0:n] (v_scale null: 1), in place: max, exp(l - max), sum,
// l / sum, as the float32 kernel; v[s] * v_scale[s] folded into the probabilities. With
// max_sum (a part of a split row): exp(l - max) * v_scale, not divided; max_sum = {max, sum}.
void NarrowSoftmax(float* l, int64_t n, const float* v_scale, float* max_sum = nullptr) {
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
    const NVec e = NExp(NLoad(l + s) - m);
    NStore(l + s, e);
    tv += e;
  }
  float total = HSum(tv);
  for (int64_t s = nv; s < n; ++s) {
    l[s] = NExp(NSplat(l[s] - m))[0];
    total += l[s];
  }
  if (max_sum != nullptr) {
    max_sum[0] = m;
    max_sum[1] = total;
    if (v_scale != nullptr)
      for (int64_t s = 0; s < n; ++s) l[s] *= v_scale[s];
    return;
  }
  for (int64_t s = 0; s < nv; s += kN) {
    const NVec p = NLoad(l + s) / total;
    NStore(l + s, v_scale != nullptr ? p * NLoad(v_scale + s) : p);
  }
  for (int64_t s = nv; s < n; ++s) l[s] = l[s] / total * (v_scale != nullptr ? v_scale[s] : 1.0f);
}

// Key rows of a block of kN dotted with a group of GC query heads: R x GC accumulators, one per
// (row, head). Rows of one block, so R divides kN; R x GC <= 12 of AVX2's 16 registers.
constexpr int RowsFor(int gc) { return std::min<int>(kN, gc == 1 ? 8 : gc <= 3 ? 4 : 2); }
static_assert(kN % RowsFor(1) == 0 && kN % RowsFor(2) == 0 && kN % RowsFor(3) == 0 && kN % RowsFor(4) == 0,
              "LogitRows' rows are rows of one block of kN keys");
constexpr int kLogitGC = 4;  // heads per group

// part[g * kN + i0 + r] = q[g0 + g] . k[off[r]] as kN partial sums (lanes), for r < R, g < GC:
// each (row, head) summed over the head dim in order, h = 0 .. HV - 1, one multiply then FMAs,
// with R x GC such chains interleaved. One chain at a time (each row widened once, then dotted
// with the G heads one after another) left each FMA waiting on the one before it: 8 dependent
// FMAs per (row, head), ~32 cycles a key row at G 3 on the 2-core EPYC.
template <typename T, int HV, int R, int GC>
void LogitRows(const float* __restrict__ q, int64_t g0, const T* __restrict__ k, const int64_t* __restrict__ off,
               int i0, NVec* __restrict__ part) {
  constexpr int64_t H = HV * kN;
  const T* kr[R];
  for (int r = 0; r < R; ++r) kr[r] = k + off[i0 + r];
  NVec acc[R][GC];
  for (int r = 0; r < R; ++r) {
    const NVec kv = LoadW(kr[r]);
    for (int g = 0; g < GC; ++g) acc[r][g] = NLoad(q + (g0 + g) * H) * kv;
  }
#pragma GCC unroll 8
  for (int h = 1; h < HV; ++h)
    for (int r = 0; r < R; ++r) {
      const NVec kv = LoadW(kr[r] + h * kN);
      for (int g = 0; g < GC; ++g) acc[r][g] += NLoad(q + (g0 + g) * H + h * kN) * kv;
    }
  for (int g = 0; g < GC; ++g)
    for (int r = 0; r < R; ++r) part[(g0 + g) * kN + i0 + r] = acc[r][g];
}

// One block of kN key rows against the heads [g0, g0 + GC), RowsFor(GC) rows at a time.
template <typename T, int HV, int GC>
void LogitBlock(const float* q, int64_t g0, const T* k, const int64_t* off, NVec* part) {
  for (int i = 0; i < kN; i += RowsFor(GC)) LogitRows<T, HV, RowsFor(GC), GC>(q, g0, k, off, i, part);
}

// logits[g * ld + s] = scale * k_scale[s] * q[g] . k[s] for g < G, s < n (k_scale null: 1): per
// block of kN keys, LogitRows for each group of up to kLogitGC heads; the G x kN partial dot
// products wait in `part` for NSums.
template <typename T, int HV>
void NarrowLogits(const float* __restrict__ q, int64_t G, const T* __restrict__ k, const int64_t* __restrict__ off,
                  const float* __restrict__ k_scale, int64_t n, float scale, float* __restrict__ logits, int64_t ld) {
  constexpr int64_t H = HV * kN;
  thread_local std::vector<NVec> part_buffer;
  part_buffer.resize(G * kN);
  NVec* __restrict__ part = part_buffer.data();  // [G, kN]
  int64_t s = 0;
  for (; s + kN <= n; s += kN) {
    for (int64_t g0 = 0; g0 < G; g0 += kLogitGC) {
      switch (std::min<int64_t>(kLogitGC, G - g0)) {
        case 1: LogitBlock<T, HV, 1>(q, g0, k, off + s, part); break;
        case 2: LogitBlock<T, HV, 2>(q, g0, k, off + s, part); break;
        case 3: LogitBlock<T, HV, 3>(q, g0, k, off + s, part); break;
        default: LogitBlock<T, HV, 4>(q, g0, k, off + s, part);
      }
    }
    const NVec ksv = k_scale != nullptr ? NLoad(k_scale + s) * scale : NSplat(scale);
    for (int64_t g = 0; g < G; ++g) NStore(logits + g * ld + s, NSums(part + g * kN) * ksv);
  }
  for (; s < n; ++s) {
    const T* kr = k + off[s];
    for (int64_t g = 0; g < G; ++g) {
      NVec a = NLoad(q + g * H) * LoadW(kr);
      for (int h = 1; h < HV; ++h) a += NLoad(q + g * H + h * kN) * LoadW(kr + h * kN);
      logits[g * ld + s] = HSum(a) * scale * (k_scale != nullptr ? k_scale[s] : 1.0f);
    }
  }
}

// out[g, 0:HC kN] += sum_s probs[g * ld + s] v[off[s]:][0:HC kN] for g < GC, s < n; rows of out
// H apart. GC x HC accumulators stay in registers while the rows stream.
template <typename T, int GC, int HC>
void NarrowWeightedSum(const float* __restrict__ probs, int64_t ld, int64_t n, const T* __restrict__ v,
                       const int64_t* __restrict__ off, int64_t H, float* __restrict__ out) {
  NVec acc[GC][HC];
  for (int g = 0; g < GC; ++g)
    for (int h = 0; h < HC; ++h) acc[g][h] = NLoad(out + g * H + h * kN);
  for (int64_t s = 0; s < n; ++s) {
    const T* vr = v + off[s];
    for (int h = 0; h < HC; ++h) {
      const NVec w = LoadW(vr + h * kN);
      for (int g = 0; g < GC; ++g) acc[g][h] += probs[g * ld + s] * w;
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int h = 0; h < HC; ++h) NStore(out + g * H + h * kN, acc[g][h]);
}

// Heads per NarrowWeightedSum, and head-dim vectors per head: GC x HC accumulators + GC
// broadcast probabilities + the widened row fit the 16 (AVX2) or 32 (AVX-512) registers, HC as
// large as that allows (up to 8): each accumulator takes one FMA per key row, so fewer than ~8 of
// them leave the FMA units waiting on latency (G 3 at 2 vectors: 6 chains, ~22 cycles a key row
// on the 2-core EPYC).
constexpr int kGC = kN >= 16 ? 8 : 4;
constexpr int kRegisters = kN >= 16 ? 32 : 16;
constexpr int kMaxHC = 8;
constexpr int WideFor(int gc) { return std::min(kMaxHC, (kRegisters - 1 - gc) / gc); }
template <typename T>
using WeightedSumFn = void (*)(const float*, int64_t, int64_t, const T*, const int64_t*, int64_t, float*);
template <typename T, int HC, size_t... GC>
constexpr std::array<WeightedSumFn<T>, sizeof...(GC)> WeightedSums(std::index_sequence<GC...>) {
  return {NarrowWeightedSum<T, int(GC) + 1, HC>...};
}
template <typename T, size_t... HC>
constexpr std::array<std::array<WeightedSumFn<T>, kGC>, sizeof...(HC)> WeightedSumTable(std::index_sequence<HC...>) {
  return {WeightedSums<T, int(HC) + 1>(std::make_index_sequence<kGC>())...};
}
// kWeightedSum<T>[hc - 1][gc - 1]: hc in 1..kMaxHC vectors of the head dim, gc in 1..kGC heads.
template <typename T>
const auto kWeightedSum = WeightedSumTable<T>(std::make_index_sequence<kMaxHC>());

template <typename T>
using LogitsFn = void (*)(const float*, int64_t, const T*, const int64_t*, const float*, int64_t, float, float*, int64_t);
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

// Rows that see more than split_rows keys (the attribute; decode_attention.py passes SPLIT_ROWS,
// 1024) are split into PartsOf(n, split_rows) parts of ChunkRows(n, parts) keys (whole native
// vectors), each its own task, merged by the row's last part (NarrowProblem::Run).
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
inline int64_t PartsOf(int64_t n, int64_t split_rows) { return n <= split_rows ? 1 : (n + split_rows - 1) / split_rows; }
inline int64_t ChunkRows(int64_t n, int64_t parts) {
  return parts == 1 ? n : ((n + parts - 1) / parts + kN - 1) / kN * kN;
}

// Decode attention over a cache of T (uint16_t: bfloat16, int8_t: int8 with k_scale / v_scale,
// one per row: [B, K, S] or, paged, [K, P, Z]). q, out float32 [B, K, G, H]; rows.h says which
// rows of k / v each (b, kv head) task reads.
template <typename T>
struct NarrowProblem {
  const float* q;
  const T *k, *v;
  const float *k_scale, *v_scale;  // null for bfloat16
  mmjax_rows::Rows rows;
  float* out;
  int64_t G;
  float scale;
  int64_t split_rows;

  // Rows [part * chunk, (part + 1) * chunk) of the n that (b, kv head) bk sees, chunk =
  // ChunkRows(n, parts). One part: the softmax-weighted sum into out. Several: the sum of
  // exp(logit - max) v into op [G, H], max and sum into max_sum [G, 2], for Merge.
  void Task(int64_t bk, int64_t part, int64_t parts, float* op, float* max_sum, std::vector<float>& logits,
            std::vector<int64_t>& offsets, std::vector<int64_t>& index, std::vector<float>& scales) const {
    const int64_t K = rows.K, H = rows.H;
    const float* qp = q + bk * G * H;  // [G, H]
    std::memset(op, 0, G * H * sizeof(float));
    if (max_sum != nullptr)
      for (int64_t g = 0; g < G; ++g) max_sum[2 * g] = kNegInf, max_sum[2 * g + 1] = 0;
    const int64_t chunk = ChunkRows(rows.Count(bk / K), parts);
    const int64_t n = rows.Offsets(bk / K, bk % K, offsets, part * chunk, chunk, k_scale != nullptr ? &index : nullptr);
    if (n <= 0) return;
    const int64_t* off = offsets.data();
    logits.resize(G * n);
    const float *ks = nullptr, *vs = nullptr;  // [n]: the rows' scales, in order
    if (k_scale != nullptr) {
      scales.resize(2 * n);
      for (int64_t s = 0; s < n; ++s) {  // a row's scale is at its offset / H (index[s]: no division)
        scales[s] = k_scale[index[s]];
        scales[n + s] = v_scale[index[s]];
      }
      ks = scales.data();
      vs = ks + n;
    }
    // Keys in tiles of ~16 KiB of cache (the weighted sum's passes over a tile after the first
    // find it in L1).
    const int64_t tile = std::max<int64_t>(kN, 16384 / (H * int64_t(sizeof(T))) / kN * kN);
    const LogitsFn<T> fast = NarrowLogitsFor<T>(H);
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
      const int64_t m = std::min(tile, n - t0);
      if (fast != nullptr) {
        fast(qp, G, k, off + t0, ks != nullptr ? ks + t0 : nullptr, m, scale, logits.data() + t0, n);
        continue;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* l = logits.data() + g * n + t0;
        for (int64_t s = 0; s < m; ++s) {
          const T* kr = k + off[t0 + s];
          float dot = 0;
          for (int64_t h = 0; h < H; ++h) dot += qp[g * H + h] * ToFloat(kr[h]);
          l[s] = dot * scale * (ks != nullptr ? ks[t0 + s] : 1.0f);
        }
      }
    }
    for (int64_t g = 0; g < G; ++g)
      NarrowSoftmax(logits.data() + g * n, n, vs, max_sum != nullptr ? max_sum + 2 * g : nullptr);
    // out[g] = sum_s probs[g, s] v[s]: per tile of keys, per kGC heads, per WideFor(gc) head-dim
    // vectors; the tile stays in L1 for the passes after the first.
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
      const int64_t m = std::min(tile, n - t0);
      if (fast == nullptr) {
        for (int64_t s = 0; s < m; ++s) {
          const T* vr = v + off[t0 + s];
          for (int64_t g = 0; g < G; ++g) {
            const float p = logits[g * n + t0 + s];
            for (int64_t h = 0; h < H; ++h) op[g * H + h] += p * ToFloat(vr[h]);
          }
        }
        continue;
      }
      for (int64_t g0 = 0; g0 < G; g0 += kGC) {
        const int gc = int(std::min<int64_t>(kGC, G - g0));
        for (int64_t h0 = 0; h0 < H;) {
          const int hc = int(std::min<int64_t>(WideFor(gc), (H - h0) / kN));
          kWeightedSum<T>[hc - 1][gc - 1](logits.data() + g0 * n + t0, n, m, v + h0, off + t0, H,
                                          op + g0 * H + h0);
          h0 += hc * kN;
        }
      }
    }
  }

  // Rows of more than split_rows visible keys run in parts of about equal size (flash-decoding),
  // as tasks of their own, then Merge: a long row no longer runs on one thread while the others
  // wait (one kv head at batch 1: the whole attention on one core). How a row is split depends on
  // its own length only, never on the batch or the thread count, so a row's result is the same in
  // any batch (the serving engine's answers stay equal to mmjax.generate's).
  void Run(ffi::ThreadPool& pool, int64_t B) const {
    const int64_t K = rows.K, H = rows.H;
    std::vector<int64_t> parts(B), first(B + 1, 0);  // row b: parts[b] per kv head, tasks [first[b], first[b + 1])
    for (int64_t b = 0; b < B; ++b) {
      parts[b] = PartsOf(rows.Count(b), split_rows);
      first[b + 1] = first[b] + K * parts[b];
    }
    const int64_t tasks = first[B];
    // [tasks, G, H] and [tasks, G, 2]: the split rows' parts (each Task clears its own slots)
    std::unique_ptr<float[]> partial, max_sum;
    std::unique_ptr<std::atomic<int64_t>[]> left;  // parts of (b, kv head) still running
    if (tasks > B * K) {
      partial.reset(new float[tasks * G * H]);
      max_sum.reset(new float[tasks * G * 2]);
      left.reset(new std::atomic<int64_t>[B * K]);
      for (int64_t bk = 0; bk < B * K; ++bk) left[bk].store(parts[bk / K]);
    }
    mmjax_pool::ParallelFor(pool, tasks, [&](int64_t t) {
      thread_local std::vector<float> logits, scales;
      thread_local std::vector<int64_t> off, index;
      const int64_t b = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
      const int64_t p = parts[b], kh = (t - first[b]) / p, bk = b * K + kh;
      if (p == 1) {
        Task(bk, 0, 1, out + bk * G * H, nullptr, logits, off, index, scales);
        return;
      }
      Task(bk, (t - first[b]) % p, p, partial.get() + t * G * H, max_sum.get() + t * G * 2, logits, off, index,
           scales);
      if (left[bk].fetch_sub(1, std::memory_order_acq_rel) == 1) {  // the row's last part: merge its parts
        const int64_t t0 = first[b] + kh * p;
        Merge(partial.get() + t0 * G * H, max_sum.get() + t0 * G * 2, p, out + bk * G * H);
      }
    });
  }

  // out[g] = sum_p exp(m_p - M) o_p[g] / sum_p exp(m_p - M) l_p, M = max_p m_p, over the parts
  // of one split row (each part's o_p = sum exp(logit - m_p) v, l_p = sum exp(logit - m_p)).
  void Merge(const float* o, const float* max_sum, int64_t parts, float* dst) const {
    const int64_t H = rows.H;
    for (int64_t g = 0; g < G; ++g) {
      float m = kNegInf, den = 0;
      for (int64_t p = 0; p < parts; ++p) m = std::max(m, max_sum[(p * G + g) * 2]);
      float* d = dst + g * H;
      std::memset(d, 0, H * sizeof(float));
      if (m == kNegInf) continue;  // no visible key
      for (int64_t p = 0; p < parts; ++p) {
        const float w = std::exp(max_sum[(p * G + g) * 2] - m);
        den += w * max_sum[(p * G + g) * 2 + 1];
        const float* op = o + (p * G + g) * H;
        for (int64_t h = 0; h < H; ++h) d[h] += w * op[h];
      }
      for (int64_t h = 0; h < H; ++h) d[h] /= den;
    }
  }
};

// The shapes each call expects: q [B, K, G, H] and
//  * contiguous: k/v [B, K, S, H], a = start [B], b = end [B];
//  * paged: k/v pages [K, P, Z, H], a = tables [B, L], b = lengths [B];
// int8: k_scale / v_scale the first three dims of k ([B, K, S] or [K, P, Z]).
template <bool kPaged>
ffi::Error CheckShapes(const char* name, ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd,
                       ffi::Span<const int64_t> vd, ffi::Span<const int64_t> ad, ffi::Span<const int64_t> bd,
                       const ffi::Span<const int64_t>* scales) {
  bool ok = qd.size() == 4 && kd.size() == 4 && vd.size() == 4 && std::equal(kd.begin(), kd.end(), vd.begin()) &&
            kd[3] == qd[3] && bd.size() == 1 && bd[0] == qd[0];
  if (kPaged)
    ok = ok && kd[0] == qd[1] && kd[1] >= 1 && ad.size() == 2 && ad[0] == qd[0];
  else
    ok = ok && kd[0] == qd[0] && kd[1] == qd[1] && ad.size() == 1 && ad[0] == qd[0];
  for (int i = 0; ok && scales != nullptr && i < 2; ++i)
    ok = scales[i].size() == 3 && std::equal(scales[i].begin(), scales[i].end(), kd.begin());
  if (ok) return ffi::Error::Success();
  const std::string layout = kPaged ? "k/v pages [K, P, Z, H], tables [B, L], lengths [B]"
                                    : "k/v [B, K, S, H], start/end [B]";
  const std::string scale_layout = kPaged ? "[K, P, Z]" : "[B, K, S]";
  return ffi::Error::InvalidArgument(std::string(name) + ": expects q [B, K, G, H], " + layout +
                                     (scales != nullptr ? ", k_scale/v_scale " + scale_layout : ""));
}

// Checks the shapes, then runs NarrowProblem<T> over the rows of the contiguous cache or the pools.
template <bool kPaged, typename KV>
ffi::Error Solve(const char* name, ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> q, KV k, KV v,
                 const ffi::Buffer<ffi::F32>* k_scale, const ffi::Buffer<ffi::F32>* v_scale, ffi::Buffer<ffi::S32> a,
                 ffi::Buffer<ffi::S32> b, ffi::ResultBuffer<ffi::F32> out, float scale, int64_t split_rows) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  const ffi::Span<const int64_t> scales[2] = {k_scale != nullptr ? k_scale->dimensions() : kd,
                                              v_scale != nullptr ? v_scale->dimensions() : kd};
  if (auto e = CheckShapes<kPaged>(name, qd, kd, v.dimensions(), a.dimensions(), b.dimensions(),
                                   k_scale != nullptr ? scales : nullptr);
      e.failure())
    return e;
  using T = std::remove_pointer_t<decltype(k.typed_data())>;
  NarrowProblem<T> p{q.typed_data(), k.typed_data(), v.typed_data(),
                     k_scale != nullptr ? k_scale->typed_data() : nullptr,
                     v_scale != nullptr ? v_scale->typed_data() : nullptr, {}, out->typed_data(), qd[2], scale,
                     std::max<int64_t>(split_rows, 1)};
  p.rows.K = qd[1];
  p.rows.H = qd[3];
  p.rows.end = b.typed_data();
  if (kPaged) {
    p.rows.tables = a.typed_data();
    p.rows.L = a.dimensions()[1];
    p.rows.P = kd[1];
    p.rows.Z = kd[2];
  } else {
    p.rows.start = a.typed_data();
    p.rows.S = kd[2];
  }
  p.Run(pool, qd[0]);
  return ffi::Error::Success();
}

template <ffi::DataType DT, bool kPaged>
const char* TargetName() {
  static const char* const names[2][3] = {
      {"mmjax_decode_attention_f32", "mmjax_decode_attention_bf16", "mmjax_decode_attention_s8"},
      {"mmjax_paged_decode_attention_f32", "mmjax_paged_decode_attention_bf16", "mmjax_paged_decode_attention_s8"}};
  return names[kPaged][DT == ffi::F32 ? 0 : DT == ffi::BF16 ? 1 : 2];
}

// The handlers: a float32 or bfloat16 cache, and an int8 cache with its scales.
template <ffi::DataType DT, bool kPaged>
ffi::Error DecodeFloat(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<DT> k, ffi::Buffer<DT> v,
                       ffi::Buffer<ffi::S32> a, ffi::Buffer<ffi::S32> b, ffi::ResultBuffer<ffi::F32> out,
                       float scale, int64_t split_rows) {
  return Solve<kPaged>(TargetName<DT, kPaged>(), pool, q, k, v, nullptr, nullptr, a, b, out, scale, split_rows);
}

template <bool kPaged>
ffi::Error DecodeS8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S8> k, ffi::Buffer<ffi::S8> v,
                    ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::S32> a,
                    ffi::Buffer<ffi::S32> b, ffi::ResultBuffer<ffi::F32> out, float scale, int64_t split_rows) {
  return Solve<kPaged>(TargetName<ffi::S8, kPaged>(), pool, q, k, v, &k_scale, &v_scale, a, b, out, scale,
                       split_rows);
}

// Their bindings: q, k, v (, k_scale, v_scale), a, b -> out, attributes scale and split_rows.
template <ffi::DataType DT>
auto Binding() {
  auto kv = ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<DT>>().template
            Arg<ffi::Buffer<DT>>();
  if constexpr (DT == ffi::S8) {
    return std::move(kv).template Arg<ffi::Buffer<ffi::F32>>().template Arg<ffi::Buffer<ffi::F32>>().template
        Arg<ffi::Buffer<ffi::S32>>().template Arg<ffi::Buffer<ffi::S32>>().template Ret<ffi::Buffer<ffi::F32>>()
        .template Attr<float>("scale").template Attr<int64_t>("split_rows");
  } else {
    return std::move(kv).template Arg<ffi::Buffer<ffi::S32>>().template Arg<ffi::Buffer<ffi::S32>>().template
        Ret<ffi::Buffer<ffi::F32>>().template Attr<float>("scale").template Attr<int64_t>("split_rows");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxDecodeAttentionF32, (DecodeFloat<ffi::F32, false>), Binding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxDecodeAttentionBF16, (DecodeFloat<ffi::BF16, false>), Binding<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxDecodeAttentionS8, DecodeS8<false>, Binding<ffi::S8>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxPagedDecodeAttentionF32, (DecodeFloat<ffi::F32, true>), Binding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxPagedDecodeAttentionBF16, (DecodeFloat<ffi::BF16, true>), Binding<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxPagedDecodeAttentionS8, DecodeS8<true>, Binding<ffi::S8>());
