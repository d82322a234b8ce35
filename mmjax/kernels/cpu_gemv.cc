// Matrix-vector product for XLA:CPU decode steps: y[1, N] = x[1, K] @ w[K, N], float32.
//
// Why: a batch-1 decode step multiplies one row by every weight matrix, so it is bound by how
// fast the weights stream from memory. XLA:CPU emits these products as single-threaded loops
// (12-17 GB/s on the 2-core benchmark machine, which streams ~25 GB/s with both cores). This
// kernel streams w once, row-major as stored, with the columns split over XLA's own intra-op
// thread pool (docs/kernels.md, "CPU decode matmul"; 25-27 GB/s in a standalone test).
//
// Loop order: for each column chunk [n0, n1), for k in steps of 4 rows,
// y[n0:n1] += x[k] w[k] + x[k+1] w[k+1] + x[k+2] w[k+2] + x[k+3] w[k+3]: four sequential row
// streams of w, y's chunk stays in L1. The compiler vectorises the inner loop (__restrict__).
//
// Threading: the caller and helper tasks scheduled on the XLA pool claim column blocks from
// an atomic counter. The caller only waits for chunks a running thread has claimed, so a busy
// pool (or a pool of one) can never deadlock the call: it just does the work itself.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kVec = 16;  // chunk widths are multiples of one 512-bit vector

// y[n0:n1] = x @ w[:, n0:n1]
void Columns(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
             int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t len = n1 - n0;
  float* __restrict__ yp = y + n0;
  std::memset(yp, 0, len * sizeof(float));
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const float* __restrict__ w0 = w + k * N + n0;
    const float* __restrict__ w1 = w0 + N;
    const float* __restrict__ w2 = w1 + N;
    const float* __restrict__ w3 = w2 + N;
    const float a0 = x[k], a1 = x[k + 1], a2 = x[k + 2], a3 = x[k + 3];
    for (int64_t n = 0; n < len; ++n) yp[n] += a0 * w0[n] + a1 * w1[n] + a2 * w2[n] + a3 * w3[n];
  }
  for (; k < K; ++k) {
    const float* __restrict__ wk = w + k * N + n0;
    const float a = x[k];
    for (int64_t n = 0; n < len; ++n) yp[n] += a * wk[n];
  }
}

struct Work {
  const float* x;
  const float* w;
  float* y;
  int64_t K, N, chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t n0 = c * chunk;
      Columns(x, w, y, K, N, n0, std::min(N, n0 + chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error GemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[0] != 1 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("mmjax_gemv_f32: expects x [1, K] and w [K, N]");
  auto work = std::make_shared<Work>();  // shared: a late helper task may still hold it
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->y = y->typed_data();
  work->K = wd[0];
  work->N = wd[1];
  const int64_t N = wd[1];
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // One contiguous column block per thread (>= 64 columns): long runs per row stream best.
  // Measured on the 2-core box, 12 MLP blocks at D 768 / F 2048: one block per thread 22 GB/s,
  // two 20 GB/s, four 18 GB/s (XLA's own dot: 16-18 GB/s).
  int64_t chunk = (N + threads - 1) / threads;
  chunk = std::max<int64_t>(64, (chunk + kVec - 1) / kVec * kVec);
  work->chunk = chunk;
  work->chunks = (N + chunk - 1) / chunk;
  const int64_t helpers = std::min(threads, work->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxGemvF32, GemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
