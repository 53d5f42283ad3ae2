// y = x @ (q * scale).T for a few rows x (fp32) and int8 weights q with one scale per output.
//
// A decode step of one to a few streams is bound by reading the weights: ~100 MB of int8 for
// Gemma 3 270M's decoder. torch._weight_int8pack_mm reads them at about half this CPU's memory
// bandwidth at one row, and needs its activations in bf16 (two conversion ops per call). This
// kernel takes fp32 activations and reads the weight as one sequential stream per thread:
//
//   the weight is packed once, tiles of 4 output rows by 16 inputs in a row:
//   packed[n / 4][k / 16][n % 4][k % 16] = q[n][k]
//
// so each 64-byte load brings 16 inputs of 4 outputs. Each 16 int8 widen to 16 floats and
// multiply up to 4 rows of x at once (16 accumulators). Threads share out the output tiles; each
// tile's weights are read once from memory for all rows of x.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kTileN = 4;   // output rows per tile
constexpr int64_t kTileK = 16;  // inputs per tile row (one 512-bit register of floats)
constexpr int64_t kMaxRowsPerPass = 4;
// Read ahead of the hardware prefetcher, which stops at 4 KiB pages (~9.1 -> ~7.5 ms for the decoder).
constexpr int64_t kPrefetchBytes = 2048;

#if defined(__AVX512F__)
// acc[m][r] += w_r * x[m] for 16 inputs of up to MR rows (x: row 0's inputs at this k, rows K apart)
template <int MR>
inline void accumulate(__m512 (&acc)[MR][kTileN], const float* __restrict x, int64_t K, __m512 w0, __m512 w1,
                       __m512 w2, __m512 w3) {
  for (int m = 0; m < MR; ++m) {
    const __m512 xv = _mm512_loadu_ps(x + m * K);
    acc[m][0] = _mm512_fmadd_ps(w0, xv, acc[m][0]);
    acc[m][1] = _mm512_fmadd_ps(w1, xv, acc[m][1]);
    acc[m][2] = _mm512_fmadd_ps(w2, xv, acc[m][2]);
    acc[m][3] = _mm512_fmadd_ps(w3, xv, acc[m][3]);
  }
}

template <int MR>
inline void store(__m512 (&acc)[MR][kTileN], const float* __restrict scale, float* __restrict out, int64_t N,
                  int64_t n) {
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kTileN; ++r) out[m * N + n + r] = _mm512_reduce_add_ps(acc[m][r]) * scale[n + r];
}

// x rows [m0, m0 + MR) against output tile [n, n + 4): out[m][n + r] = scale[n + r] * sum_k x[m][k] q[n + r][k]
template <int MR>
inline void tile(const float* __restrict x, int64_t K, const int8_t* __restrict w, const float* __restrict scale,
                 float* __restrict out, int64_t N, int64_t n) {
  __m512 acc[MR][kTileN];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kTileN; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kTileK) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k * kTileN + kPrefetchBytes), _MM_HINT_T0);
    const __m512i raw = _mm512_loadu_si512(static_cast<const void*>(w + k * kTileN));
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(raw)));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(raw, 1)));
    const __m512 w2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(raw, 2)));
    const __m512 w3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(raw, 3)));
    accumulate<MR>(acc, x + k, K, w0, w1, w2, w3);
  }
  store<MR>(acc, scale, out, N, n);
}

// Weights already widened to floats (buf: the tile's [K / 16][4][16] floats), for batches of
// more than 4 rows: each 16 int8 are widened once, not once per 4 rows.
template <int MR>
inline void tile_widened(const float* __restrict x, int64_t K, const float* __restrict buf,
                         const float* __restrict scale, float* __restrict out, int64_t N, int64_t n) {
  __m512 acc[MR][kTileN];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kTileN; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kTileK) {
    const float* wk = buf + k * kTileN;
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
    const __m512 w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);
    accumulate<MR>(acc, x + k, K, w0, w1, w2, w3);
  }
  store<MR>(acc, scale, out, N, n);
}

