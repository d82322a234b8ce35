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
// it streams its K rows once for all G queries (GQA without repeating K/V), keeps the G x n
// logits in a thread-local buffer, and streams its V rows once. Tasks are claimed from an
// atomic counter by the caller and helpers on XLA's intra-op pool (as in cpu_gemv.cc: the
// caller only waits for tasks a running thread has claimed, so a busy pool cannot deadlock).
//
// Numerics follow xla_attention: logits * scale, max, exp(l - max), sum, probs = e / sum,
// out = sum_s probs * v, all float32; only the summation order differs. exp is a degree-7
// polynomial after range reduction (relative error ~1e-7, like XLA's own).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

inline float HSum(Vec v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

struct Problem {
  const float *q, *k, *v;
  const int32_t *start, *end;
  float* out;
  int64_t B, K, G, S, H;
  float scale;
  int64_t tasks;
  std::atomic<int64_t> next{0}, done{0};

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
    const int64_t hv = H / kLanes * kLanes;
    // logits[g, s] = scale * q[g] . k[s]
    for (int64_t s = 0; s < n; ++s) {
      const float* kr = kp + (s0 + s) * H;
      for (int64_t g = 0; g < G; ++g) {
        const float* qr = qp + g * H;
        Vec acc{};
        for (int64_t h = 0; h < hv; h += kLanes) acc += Load(qr + h) * Load(kr + h);
        float dot = HSum(acc);
        for (int64_t h = hv; h < H; ++h) dot += qr[h] * kr[h];
        logits[g * n + s] = dot * scale;
      }
    }
    // probs = softmax over s, per g
    for (int64_t g = 0; g < G; ++g) {
      float* l = logits.data() + g * n;
      float m = l[0];
      for (int64_t s = 1; s < n; ++s) m = std::max(m, l[s]);
      const int64_t nv = n / kLanes * kLanes;
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
      for (int64_t s = 0; s < n; ++s) l[s] = l[s] / total;
    }
    // out[g] = sum_s probs[g, s] v[s]
    std::memset(op, 0, G * H * sizeof(float));
    for (int64_t s = 0; s < n; ++s) {
      const float* vr = vp + (s0 + s) * H;
      for (int64_t g = 0; g < G; ++g) {
        const float p = logits[g * n + s];
        float* o = op + g * H;
        for (int64_t h = 0; h < hv; h += kLanes) Store(o + h, Load(o + h) + p * Load(vr + h));
        for (int64_t h = hv; h < H; ++h) o[h] += p * vr[h];
      }
    }
  }

  void Run() {
    thread_local std::vector<float> logits;
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      Task(t, logits);
      done.fetch_add(1, std::memory_order_release);
    }
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
  auto p = std::make_shared<Problem>();  // shared: a late helper task may still hold it
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
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), p->tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([p] { p->Run(); });
  p->Run();
  while (p->done.load(std::memory_order_acquire) < p->tasks) std::this_thread::yield();
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
