// RMS norm of each row in one pass: out = x / sqrt(mean(x^2) + eps) * scale, in fp32.
//
// torch's rms_norm runs as five ops (pow, mean, add, rsqrt, mul) plus the scale: at one token per
// step, ~100 norms of 640 or 256 floats cost ~27 us each in op dispatch alone. This is one op.
// Rows may be strided (q and k are views of the fused qkv output); each row's last dim is contiguous.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kLanes = 16;

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
void norm_rows(const at::Tensor& x, const float* __restrict scale, double eps, at::Tensor& out) {
  const int64_t dim = x.size(-1);
  const int64_t inner = x.dim() == 3 ? x.size(1) : 1;  // rows per leading index
  const int64_t rows = x.numel() / dim;
  const int64_t s0 = x.stride(0), s1 = x.dim() == 3 ? x.stride(1) : 0;
  const T* x_data = x.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  // Small inputs (the usual decode step) stay on one thread: waking the pool costs more than the work.
  const int64_t grain = std::max<int64_t>(1, 16384 / dim);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x_data + (r / inner) * s0 + (r % inner) * s1;
      float partial[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= dim; i += kLanes) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) {
          const float v = load(row, i + l);
          partial[l] += v * v;
        }
      }
      float sum = 0.f;
      for (int64_t l = 0; l < kLanes; ++l) sum += partial[l];
      for (; i < dim; ++i) sum += load(row, i) * load(row, i);
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + static_cast<float>(eps));
      T* orow = out_data + r * dim;
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) orow[j] = static_cast<T>(load(row, j) * inv * scale[j]);
    }
  });
}

}  // namespace

// x: [..., dim] (2 or 3 dims, last one contiguous)   scale: [dim] float32   -> x's shape, contiguous
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps) {
  TORCH_CHECK(x.device().is_cpu() && scale.device().is_cpu(), "rms_norm takes CPU tensors only");
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && x.stride(-1) == 1, "x must be [rows, dim] or [a, b, dim] "
              "with a contiguous last dim");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "only float32 and bfloat16 are supported");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 1 &&
              scale.size(0) == x.size(-1), "scale must be a contiguous float32 [dim]");
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return out;
  if (x.scalar_type() == at::kFloat)
    norm_rows<float>(x, scale.data_ptr<float>(), eps, out);
  else
    norm_rows<c10::BFloat16>(x, scale.data_ptr<float>(), eps, out);
  return out;
}

TORCH_LIBRARY_FRAGMENT(rillet, m) { m.def("rms_norm(Tensor x, Tensor scale, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(rillet, CPU, m) { m.impl("rms_norm", &rms_norm); }
