// Approximate y = x @ W.T for a few rows x and 4-bit weights: the LM head's screen (its best
// logits are recomputed exactly afterwards, see RescoredHead).
//
// Each weight row is cut into groups of G inputs (G a multiple of 128), stored asymmetrically:
// w = q * scale + zero with q in 0..15 and one bf16 scale and zero per group. Per group of 128
// the 64 bytes hold q[i] in the low nibble and q[64 + i] in the high nibble of byte i, so both
// halves line up with 64 consecutive inputs. The inputs are quantized too, per group, to int8
// (x ~ xq * sx), and each group's dot product runs on VNNI (u8 x s8 -> int32, 64 products per
// instruction), so the kernel is bound by reading the 4-bit weights, not by widening them:
//
//   y[m][n] = sum_g  scale[n][g] * sx[m][g] * sum_i q[n][i] * xq[m][i]  +  zero[n][g] * sum_i x[m][i]
//
// Several weight rows go at once (independent dependency chains), reading 4 KiB ahead in software;
// threads take chunks of rows from a shared counter.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define RILLET_INT4_VNNI 1
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kSub = 128;       // inputs per 64-byte block
constexpr int64_t kMaxRows = 4;     // rows of x per pass over the weights
constexpr int64_t kChunkRows = 512;
// Read ahead of the hardware prefetcher, which stops at 4 KiB pages: 8.0 -> 4.8 ms for Gemma 3's
// 262,144-row head at one row (89 MB).
constexpr int64_t kPrefetchBytes = 4096;

inline float bf16_to_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &widened, sizeof(f));
  return f;
}

// x quantized per group: xq [M][K] int8, sx [M][groups], xsum [M][groups] (of the exact x).
struct QuantizedRows {
  std::vector<int8_t> xq;
  std::vector<float> sx, xsum;
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  QuantizedRows out{std::vector<int8_t>(M * K), std::vector<float>(M * groups), std::vector<float>(M * groups)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + m * K + g * G;
      float amax = 0.f, sum = 0.f;
      for (int64_t i = 0; i < G; ++i) {
        amax = std::max(amax, std::fabs(xg[i]));
        sum += xg[i];
      }
      const float s = amax > 0.f ? amax / 127.f : 1.f;
      for (int64_t i = 0; i < G; ++i)
        out.xq[m * K + g * G + i] = static_cast<int8_t>(std::lrintf(std::clamp(xg[i] / s, -127.f, 127.f)));
      out.sx[m * groups + g] = s;
      out.xsum[m * groups + g] = sum;
    }
  return out;
}

#ifdef RILLET_INT4_VNNI
// acc += u8 w x s8 x, in place. NOTE: inline asm, because GCC copies the accumulators of
// _mm512_dpbusd_epi32 in and out of other registers every iteration.
inline __attribute__((always_inline)) void dpbusd(__m512i& acc, __m512i w, __m512i x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
}

// MR rows of x against NR weight rows at a time: NR independent chains of VNNI and FMA latency.
template <int MR, int NR>
inline void tile_vnni(const uint8_t* __restrict packed, const uint16_t* __restrict sz, const QuantizedRows& xr,
                      int64_t K, int64_t G, int64_t N, int64_t n, float* __restrict out) {
  const int64_t groups = K / G, subs = G / kSub, row_bytes = K / 2;
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  __m512 acc[MR][NR];
  float zero_part[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      acc[m][r] = _mm512_setzero_ps();
      zero_part[m][r] = 0.f;
    }
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) dot[m][r] = _mm512_setzero_si512();
    for (int64_t s = 0; s < subs; ++s) {
      const int64_t k = g * G + s * kSub;
      __m512i xlo[MR], xhi[MR];
      for (int m = 0; m < MR; ++m) {
        const int8_t* xq = xr.xq.data() + m * K + k;
        xlo[m] = _mm512_loadu_si512(static_cast<const void*>(xq));
        xhi[m] = _mm512_loadu_si512(static_cast<const void*>(xq + 64));
      }
      for (int r = 0; r < NR; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(packed + (n + r) * row_bytes + k / 2 + kPrefetchBytes), _MM_HINT_T0);
        const __m512i raw = _mm512_loadu_si512(static_cast<const void*>(packed + (n + r) * row_bytes + k / 2));
        const __m512i lo = _mm512_and_si512(raw, low_mask);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low_mask);
        for (int m = 0; m < MR; ++m) {
          dot[m][r] = _mm512_dpbusd_epi32(dot[m][r], lo, xlo[m]);
          dot[m][r] = _mm512_dpbusd_epi32(dot[m][r], hi, xhi[m]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const uint16_t* szr = sz + ((n + r) * groups + g) * 2;
      const float scale = bf16_to_float(szr[0]), zero = bf16_to_float(szr[1]);
      for (int m = 0; m < MR; ++m) {
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][r]),
                                    _mm512_set1_ps(scale * xr.sx[m * groups + g]), acc[m][r]);
        zero_part[m][r] += zero * xr.xsum[m * groups + g];
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) out[m * N + n + r] = _mm512_reduce_add_ps(acc[m][r]) + zero_part[m][r];
}

