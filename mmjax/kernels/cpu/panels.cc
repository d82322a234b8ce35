// Matrix product against weights stored in column panels: y[M, N] = x[M, K] @ w (* scale[N]),
// w packed as panels [P, K, 64] (panels.py): panel p holds columns [64p, 64p + 64) of the
// [K, N] kernel, row after row, so one panel is one contiguous K x 64 block (the last panel is
// zero-padded past N). x and y are float32; w is float32, bfloat16, or int8 with a float32
// scale per output column, widened in registers as it streams (LoadW, simd.h).
//
// Why: a decode step is bound by how fast the weights stream. Row-major [K, N] split by
// columns over the threads gives each thread K short runs (N / threads columns, a few cache
// lines) a full row apart; on the 2-core EPYC the 12 int8 decoder layers of the benchmark
// model streamed at 16 GB/s that way, the same weights as panels at 38 GB/s (fp32 25 -> 34,
// bfloat16 19 -> 35): each thread reads one contiguous range of whole panels, which the
// hardware prefetcher follows without help (docs/cpu_kernels.md, "Weight panels").
//
// Per panel and block of R <= 8 rows: the 64 columns in U-vector strips with R x U accumulators
// in registers (AVX2: U = 8 for one row, 4 for two, 2 up to four and for six, else 1), each
// column summed over k = 0..K-1 in order with one FMA per product. The order does not depend
// on the thread count or the panel split, so results are the same on every machine of the
// same vector width. More than 8 rows (prefill) run in 6-row tiles, while the panel is in L2;
// each tile keeps its 12 accumulators in registers over the whole of K (kTile). In blocks of 8
// k-rows, as decode's blocks of rows take them, the tile stored and reloaded its accumulators
// every 8 k (24 memory operations per 96 FMAs): 12 chained float32 layers at 256 rows ran at
// 89-107 GFLOP/s that way and at 126-140 after (XLA's GEMM 132-160, alternating), and the
// int8 benchmark prefill took 811-870 ms instead of 654-759 (alternating processes).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "pool.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mmjax_simd::LoadW;
using mmjax_simd::NVec;
constexpr int64_t kN = mmjax_simd::kNLanes;
constexpr int64_t kPanel = 64;  // columns per panel
constexpr int kMaxRows = 8;
constexpr int64_t kAhead = 2048;  // bytes ahead of the panel stream that blocks of several rows prefetch

// Rows x[0:R] against panel p: y[0:R, 64p : 64p + 64) (clipped at N), times scale when given.
// Accumulators live in registers within a block of K and in `acc` (L1) between blocks; a
// prefill tile (kTile) takes all of K as one block.
template <int R, typename W, bool kTile = false>
void PanelRows(const float* __restrict__ x, const W* __restrict__ panel, const float* scale, float* __restrict__ y,
               int64_t K, int64_t N, int64_t p) {
  constexpr int U = kN >= 16 ? (R == 1 ? 4 : R <= 2 ? 2 : 1) : (R == 1 ? 8 : R == 2 ? 4 : R <= 4 || R == 6 ? 2 : 1);
  // K in blocks: one row keeps all 64 columns in registers and streams the panel straight
  // through; several rows take the panel 8 rows (a contiguous 512 B to 2 KiB) at a time, each
  // strip of columns passing over them, so the panel is still read in order.
  constexpr int64_t kBlockK = kTile ? int64_t(1) << 40 : R == 1 ? 16384 / (kPanel * sizeof(W)) : 8;
  const int64_t n0 = p * kPanel, width = std::min(kPanel, N - n0);
  alignas(64) float acc[R][kPanel];
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t k1 = std::min(K, k0 + kBlockK);
    if constexpr (R > 1 && !kTile) {  // FMA-heavy blocks leave the prefetcher behind: ask kAhead bytes ahead
      const char* ahead = reinterpret_cast<const char*>(panel + k0 * kPanel) + kAhead;
      for (int64_t b = 0; b < kBlockK * kPanel * int64_t(sizeof(W)); b += 64) __builtin_prefetch(ahead + b, 0, 3);
    }
    for (int64_t c0 = 0; c0 < width; c0 += U * kN) {
      NVec a[R][U];
      for (int m = 0; m < R; ++m)
        for (int u = 0; u < U; ++u) a[m][u] = k0 == 0 ? NVec{} : mmjax_simd::NLoad(&acc[m][c0 + u * kN]);
      for (int64_t k = k0; k < k1; ++k) {
        const W* row = panel + k * kPanel + c0;
        if constexpr (R == 1) {
          // Widen each strip right before its FMA: widening all U first needs U temporaries
          // beside the U accumulators, which spilled one accumulator to the stack for int8 and
          // bfloat16 (a store-to-load round trip every k: 12 GB/s per core instead of ~20).
          const NVec b = mmjax_simd::NBroadcast(x + k);
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) a[0][u] += b * LoadW(row + u * kN);
        } else {
          NVec w[U];
          for (int u = 0; u < U; ++u) w[u] = LoadW(row + u * kN);
#pragma GCC unroll 8
          for (int m = 0; m < R; ++m) {
            const NVec b = mmjax_simd::NBroadcast(x + m * K + k);
            for (int u = 0; u < U; ++u) a[m][u] += b * w[u];
          }
        }
      }
      for (int m = 0; m < R; ++m)
        for (int u = 0; u < U; ++u) mmjax_simd::NStore(&acc[m][c0 + u * kN], a[m][u]);
    }
  }
  for (int m = 0; m < R; ++m) {
    float* yr = y + m * N + n0;
    if (scale != nullptr)
      for (int64_t c = 0; c < width; ++c) yr[c] = acc[m][c] * scale[n0 + c];
    else
      std::memcpy(yr, acc[m], width * sizeof(float));
  }
}

