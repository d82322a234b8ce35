// In-place row writes for XLA:CPU: row rows[m] of buf, viewed as [R, C] (C = the attribute `row`,
// R = its elements / C), is set to upd[m, :] for m < M; upd [M, C] of buf's dtype, rows [M]
// int32. The result aliases buf (input_output_aliases), so only M rows of memory are touched.
// KV caches and page pools of every dtype, and an int8 cache's scales (C = 1), are written so.
//
// Why: XLA:CPU widens a bfloat16 dynamic_update_slice or scatter to float32, converting the whole
// buffer to float32 and back around each write (23 of the 25 ms of the benchmark model's batch-8
// bf16 decode step), and expands the page pools' scatter into a loop that copies the pool
// three times a layer (a 1 GiB pool: 790 ms a serving decode step). A row whose index is outside
// [0, R) is not written (as a scatter with mode="drop").
#include <cstdint>
#include <cstring>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error WriteRows(ffi::AnyBuffer buf, ffi::AnyBuffer upd, ffi::Buffer<ffi::S32> rows,
                     ffi::Result<ffi::AnyBuffer> out, int64_t row) {
  const auto ud = upd.dimensions(), rd = rows.dimensions();
  const int64_t total = int64_t(buf.element_count());
  if (row < 1 || total % row != 0 || ud.size() != 2 || ud[1] != row || rd.size() != 1 || rd[0] != ud[0] ||
      upd.element_type() != buf.element_type() || out->element_type() != buf.element_type())
    return ffi::Error::InvalidArgument("mmjax_write_rows: expects buf of R x row elements, upd [M, row] of its "
                                       "dtype, rows [M]");
  const int64_t R = total / row, M = ud[0];
  const size_t row_bytes = size_t(row) * ffi::ByteWidth(buf.element_type());
  char* dst = static_cast<char*>(out->untyped_data());
  if (dst != buf.untyped_data())  // XLA could not alias: start from a copy (never the case when donated)
    std::memcpy(dst, buf.untyped_data(), size_t(R) * row_bytes);
  const char* src = static_cast<const char*>(upd.untyped_data());
  const int32_t* r = rows.typed_data();
  for (int64_t m = 0; m < M; ++m)
    if (r[m] >= 0 && r[m] < R) std::memcpy(dst + size_t(r[m]) * row_bytes, src + size_t(m) * row_bytes, row_bytes);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxWriteRows, WriteRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("row"));