template <int MR, int NR>
void rows_vnni(const uint8_t* packed, const uint16_t* sz, const QuantizedRows& xr, int64_t K, int64_t G,
               int64_t N, int64_t n0, int64_t n1, float* out) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile_vnni<MR, NR>(packed, sz, xr, K, G, N, n, out);
  for (; n < n1; ++n) tile_vnni<MR, 1>(packed, sz, xr, K, G, N, n, out);
}
#endif

// Portable path: the same arithmetic on the same quantized inputs, one scalar at a time.
[[maybe_unused]] void rows_scalar(const uint8_t* packed, const uint16_t* sz, const QuantizedRows& xr, int64_t M, int64_t K,
                 int64_t G, int64_t N, int64_t n0, int64_t n1, float* out) {
  const int64_t groups = K / G, row_bytes = K / 2;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float y = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t dot = 0;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) {
          const int64_t block = k / kSub, i = k % kSub;
          const uint8_t byte = packed[n * row_bytes + block * (kSub / 2) + i % (kSub / 2)];
          const int32_t q = i < kSub / 2 ? (byte & 0x0F) : (byte >> 4);
          dot += q * xr.xq[m * K + k];
        }
        y += bf16_to_float(sz[(n * groups + g) * 2]) * xr.sx[m * groups + g] * static_cast<float>(dot) +
             bf16_to_float(sz[(n * groups + g) * 2 + 1]) * xr.xsum[m * groups + g];
      }
      out[m * N + n] = y;
    }
}


// Batches of rows (int4_gemm): lanes are outputs. Per 16 outputs and 8 inputs, 64 bytes hold q of
// input k (low nibble) and k + 4 (high nibble) for output b / 4, input b % 4 (+ 8 * step) in byte b,
// so one load and two masks give the u8 operands of two VNNI steps (4 inputs of 16 outputs each),
// shared by every row of x. Scales and zeros in fp32, [out / 16][groups][16].
constexpr int64_t kBatchRows = 4;
constexpr int64_t kBatchVectors = 4;  // vectors of 16 outputs per chunk

#ifdef RILLET_INT4_VNNI
template <int MR, int NR>
void batch_tile(const uint8_t* __restrict packed, const float* __restrict scales, const float* __restrict zeros,
                const QuantizedRows& xr, int64_t m, int64_t K, int64_t G, int64_t N, int64_t n, float* __restrict out) {
  const int64_t groups = K / G;
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  alignas(64) float acc[MR][NR][16] = {};  // fp32 sums over groups in L1; registers hold the int32 ones
  const uint8_t* w[NR];
  for (int j = 0; j < NR; ++j) w[j] = packed + (n / 16 + j) * (K / 2) * 16;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) dot[i][j] = _mm512_setzero_si512();
    for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
      __m512i lo[NR], hi[NR];
      for (int j = 0; j < NR; ++j) {
        const uint8_t* p = w[j] + static_cast<uint64_t>(k) / 8 * 64;
        _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
        const __m512i raw = _mm512_loadu_si512(static_cast<const void*>(p));
        lo[j] = _mm512_and_si512(raw, low_mask);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low_mask);
      }
      for (int i = 0; i < MR; ++i) {
        int32_t four[2];
        std::memcpy(four, xr.xq.data() + (m + i) * K + k, 8);
        const __m512i x0 = _mm512_set1_epi32(four[0]), x1 = _mm512_set1_epi32(four[1]);
        for (int j = 0; j < NR; ++j) {
          dpbusd(dot[i][j], lo[j], x0);
          dpbusd(dot[i][j], hi[j], x1);
        }
      }
    }
    for (int j = 0; j < NR; ++j) {
      const __m512 scale = _mm512_loadu_ps(scales + ((n / 16 + j) * groups + g) * 16);
      const __m512 zero = _mm512_loadu_ps(zeros + ((n / 16 + j) * groups + g) * 16);
      for (int i = 0; i < MR; ++i) {
        const __m512 sx = _mm512_set1_ps(xr.sx[(m + i) * groups + g]);
        __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][j]), _mm512_mul_ps(scale, sx), _mm512_load_ps(acc[i][j]));
        _mm512_store_ps(acc[i][j], _mm512_fmadd_ps(zero, _mm512_set1_ps(xr.xsum[(m + i) * groups + g]), a));
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(out + (m + i) * N + n + j * 16, _mm512_load_ps(acc[i][j]));
}

template <int NR>
void batch_chunk(const uint8_t* packed, const float* scales, const float* zeros, const QuantizedRows& xr, int64_t M,
                 int64_t K, int64_t G, int64_t N, int64_t n, float* out) {
  for (int64_t m = 0; m < M; m += kBatchRows) {
    switch (std::min(kBatchRows, M - m)) {
      case 1: batch_tile<1, NR>(packed, scales, zeros, xr, m, K, G, N, n, out); break;
      case 2: batch_tile<2, NR>(packed, scales, zeros, xr, m, K, G, N, n, out); break;
      case 3: batch_tile<3, NR>(packed, scales, zeros, xr, m, K, G, N, n, out); break;
      default: batch_tile<4, NR>(packed, scales, zeros, xr, m, K, G, N, n, out); break;
    }
  }
}
#endif

