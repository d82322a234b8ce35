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
#include <algorithm>
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

// The reverse, for reading: out[m, :] = table row rows[m] (clipped to [0, R)), table viewed as
// [R, C] (C = `row`). The decode loop's embedding gather: XLA:CPU runs a bfloat16 gather in
// float32, converting the whole table, and in a loop of decode steps it hoists that convert out of
// the loop, so each call of the loop wrote the table out again in float32 (98 MB, ~30 ms, on the
// bfloat16 benchmark model; a one-row bitcast gather was hoisted and copied the same way).
ffi::Error ReadRows(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> rows, ffi::Result<ffi::AnyBuffer> out, int64_t row) {
  const auto rd = rows.dimensions(), od = out->dimensions();
  const int64_t total = int64_t(table.element_count());
  if (row < 1 || total % row != 0 || total == 0 || rd.size() != 1 || od.size() != 2 || od[0] != rd[0] ||
      od[1] != row || out->element_type() != table.element_type())
    return ffi::Error::InvalidArgument("mmjax_read_rows: expects table of R x row elements, rows [M], out [M, row]");
  const int64_t R = total / row, M = rd[0];
  const size_t row_bytes = size_t(row) * ffi::ByteWidth(table.element_type());
  const char* src = static_cast<const char*>(table.untyped_data());
  char* dst = static_cast<char*>(out->untyped_data());
  const int32_t* r = rows.typed_data();
  for (int64_t m = 0; m < M; ++m) {
    const int64_t i = std::min<int64_t>(std::max<int64_t>(r[m], 0), R - 1);
    std::memcpy(dst + size_t(m) * row_bytes, src + size_t(i) * row_bytes, row_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxReadRows, ReadRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("row"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxWriteRows, WriteRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("row"));
