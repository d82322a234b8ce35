// Prefill attention for XLA:CPU: every query token of a prompt against that prompt's keys,
// float32, flash-attention style (online softmax over key blocks; no [T, S] matrix in memory).
//
// out[b, t, n, :] = softmax_s(scale * q[b, t, n, :] . k[b, s, n / G, :]) @ v[b, s, n / G, :]
// over the visible keys start[b, t] <= s < end[b, t] (query_ranges in mask.py turns every
// MaskSpec without segments, or with contiguous segments, into one interval per query); a query
// that sees no key gives 0.
// Axis legend: B batch, T query tokens, S keys, N query heads, K kv heads, G = N / K, H head dim.
//
// Why: as XLA ops the prompt's attention (the [T, S] logits and probabilities of every head:
// mask select, max, exp, sum, divide, and a transposing copy for the second product) cost
// ~170 ms of thread time in the benchmark's 336-token prefill, against ~3 GFLOP of products.
//
// One task = (b, kv head, block of ~64 / G tokens): its G heads x tokens are the rows of one
// tile (GQA without repeating K/V). K of that kv head is transposed once per task into
// kt [H, S'] so that 16 keys are one vector; then per block of kKeyBlock keys:
//   logits [rows, keys] = q_tile @ kt   (kRows rows x 32 keys in registers over H)
//   mask, running max / sum rescale, p = exp(logits - max)
//   out [rows, H] += p @ v              (kRows rows x 32 of H in registers over the keys)
// in native-width vectors (NVec, simd.h): kRows = 8 with AVX-512, 2 with AVX2. (With 16-float
// vectors on AVX2 GCC spilled every accumulator: 336-token causal prefill, 12 heads, H 64:
// 204 ms, against 6-8 ms now and 16-19 ms for XLA's ops, on this 2-core AVX2 machine.)
// Tasks are shared out over XLA's intra-op pool by mmjax_pool::ParallelFor (pool.h).
//
// Work is proportional to the visible keys, not to S: a task covers only the union [ks, ke) of
// its queries' intervals, and each register tile only the 32-key chunks that meet the
// union of its own rows' intervals (both products skip the rest). With packed images or
// Qwen2.5-VL windows (contiguous segments) a tile of one segment touches that segment's keys
// only, a tile straddling two segments their two ranges row group by row group, and padding
// queries nothing: cost ~ sum of segment^2 plus one 32-key chunk per register tile at the edges.
//
// Any head dim: H need not be a multiple of 16. The reduction over H (q . K) takes any H; for
// p @ v and the output accumulator rows are Hp = H rounded up to whole native vectors (8 lanes
// with AVX2), V then copied into a zero-padded [keys, Hp] buffer per task (like kt) unless Hp = H.
//
// Numerics: float32 throughout, online softmax (the rescaling differs from XLA's two-pass
// softmax only in rounding; <= 1e-5 against the reference in tests/test_cpu_prefill_attention.py).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "pool.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
using namespace mmjax_simd;

constexpr int64_t kTileRows = 64;    // about this many rows (tokens x G heads) per task
constexpr int64_t kKeyBlock = 128;   // keys per softmax step (a multiple of 32)
// Rows per register tile: kRows x 32 keys (q.K) or x 32 of H (p.V) of accumulators fill about
// half the vector registers (16 of 32 zmm with AVX-512, 8 of 16 ymm with AVX2).
constexpr int kRows = kNLanes >= 16 ? 8 : 2;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Buffers {
  std::vector<float> q, kt, vp, logits, out, m, l;
  std::vector<int64_t> lo, hi;  // per register tile (kRows rows): the union of its rows' intervals, relative to ks
};

struct Problem {
  const float *q, *k, *v;
  const int32_t *start, *end;
  float* out;
  int64_t B, T, S, N, K, G, H;
  float scale;
  int64_t query_block, blocks_per_head, tasks;

  // lg[i, 0:32] = scale * q[i, :] . kt[:, 0:32] for the kRows rows of one register tile: the
  // tile's 32 keys are kKV native vectors, kRows x kKV accumulators stay in registers over H.
  void QK(const float* q, const float* kt, int64_t nk, float* lg) const {
    constexpr int kKV = 32 / kNLanes;
    NVec acc[kRows][kKV];
    for (int i = 0; i < kRows; ++i)
      for (int u = 0; u < kKV; ++u) acc[i][u] = NVec{};
    for (int64_t h = 0; h < H; ++h, kt += nk) {
      float x[kRows];
      for (int i = 0; i < kRows; ++i) x[i] = q[i * H + h];
#pragma GCC unroll 4
      for (int u = 0; u < kKV; ++u) {
        const NVec kv = NLoad(kt + u * kNLanes);
#pragma GCC unroll 8
        for (int i = 0; i < kRows; ++i) acc[i][u] += x[i] * kv;
      }
    }
    for (int i = 0; i < kRows; ++i)
      for (int u = 0; u < kKV; ++u) NStore(lg + i * kKeyBlock + u * kNLanes, acc[i][u] * scale);
  }

