// Decode attention for XLA:CPU: one query token per row against the KV cache, float32 (bfloat16
// and int8 caches: decode_attention_narrow.cc).
//
// out[b, k, g, :] = softmax_s(scale * q[b, k, g, :] . K[b, k, s, :]) @ V[b, k, s, :]
// over the visible keys start[b] <= s < end[b] (decode_range in attention.py turns every
// MaskSpec without segments into that interval); a row with no visible key gives 0.
// Axis legend: B batch, K kv heads, G query heads per kv head, S cache length, H head dim.
// The paged variant (mmjax_paged_decode_attention_f32) reads the serving engine's pools
// [K, P, Z, H] through block tables [B, L], keys s < lengths[b]: the same loops over a list of
// row offsets (rows.h), so its sums run in the order of the row's gathered cache.
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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "pool.h"
#include "rows.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
using namespace mmjax_simd;

// logits[s] = scale * q . k[off[s]:] for s < n, head dim HV vectors of 16.
template <int HV>
void Logits(const float* __restrict__ q, const float* __restrict__ k, const int64_t* __restrict__ off, int64_t n,
            float scale, float* __restrict__ logits) {
  constexpr int64_t H = HV * kLanes;
  Vec qv[HV];
  for (int h = 0; h < HV; ++h) qv[h] = Load(q + h * kLanes);
  int64_t s = 0;
  for (; s + kLanes <= n; s += kLanes) {
    Vec acc[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      const float* kr = k + off[s + i];
      Vec a = qv[0] * Load(kr);
      for (int h = 1; h < HV; ++h) a += qv[h] * Load(kr + h * kLanes);
      acc[i] = a;
    }
    Store(logits + s, Sums16(acc) * scale);
  }
  for (; s < n; ++s) {
    const float* kr = k + off[s];
    Vec a = qv[0] * Load(kr);
    for (int h = 1; h < HV; ++h) a += qv[h] * Load(kr + h * kLanes);
    logits[s] = HSum(a) * scale;
  }
}

// out[g] = sum_s probs[g, s] v[off[s]:] for g < G, the G x HV output vectors in registers.
template <int HV, int GC>
void WeightedSum(const float* __restrict__ probs, int64_t n, const float* __restrict__ v,
                 const int64_t* __restrict__ off, int64_t G, float* __restrict__ out) {
  constexpr int64_t H = HV * kLanes;
  for (int64_t g0 = 0; g0 < G; g0 += GC) {
    const int gc = static_cast<int>(std::min<int64_t>(GC, G - g0));
    Vec acc[GC][HV];
    for (int g = 0; g < GC; ++g)
      for (int h = 0; h < HV; ++h) acc[g][h] = Vec{};
    for (int64_t s = 0; s < n; ++s) {
      const float* vr = v + off[s];
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
  void (*logits)(const float*, const float*, const int64_t*, int64_t, float, float*);
  void (*weighted_sum)(const float*, int64_t, const float*, const int64_t*, int64_t, float*);
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

struct Problem {
  const float *q, *k, *v;
  mmjax_rows::Rows rows;  // which rows of k / v each task reads (rows.h)
  float* out;
  int64_t G;
  float scale;

  // One (b, kv head) pair.
  void Task(int64_t bk, std::vector<float>& logits, std::vector<int64_t>& off) const {
    const int64_t K = rows.K, H = rows.H;
    const int64_t n = rows.Offsets(bk / K, bk % K, off);
    const float* qp = q + bk * G * H;  // [G, H]
    float* op = out + bk * G * H;
    if (n <= 0) {
      std::memset(op, 0, G * H * sizeof(float));
      return;
    }
    logits.resize(G * n);
    const HeadDimKernels* fast = ForHeadDim(H);
    // logits[g, s] = scale * q[g] . k[s]
    for (int64_t g = 0; g < G; ++g) {
      if (fast != nullptr) {
        fast->logits(qp + g * H, k, off.data(), n, scale, logits.data() + g * n);
        continue;
      }
      const float* qr = qp + g * H;
      for (int64_t s = 0; s < n; ++s) {
        const float* kr = k + off[s];
        float dot = 0;
        for (int64_t h = 0; h < H; ++h) dot += qr[h] * kr[h];
        logits[g * n + s] = dot * scale;
      }
    }
    // probs = softmax over s, per g
    const int64_t nv = n / kLanes * kLanes;
    for (int64_t g = 0; g < G; ++g) {
      float* l = logits.data() + g * n;
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
    // out[g] = sum_s probs[g, s] v[s]
    if (fast != nullptr) {
      fast->weighted_sum(logits.data(), n, v, off.data(), G, op);
      return;
    }
    std::memset(op, 0, G * H * sizeof(float));
    for (int64_t s = 0; s < n; ++s) {
      const float* vr = v + off[s];
      for (int64_t g = 0; g < G; ++g) {
        const float p = logits[g * n + s];
        float* o = op + g * H;
        for (int64_t h = 0; h < H; ++h) o[h] += p * vr[h];
      }
    }
  }

  void Run(ffi::ThreadPool& pool, int64_t B) const {
    mmjax_pool::ParallelFor(pool, B * rows.K, [this](int64_t t) {
      thread_local std::vector<float> logits;
      thread_local std::vector<int64_t> off;
      Task(t, logits, off);
    });
  }
};

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> start,
                               ffi::Buffer<ffi::S32> end, ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || kd[0] != qd[0] || kd[1] != qd[1] ||
      kd[3] != qd[3] || !std::equal(kd.begin(), kd.end(), vd.begin()) ||
      start.dimensions().size() != 1 || start.dimensions()[0] != qd[0] ||
      end.dimensions().size() != 1 || end.dimensions()[0] != qd[0])
    return ffi::Error::InvalidArgument(
        "mmjax_decode_attention_f32: expects q [B, K, G, H], k/v [B, K, S, H], start/end [B]");
  Problem p{q.typed_data(), k.typed_data(), v.typed_data(), {}, out->typed_data(), qd[2], scale};
  p.rows.K = qd[1];
  p.rows.H = qd[3];
  p.rows.start = start.typed_data();
  p.rows.end = end.typed_data();
  p.rows.S = kd[2];
  p.Run(pool, qd[0]);
  return ffi::Error::Success();
}

// The same over the serving engine's pools: q [B, K, G, H], k/v pages [K, P, Z, H], block tables
// [B, L], lengths [B] (rows.h).
ffi::Error PagedDecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> tables,
                                    ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = tables.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || kd[0] != qd[1] || kd[3] != qd[3] ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || td.size() != 2 || td[0] != qd[0] ||
      lengths.dimensions().size() != 1 || lengths.dimensions()[0] != qd[0] || kd[1] < 1)
    return ffi::Error::InvalidArgument(
        "mmjax_paged_decode_attention_f32: expects q [B, K, G, H], k/v pages [K, P, Z, H], tables [B, L], "
        "lengths [B]");
  Problem p{q.typed_data(), k.typed_data(), v.typed_data(), {}, out->typed_data(), qd[2], scale};
  p.rows.K = qd[1];
  p.rows.H = qd[3];
  p.rows.end = lengths.typed_data();
  p.rows.tables = tables.typed_data();
  p.rows.L = td[1];
  p.rows.P = kd[1];
  p.rows.Z = kd[2];
  p.Run(pool, qd[0]);
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxPagedDecodeAttentionF32, PagedDecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