void batch_rows(const uint8_t* packed, const float* scales, const float* zeros, const QuantizedRows& xr, int64_t M,
                int64_t K, int64_t G, int64_t N, int64_t n, float* out) {
#ifdef RILLET_INT4_VNNI
  switch (std::min(kBatchVectors * 16, N - n) / 16) {
    case 1: batch_chunk<1>(packed, scales, zeros, xr, M, K, G, N, n, out); return;
    case 2: batch_chunk<2>(packed, scales, zeros, xr, M, K, G, N, n, out); return;
    case 3: batch_chunk<3>(packed, scales, zeros, xr, M, K, G, N, n, out); return;
    default: batch_chunk<4>(packed, scales, zeros, xr, M, K, G, N, n, out); return;
  }
#else
  const int64_t groups = K / G;
  for (int64_t o = n; o < std::min(N, n + kBatchVectors * 16); ++o)
    for (int64_t m = 0; m < M; ++m) {
      float y = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t dot = 0;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) {
          const uint8_t byte = packed[(o / 16) * (K / 2) * 16 + (k / 8) * 64 + (o % 16) * 4 + k % 4];
          dot += static_cast<int32_t>(k % 8 < 4 ? (byte & 0x0F) : (byte >> 4)) * xr.xq[m * K + k];
        }
        const int64_t i = ((o / 16) * groups + g) * 16 + o % 16;
        y += scales[i] * xr.sx[m * groups + g] * static_cast<float>(dot) + zeros[i] * xr.xsum[m * groups + g];
      }
      out[m * N + o] = y;
    }
#endif
}
}  // namespace

// x: [M, K] float32 contiguous   packed: uint8 [N, K / 2] (the nibble layout above)
// scales_zeros: bfloat16 [N, K / group, 2]   -> [M, N] float32
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros,
                       int64_t group) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scales_zeros.device().is_cpu(),
              "int4_linear takes CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 [rows, in]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(group > 0 && group % kSub == 0 && K % group == 0, "group must be a multiple of 128 dividing in (",
              K, "), got ", group);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
              packed.size(1) * 2 == K, "packed must be a contiguous uint8 [out, in / 2]");
  const int64_t N = packed.size(0);
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.is_contiguous() &&
              scales_zeros.numel() == N * (K / group) * 2, "scales_zeros must be a contiguous bfloat16 "
              "[out, in / group, 2]");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* szp = reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t rows = std::min(kMaxRows, M - m0);
    const QuantizedRows xr = quantize_rows(x.data_ptr<float>() + m0 * K, rows, K, group);
    float* om = op + m0 * N;
    const int64_t num_chunks = (N + kChunkRows - 1) / kChunkRows;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_chunks), 1, [&](int64_t, int64_t) {
      for (int64_t c = next++; c < num_chunks; c = next++) {
        const int64_t n0 = c * kChunkRows, n1 = std::min(N, n0 + kChunkRows);
#ifdef RILLET_INT4_VNNI
        switch (rows) {
          case 1: rows_vnni<1, 8>(wp, szp, xr, K, group, N, n0, n1, om); break;
          case 2: rows_vnni<2, 4>(wp, szp, xr, K, group, N, n0, n1, om); break;
          case 3: rows_vnni<3, 2>(wp, szp, xr, K, group, N, n0, n1, om); break;
          default: rows_vnni<4, 2>(wp, szp, xr, K, group, N, n0, n1, om); break;
        }
#else
        rows_scalar(wp, szp, xr, rows, K, group, N, n0, n1, om);
#endif
      }
    });
  }
  return out;
}

// x: [M, K] float32 contiguous   packed: uint8 [N, K / 2] (the batch layout above)
// scales, zeros: float32 [N / 16, K / group, 16]   -> [M, N] float32
at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                     int64_t group) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scales.device().is_cpu() && zeros.device().is_cpu(),
              "int4_gemm takes CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 [rows, in]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(group > 0 && group % 8 == 0 && K % group == 0, "group must be a multiple of 8 dividing in (", K,
              "), got ", group);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
              packed.size(1) * 2 == K, "packed must be a contiguous uint8 [out, in / 2]");
  const int64_t N = packed.size(0);
  TORCH_CHECK(N % 16 == 0, "out must be a multiple of 16, got ", N);
  for (const at::Tensor* t : {&scales, &zeros})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N * (K / group),
                "scales and zeros must be contiguous float32 [out / 16, in / group, 16]");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const QuantizedRows xr = quantize_rows(x.data_ptr<float>(), M, K, group);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t chunk = kBatchVectors * 16, num_chunks = (N + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < num_chunks; c = next++) batch_rows(wp, sp, zp, xr, M, K, group, N, c * chunk, op);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(rillet, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales_zeros, int group) -> Tensor");
  m.def("int4_gemm(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(rillet, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_gemm", &int4_gemm);
}