  // out[i, 0:NV lanes] += p[i, jlo:jhi] @ v[jlo:jhi, 0:NV lanes] for the kRows rows of one tile.
  // With few accumulators (a small head dim: NV = 1, 2) the FMA chains' latency would bound the
  // loop, so consecutive keys go to kPh independent sets, summed at the end.
  template <int NV>
  static void PV(const float* p, const float* v, int64_t vstride, int64_t jlo, int64_t jhi, float* out,
                 int64_t out_stride) {
    constexpr int kPh = kRows * NV >= 8 ? 1 : 8 / (kRows * NV);
    NVec acc[kPh][kRows][NV];
    for (int f = 0; f < kPh; ++f)
      for (int i = 0; i < kRows; ++i)
        for (int u = 0; u < NV; ++u) acc[f][i][u] = NVec{};
    auto step = [&](int f, int64_t j) __attribute__((always_inline)) {
      const float* vr = v + j * vstride;
      float pj[kRows];
      for (int i = 0; i < kRows; ++i) pj[i] = p[i * kKeyBlock + j];
#pragma GCC unroll 4
      for (int u = 0; u < NV; ++u) {
        const NVec vv = NLoad(vr + u * kNLanes);
#pragma GCC unroll 8
        for (int i = 0; i < kRows; ++i) acc[f][i][u] += pj[i] * vv;
      }
    };
    int64_t j = jlo;
    for (; j + kPh <= jhi; j += kPh) {
#pragma GCC unroll 8
      for (int f = 0; f < kPh; ++f) step(f, j + f);
    }
    for (; j < jhi; ++j) step(0, j);
    for (int i = 0; i < kRows; ++i)
      for (int u = 0; u < NV; ++u) {
        NVec a = acc[0][i][u];
        for (int f = 1; f < kPh; ++f) a += acc[f][i][u];
        float* o = out + i * out_stride + u * kNLanes;
        NStore(o, NLoad(o) + a);
      }
  }