template <typename W>
using PanelFn = void (*)(const float*, const W*, const float*, float*, int64_t, int64_t, int64_t);
template <typename W>
constexpr PanelFn<W> kRows[kMaxRows + 1] = {nullptr, PanelRows<1, W>, PanelRows<2, W>, PanelRows<3, W>, PanelRows<4, W>,
                                            PanelRows<5, W>, PanelRows<6, W>, PanelRows<7, W>, PanelRows<8, W>};

// kSplitInt8: 7 or 8 rows of int8 weights run as 4 rows and then the rest against the same
// panel (from L2 the second time): 8 rows x 1 strip need 8 broadcasts of x per widened strip,
// 4 x 2 half as many, and the 12 chained int8 decoder layers of the benchmark model at 8 rows
// ran at 134 instead of 113 GFLOP/s on the 2-core EPYC (standalone, 2 threads; 7 rows 130 vs
// 111). bfloat16 and float32 ran slower split (bf16 8 rows 103 vs 112), so they don't.
template <typename W>
void Gemm(ffi::ThreadPool& pool, const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K,
          int64_t N) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // One contiguous range of panels per thread: one sequential stream each.
  const int64_t per = (panels + threads - 1) / threads;
  mmjax_pool::ParallelFor(pool, (panels + per - 1) / per, [&](int64_t t) {
    for (int64_t p = t * per; p < std::min(panels, (t + 1) * per); ++p)
      if ((M == 7 || M == 8) && std::is_same_v<W, int8_t>) {  // 7 or 8 int8 rows: 4 + the rest (kSplitInt8 above)
        PanelRows<4, W>(x, w + p * K * kPanel, scale, y, K, N, p);
        kRows<W>[M - 4](x + 4 * K, w + p * K * kPanel, scale, y + 4 * N, K, N, p);
      } else if (M <= kMaxRows) {
        kRows<W>[M](x, w + p * K * kPanel, scale, y, K, N, p);
      } else {  // prefill: 6-row tiles (12 accumulators, the classic AVX2 GEMM tile), then the rest
        int64_t m0 = 0;
        for (; m0 + 6 <= M; m0 += 6) PanelRows<6, W, true>(x + m0 * K, w + p * K * kPanel, scale, y + m0 * N, K, N, p);
        if (m0 < M) kRows<W>[M - m0](x + m0 * K, w + p * K * kPanel, scale, y + m0 * N, K, N, p);
      }
  });
}

ffi::Error Check(const char* name, ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
                 ffi::Span<const int64_t> yd) {
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || xd[0] < 1 || yd[0] != xd[0] || wd[1] != xd[1] ||
      wd[2] != kPanel || wd[0] != (yd[1] + kPanel - 1) / kPanel)
    return ffi::Error::InvalidArgument(std::string(name) + ": expects x [M, K], w [ceil(N / 64), K, 64], y [M, N]");
  return ffi::Error::Success();
}

template <ffi::DataType DT, typename W>
ffi::Error Panels(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<DT> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (auto e = Check("mmjax_gemv_panels", xd, wd, yd); e.failure()) return e;
  Gemm<W>(pool, x.typed_data(), reinterpret_cast<const W*>(w.typed_data()), nullptr, y->typed_data(), xd[0], xd[1],
          yd[1]);
  return ffi::Error::Success();
}

ffi::Error PanelsS8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions(), sd = scale.dimensions();
  if (auto e = Check("mmjax_gemv_panels_s8", xd, wd, yd); e.failure()) return e;
  if (sd.size() != 1 || sd[0] != yd[1])
    return ffi::Error::InvalidArgument("mmjax_gemv_panels_s8: expects scale [N] for y [M, N]");
  Gemm<int8_t>(pool, x.typed_data(), w.typed_data(), scale.typed_data(), y->typed_data(), xd[0], xd[1], yd[1]);
  return ffi::Error::Success();
}

template <ffi::DataType DT>
auto Binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<DT>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxGemvPanelsF32, (Panels<ffi::F32, float>),
                              Binding<ffi::F32>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxGemvPanelsBF16, (Panels<ffi::BF16, uint16_t>),
                              Binding<ffi::BF16>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxGemvPanelsS8, PanelsS8,
                              Binding<ffi::S8>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
