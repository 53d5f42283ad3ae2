// Rotary embedding of q or k, optionally after a per-head RMS norm (Gemma 3, Qwen 3), in one op.
//
// torch runs it as ~10 ops per tensor (norm, float, chunk, cat, mul, addcmul, to); at one token
// per step their dispatch outweighs the arithmetic. Layout as in rillet.models.layers.Rotary:
// rotate-half, cos and sin at full head width with rotate_half's sign folded into sin, so
//   out[j] = y[j] * cos[j] + y[j + half] * sin[j]   (j < half)
//   out[j] = y[j] * cos[j] + y[j - half] * sin[j]   (j >= half)
// where y is x, or x's RMS norm times `scale` when a scale is given.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
void rope_rows(const at::Tensor& x, const float* cos, const float* sin, const float* scale, double eps,
               at::Tensor& out) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  const T* x_data = x.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 16384 / dim);
  at::parallel_for(0, tokens * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> y(dim);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / heads, h = r % heads;
      const T* row = x_data + t * s0 + h * s1;
      for (int64_t j = 0; j < dim; ++j) y[j] = widen(row[j]);
      if (scale != nullptr) {
        float sum = 0.f;
        for (int64_t j = 0; j < dim; ++j) sum += y[j] * y[j];
        const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + static_cast<float>(eps));
        for (int64_t j = 0; j < dim; ++j) y[j] = y[j] * inv * scale[j];
      }
      const float* c = cos + t * dim;
      const float* s = sin + t * dim;
      T* orow = out_data + r * dim;
      for (int64_t j = 0; j < half; ++j) orow[j] = static_cast<T>(y[j] * c[j] + y[j + half] * s[j]);
      for (int64_t j = half; j < dim; ++j) orow[j] = static_cast<T>(y[j] * c[j] + y[j - half] * s[j]);
    }
  });
}

}  // namespace

// x: [T, heads, dim] (last dim contiguous)   cos, sin: [T, dim] float32   scale: [dim] float32 or empty
// -> [T, heads, dim] contiguous, x's dtype
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& scale,
                double eps) {
  TORCH_CHECK(x.device().is_cpu(), "rope takes CPU tensors only");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "x must be [T, heads, dim] with a contiguous, even last dim");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "only float32 and bfloat16 are supported");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                t->size(0) == x.size(0) && t->size(1) == x.size(2), "cos and sin must be contiguous float32 [T, dim]");
  const bool norm = scale.numel() > 0;
  TORCH_CHECK(!norm || (scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == x.size(2)),
              "scale must be a contiguous float32 [dim] or empty");
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return out;
  const float* scale_data = norm ? scale.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat)
    rope_rows<float>(x, cos.data_ptr<float>(), sin.data_ptr<float>(), scale_data, eps, out);
  else
    rope_rows<c10::BFloat16>(x, cos.data_ptr<float>(), sin.data_ptr<float>(), scale_data, eps, out);
  return out;
}

TORCH_LIBRARY_FRAGMENT(rillet, m) { m.def("rope(Tensor x, Tensor cos, Tensor sin, Tensor scale, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(rillet, CPU, m) { m.impl("rope", &rope); }