void widen(const int8_t* __restrict w, int64_t count, float* __restrict buf) {
  for (int64_t i = 0; i < count; i += 16)
    _mm512_storeu_ps(buf + i, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(w + i)))));
}
#define RILLET_INT8_WIDENED 1
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2: each output's 16 inputs widen to two registers of 8 floats; one accumulator per row and
// output (MR x 4), summed across its lanes at the end.
template <int MR>
inline void tile(const float* __restrict x, int64_t K, const int8_t* __restrict w, const float* __restrict scale,
                 float* __restrict out, int64_t N, int64_t n) {
  __m256 acc[MR][kTileN];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kTileN; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += kTileK) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k * kTileN + kPrefetchBytes), _MM_HINT_T0);
    for (int r = 0; r < kTileN; ++r) {
      const int8_t* wr = w + k * kTileN + r * kTileK;
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr))));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + 8))));
      for (int m = 0; m < MR; ++m) {
        acc[m][r] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * K + k), acc[m][r]);
        acc[m][r] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * K + k + 8), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kTileN; ++r) {
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[m][r]), _mm256_extractf128_ps(acc[m][r], 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      out[m * N + n + r] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2))) * scale[n + r];
    }
}
#else
// Without AVX-512 or AVX2: the same tiles, one scalar at a time (correct, not fast).
template <int MR>
inline void tile(const float* x, int64_t K, const int8_t* w, const float* scale, float* out, int64_t N, int64_t n) {
  for (int m = 0; m < MR; ++m)
    for (int64_t r = 0; r < kTileN; ++r) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k) sum += x[m * K + k] * w[(k / kTileK) * kTileN * kTileK + r * kTileK + k % kTileK];
      out[m * N + n + r] = sum * scale[n + r];
    }
}
#endif

void rows_by_tile(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, float* out,
                  int64_t N, int64_t n, float* buf) {
  const int8_t* wt = w + n * K;  // the tile's 4 x K weights, contiguous
#ifdef RILLET_INT8_WIDENED
  if (M > kMaxRowsPerPass) {
    widen(wt, kTileN * K, buf);
    for (int64_t m = 0; m < M; m += kMaxRowsPerPass) {
      const float* xm = x + m * K;
      float* om = out + m * N;
      switch (std::min(kMaxRowsPerPass, M - m)) {
        case 1: tile_widened<1>(xm, K, buf, scale, om, N, n); break;
        case 2: tile_widened<2>(xm, K, buf, scale, om, N, n); break;
        case 3: tile_widened<3>(xm, K, buf, scale, om, N, n); break;
        default: tile_widened<4>(xm, K, buf, scale, om, N, n); break;
      }
    }
    return;
  }
#endif
  for (int64_t m = 0; m < M; m += kMaxRowsPerPass) {
    const float* xm = x + m * K;
    float* om = out + m * N;
    switch (std::min(kMaxRowsPerPass, M - m)) {
      case 1: tile<1>(xm, K, wt, scale, om, N, n); break;
      case 2: tile<2>(xm, K, wt, scale, om, N, n); break;
      case 3: tile<3>(xm, K, wt, scale, om, N, n); break;
      default: tile<4>(xm, K, wt, scale, om, N, n); break;
    }
  }
}

}  // namespace

// x: [M, K] float32 contiguous   packed: int8 [N, K] in the tile layout above   scale: float32 [N]
// -> [M, N] float32
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scale.device().is_cpu(),
              "int8_linear takes CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 [rows, in]");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kChar && packed.is_contiguous(),
              "packed must be a contiguous int8 [out, in]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(packed.size(1) == K, "x has ", K, " inputs, the weight ", packed.size(1));
  TORCH_CHECK(N % kTileN == 0 && K % kTileK == 0, "out must be a multiple of 4 and in of 16");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "scale must be a contiguous float32 [out]");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Threads take chunks of 16 tiles (64 outputs) from a shared counter rather than a fixed half
  // each: on two cores shared with the HTTP server, a thread the OS pauses mid-GEMM leaves its
  // chunks to the other instead of stalling the step.
  const int64_t num_tiles = N / kTileN, chunk = 16, num_chunks = (num_tiles + chunk - 1) / chunk;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_chunks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> buf(M > kMaxRowsPerPass ? kTileN * K : 0);
    for (int64_t c = next++; c < num_chunks; c = next++)
      for (int64_t t = c * chunk; t < std::min(num_tiles, (c + 1) * chunk); ++t)
        rows_by_tile(xp, M, K, wp, sp, op, N, t * kTileN, buf.data());
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(rillet, m) { m.def("int8_linear(Tensor x, Tensor packed, Tensor scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(rillet, CPU, m) { m.impl("int8_linear", &int8_linear); }