  void Task(int64_t task, Buffers& buf) const {
    const int64_t b = task / (K * blocks_per_head);
    const int64_t kh = task / blocks_per_head % K;
    // Last query blocks first: under a causal mask they see the most keys, and the cheap
    // ones left for the end keep both threads busy to the last task.
    const int64_t t0 = (blocks_per_head - 1 - task % blocks_per_head) * query_block;
    const int64_t tq = std::min(query_block, T - t0);
    const int64_t rows = tq * G, rows_p = (rows + kRows - 1) / kRows * kRows;
    const int64_t Hp = (H + kNLanes - 1) / kNLanes * kNLanes;
    const int32_t* st = start + b * T + t0;
    const int32_t* en = end + b * T + t0;
    // The block's keys: the union of its queries' intervals.
    int64_t ks = S, ke = 0;
    for (int64_t t = 0; t < tq; ++t) {
      const int64_t s0 = std::clamp<int64_t>(st[t], 0, S), s1 = std::clamp<int64_t>(en[t], 0, S);
      if (s1 > s0) ks = std::min(ks, s0), ke = std::max(ke, s1);
    }
    // Row r = t * G + g: query token t0 + t, head kh * G + g.
    auto out_row = [&](int64_t r) { return out + ((b * T + t0 + r / G) * N + kh * G + r % G) * H; };
    if (ke <= ks) {
      for (int64_t r = 0; r < rows; ++r) std::memset(out_row(r), 0, H * sizeof(float));
      return;
    }
    ks = ks / 32 * 32;  // key vectors start on 32-key boundaries of kt
    const int64_t nk = (ke - ks + 31) / 32 * 32;
    // q tile [rows_p, H] (pad rows zero), kt [H, nk] (pad keys zero), out [rows_p, H].
    buf.q.assign(rows_p * H, 0.0f);
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(&buf.q[r * H], q + ((b * T + t0 + r / G) * N + kh * G + r % G) * H, H * sizeof(float));
    buf.kt.assign(H * nk, 0.0f);
    for (int64_t s = ks; s < ke; ++s) {
      const float* kr = k + ((b * S + s) * K + kh) * H;
      for (int64_t h = 0; h < H; ++h) buf.kt[h * nk + (s - ks)] = kr[h];
    }
    // v rows from key ks on: in place when H fills whole vectors, else a zero-padded copy.
    const float* vb = v + ((b * S + ks) * K + kh) * H;
    int64_t vstride = K * H;
    if (Hp != H) {
      buf.vp.assign((ke - ks) * Hp, 0.0f);
      for (int64_t s = ks; s < ke; ++s)
        std::memcpy(&buf.vp[(s - ks) * Hp], v + ((b * S + s) * K + kh) * H, H * sizeof(float));
      vb = buf.vp.data();
      vstride = Hp;
    }
    // Each register tile's keys: the union of its rows' intervals (empty: lo = hi = 0).
    buf.lo.assign(rows_p / kRows, 0);
    buf.hi.assign(rows_p / kRows, 0);
    for (int64_t g = 0; g < rows_p / kRows; ++g) {
      int64_t lo = nk, hi = 0;
      for (int64_t r = g * kRows; r < std::min(rows, (g + 1) * kRows); ++r) {
        const int64_t s0 = std::clamp<int64_t>(st[r / G], 0, S), s1 = std::clamp<int64_t>(en[r / G], 0, S);
        if (s1 > s0) lo = std::min(lo, s0 - ks), hi = std::max(hi, s1 - ks);
      }
      if (hi > lo) buf.lo[g] = lo, buf.hi[g] = hi;
    }
    buf.out.assign(rows_p * Hp, 0.0f);
    buf.m.assign(rows_p, kNegInf);
    buf.l.assign(rows_p, 0.0f);
    buf.logits.resize(rows_p * kKeyBlock);
    float* lg = buf.logits.data();
    for (int64_t j0 = 0; j0 < nk; j0 += kKeyBlock) {
      const int64_t nb = std::min(kKeyBlock, nk - j0);  // a multiple of 32
      // logits = scale * q_tile @ kt[:, j0:j0+nb], only the 32-key chunks that meet the tile's
      // keys (the softmax below reads no other: a row's [lo, hi) lies inside its tile's).
      for (int64_t r0 = 0; r0 < rows_p; r0 += kRows)
        for (int64_t j = 0; j < nb; j += 32) {
          if (j0 + j + 32 <= buf.lo[r0 / kRows] || j0 + j >= buf.hi[r0 / kRows]) continue;
          QK(&buf.q[r0 * H], &buf.kt[j0 + j], nk, lg + r0 * kKeyBlock + j);
        }
      // mask, online softmax: p = exp(logits - m_new); out, l rescaled by exp(m_old - m_new)
      const NIVec iota = NIota();
      for (int64_t r = 0; r < rows; ++r) {
        float* lr = lg + r * kKeyBlock;
        const int64_t t = r / G;
        // The row's own interval, clamped to [0, S] like the block's (a caller may pass any
        // ints), then to this key block.
        const int64_t lo = std::clamp<int64_t>(std::clamp<int64_t>(st[t], 0, S) - ks - j0, 0, nb);
        const int64_t hi = std::clamp<int64_t>(std::clamp<int64_t>(en[t], 0, S) - ks - j0, 0, nb);
        if (hi <= lo) {  // nothing visible in this block
          std::memset(lr, 0, nb * sizeof(float));
          continue;
        }
        const int32_t lo32 = static_cast<int32_t>(lo), hi32 = static_cast<int32_t>(hi);
        const int64_t jv0 = lo / kNLanes * kNLanes, jv1 = (hi + kNLanes - 1) / kNLanes * kNLanes;
        // The whole block visible (inside a long segment, or a causal row past the block): no
        // masks, two independent chains. Else masked to [lo, hi) lane by lane.
        const bool full = lo == 0 && hi == nb;  // nb is a multiple of 32 >= 2 vectors
        NVec mv = NSplat(kNegInf), mv2 = mv;
        if (full) {
          for (int64_t j = 0; j < nb; j += 2 * kNLanes) {
            const NVec x = NLoad(lr + j), y = NLoad(lr + j + kNLanes);
            mv = x > mv ? x : mv;
            mv2 = y > mv2 ? y : mv2;
          }
          mv = mv2 > mv ? mv2 : mv;
        } else {
          for (int64_t j = jv0; j < jv1; j += kNLanes) {
            const NIVec idx = iota + static_cast<int32_t>(j);
            const NVec x = NLoad(lr + j);
            mv = ((idx >= lo32) & (idx < hi32) & (x > mv)) ? x : mv;
          }
        }
        const float mx = HMax(mv);
        const float m_new = std::max(buf.m[r], mx);
        const float corr = buf.m[r] == kNegInf ? 0.0f : NExp(NSplat(buf.m[r] - m_new))[0];
        buf.m[r] = m_new;
        NVec sum{};
        if (full) {
          NVec sum2{};
          for (int64_t j = 0; j < nb; j += 2 * kNLanes) {
            const NVec p = NExp(NLoad(lr + j) - m_new), p2 = NExp(NLoad(lr + j + kNLanes) - m_new);
            NStore(lr + j, p);
            NStore(lr + j + kNLanes, p2);
            sum += p;
            sum2 += p2;
          }
          sum += sum2;
        } else {
          for (int64_t j = 0; j < nb; j += kNLanes) {
            if (j < jv0 || j >= jv1) {  // outside [lo, hi): exactly 0
              NStore(lr + j, NVec{});
              continue;
            }
            const NIVec idx = iota + static_cast<int32_t>(j);
            const NVec p = ((idx >= lo32) & (idx < hi32)) ? NExp(NLoad(lr + j) - m_new) : NVec{};
            NStore(lr + j, p);
            sum += p;
          }
        }
        buf.l[r] = buf.l[r] * corr + HSum(sum);
        if (corr != 1.0f) {
          float* o = &buf.out[r * Hp];
          for (int64_t h = 0; h < Hp; h += kNLanes) NStore(o + h, NLoad(o + h) * corr);
        }
      }
      for (int64_t r = rows; r < rows_p; ++r) std::memset(lg + r * kKeyBlock, 0, nb * sizeof(float));
      // out += p @ v[ks + j0 : ks + j0 + nb], per tile over its own keys only (p is 0 elsewhere)
      const int64_t nv = std::min(nb, ke - ks - j0);  // keys past ke are zero in p: skip them
      for (int64_t r0 = 0; r0 < rows_p; r0 += kRows) {
        const int64_t jlo = std::max<int64_t>(0, buf.lo[r0 / kRows] - j0);
        const int64_t jhi = std::min<int64_t>(nv, buf.hi[r0 / kRows] - j0);
        if (jhi <= jlo) continue;
        const float* pr = lg + r0 * kKeyBlock;
        const float* vr = vb + j0 * vstride;
        for (int64_t h0 = 0; h0 < Hp; h0 += 32) {
          float* o = &buf.out[r0 * Hp + h0];
          switch (std::min<int64_t>(32, Hp - h0) / kNLanes) {  // 32 lanes, or the last 1..31
            case 1: PV<1>(pr, vr + h0, vstride, jlo, jhi, o, Hp); break;
            case 2: PV<2>(pr, vr + h0, vstride, jlo, jhi, o, Hp); break;
            case 3: PV<3>(pr, vr + h0, vstride, jlo, jhi, o, Hp); break;
            case 4: PV<4>(pr, vr + h0, vstride, jlo, jhi, o, Hp); break;
            case 5: PV<5>(pr, vr + h0, vstride, jlo, jhi, o, Hp); break;
            case 6: PV<6>(pr, vr + h0, vstride, jlo, jhi, o, Hp); break;
            case 7: PV<7>(pr, vr + h0, vstride, jlo, jhi, o, Hp); break;
            default: PV<8>(pr, vr + h0, vstride, jlo, jhi, o, Hp); break;  // 32 lanes of 4 (SSE)
          }
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = out_row(r);
      const float l = buf.l[r];
      const float* o = &buf.out[r * Hp];
      if (l == 0.0f) {
        std::memset(dst, 0, H * sizeof(float));
      } else {
        for (int64_t h = 0; h < H; ++h) dst[h] = o[h] / l;
      }
    }
  }

};

ffi::Error PrefillAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> start,
                                ffi::Buffer<ffi::S32> end, ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const auto sd = start.dimensions(), ed = end.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || kd[0] != qd[0] || kd[3] != qd[3] ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || kd[2] < 1 || qd[2] % kd[2] != 0 ||
      qd[3] < 1 || sd.size() != 2 || ed.size() != 2 || sd[0] != qd[0] || sd[1] != qd[1] ||
      ed[0] != qd[0] || ed[1] != qd[1])
    return ffi::Error::InvalidArgument(
        "mmjax_prefill_attention_f32: expects q [B, T, N, H], k/v [B, S, K, H] with K | N, "
        "start/end [B, T]");
  auto p = std::make_unique<Problem>();
  p->q = q.typed_data();
  p->k = k.typed_data();
  p->v = v.typed_data();
  p->start = start.typed_data();
  p->end = end.typed_data();
  p->out = out->typed_data();
  p->B = qd[0];
  p->T = qd[1];
  p->N = qd[2];
  p->H = qd[3];
  p->S = kd[1];
  p->K = kd[2];
  p->G = p->N / p->K;
  p->scale = scale;
  // Enough tokens per task that the tile has ~64 rows (the transpose of K per task is then
  // small against the products), a multiple of 8.
  p->query_block = std::max<int64_t>(8, (kTileRows / p->G + 7) / 8 * 8);
  p->blocks_per_head = (p->T + p->query_block - 1) / p->query_block;
  p->tasks = p->B * p->K * p->blocks_per_head;
  mmjax_pool::ParallelFor(pool, p->tasks, [&p](int64_t t) {
    thread_local Buffers buf;
    p->Task(t, buf);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxPrefillAttentionF32, PrefillAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
