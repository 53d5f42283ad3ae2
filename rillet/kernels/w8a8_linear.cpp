// y = x @ (q * scale).T for batches of rows (decode steps of many streams, prompts): int8 weights q
// with one scale per output, and the inputs rounded to int8 per group of G inputs on the fly,
// multiplied on VNNI (u8 x s8 -> int32, 4 products per lane):
//
//   y[m][n] = scale[n] * sum_g sx[m][g] * sum_{k in g} xq[m][k] * q[n][k]
//
// A scale per group (llama.cpp's Q8_0 activations use groups of 32) keeps an outlier channel from
// flattening its whole row, which a scale per row does (Gemma 3's activations have a few channels
// ~100x the rest). Compute-bound batches are where this pays: 64 products per instruction against
// 16 for fp32 FMAs.
//
// Layout: lanes are outputs. The weight is packed once as uint8 q + 128,
//   packed[n / 16][k / 4][n % 16][k % 4],
// so one 64-byte load holds 4 inputs of 16 outputs and multiplies 4 broadcast inputs of a row.
// The +128 is taken back per group: sum (q + 128) xq = sum q xq + 128 sum xq. Threads take
// chunks of 64 outputs from a shared counter; a chunk's weights (64 x K bytes) stay in L2 while
// every 4 rows of x pass over them.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define RILLET_W8A8_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RILLET_W8A8_AVX2 1
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;       // outputs per vector
constexpr int64_t kChunk = 64;       // outputs per chunk of work (4 vectors)
constexpr int64_t kMaxRows = 4;      // rows of x per pass over a chunk
constexpr int64_t kPrefetchBytes = 1024;

// x rounded per group: xq [M][K] int8, sx [M][groups], correction [M][groups] = -128 * sum xq.
struct QuantizedRows {
  std::vector<int8_t> xq;
  std::vector<float> sx;
  std::vector<int32_t> correction;
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  QuantizedRows out{std::vector<int8_t>(M * K), std::vector<float>(M * groups), std::vector<int32_t>(M * groups)};
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        const float* xg = x + m * K + g * G;
        int8_t* qg = out.xq.data() + m * K + g * G;
#ifdef RILLET_W8A8_VNNI
        if (G % 16 == 0) {
          __m512 vmax = _mm512_setzero_ps();
          for (int64_t i = 0; i < G; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xg + i)));
          const float amax = _mm512_reduce_max_ps(vmax);
          const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
          __m512i vsum = _mm512_setzero_si512();
          for (int64_t i = 0; i < G; i += 16) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + i), inv));  // half to even
            vsum = _mm512_add_epi32(vsum, q);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(qg + i), _mm512_cvtepi32_epi8(q));
          }
          out.sx[m * groups + g] = amax / 127.f;
          out.correction[m * groups + g] = -128 * _mm512_reduce_add_epi32(vsum);
          continue;
        }
#endif
        float amax = 0.f;
        for (int64_t i = 0; i < G; ++i) amax = std::max(amax, std::fabs(xg[i]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
        for (int64_t i = 0; i < G; ++i) {
          qg[i] = static_cast<int8_t>(std::nearbyint(xg[i] * inv));  // round half to even, as torch.round
          sum += qg[i];
        }
        out.sx[m * groups + g] = amax / 127.f;
        out.correction[m * groups + g] = -128 * sum;
      }
  });
  return out;
}

#ifdef RILLET_W8A8_VNNI
#define RILLET_INLINE inline __attribute__((always_inline))

// acc += u8 w x s8 x, in place. NOTE: inline asm, because GCC copies the accumulators of
// _mm512_dpbusd_epi32 in and out of other registers every iteration (3x slower here).
RILLET_INLINE void dpbusd(__m512i& acc, __m512i w, __m512i x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
}

// The 4 s8 inputs at x in every lane, by a broadcast load of their own: vpdpbusd with the broadcast
// folded into its operand ran at less than half the rate here.
RILLET_INLINE __m512i broadcast4(const int8_t* x) {
  int32_t four;
  std::memcpy(&four, x, 4);
  return _mm512_set1_epi32(four);
}

// MR rows of x (from row m) against NR vectors of 16 outputs (from output n): MR x NR int32
// accumulators per group, the fp32 sums over groups kept in L1 (registers hold the int32 ones).
template <int MR, int NR>
RILLET_INLINE void tile(const uint8_t* __restrict packed, const float* __restrict wscale, const QuantizedRows& xr,
                        int64_t m, int64_t K, int64_t G, int64_t N, int64_t n, float* __restrict out) {
  const int64_t groups = K / G;
  alignas(64) float acc[MR][NR][kLanes] = {};
  const uint8_t* w[NR];
  for (int j = 0; j < NR; ++j) w[j] = packed + (n / kLanes + j) * K * kLanes;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) dot[i][j] = _mm512_set1_epi32(xr.correction[(m + i) * groups + g]);
    for (int64_t k = g * G; k < (g + 1) * G; k += 4) {
      __m512i wv[NR];
      for (int j = 0; j < NR; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(w[j] + k * kLanes + kPrefetchBytes), _MM_HINT_T0);
        wv[j] = _mm512_loadu_si512(static_cast<const void*>(w[j] + k * kLanes));
      }
      for (int i = 0; i < MR; ++i) {
        const __m512i xb = broadcast4(xr.xq.data() + (m + i) * K + k);
        for (int j = 0; j < NR; ++j) dpbusd(dot[i][j], wv[j], xb);
      }
    }
    for (int i = 0; i < MR; ++i) {
      const __m512 sx = _mm512_set1_ps(xr.sx[(m + i) * groups + g]);
      for (int j = 0; j < NR; ++j)
        _mm512_store_ps(acc[i][j], _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][j]), sx, _mm512_load_ps(acc[i][j])));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      _mm512_storeu_ps(out + (m + i) * N + n + j * kLanes,
                       _mm512_mul_ps(_mm512_load_ps(acc[i][j]), _mm512_loadu_ps(wscale + n + j * kLanes)));
}

// One group (a scale per row, group == K: the LM head's screen), 8 rows x 2 vectors of outputs:
// the 16 int32 sums stay in registers over all of K and are scaled once on the way out. Per 4
// inputs, 2 weight loads and 8 broadcasts feed 16 multiplies; a block's 32 x K
// weights (20 KiB for K = 640) stay in L1 while every 8 rows pass over them. NOTE: named
// accumulators, not an array: GCC keeps an array of them on the stack here.
RILLET_INLINE void tile_8x2(const uint8_t* __restrict packed, const float* __restrict wscale, const QuantizedRows& xr,
                            int64_t m, int64_t K, int64_t N, int64_t n, float* __restrict out,
                            const uint8_t* prefetch, int64_t prefetch_bytes) {
  // `prefetch_bytes` from `prefetch` into L2, spread over the loop (nullptr: none)
  const uint8_t* pf = prefetch;
  const uint8_t* pf_end = prefetch ? prefetch + prefetch_bytes : nullptr;
  const int64_t pf_step = prefetch ? ((prefetch_bytes / 64) / (K / 4) + 1) * 64 : 0;
  const uint8_t* w0 = packed + (n / kLanes) * K * kLanes;
  const uint8_t* w1 = w0 + K * kLanes;
  const int8_t* x = xr.xq.data() + m * K;
  const int32_t* c = xr.correction.data() + m;
#define RILLET_ROW_INIT(i) __m512i a##i##0 = _mm512_set1_epi32(c[i]), a##i##1 = a##i##0;
  RILLET_ROW_INIT(0) RILLET_ROW_INIT(1) RILLET_ROW_INIT(2) RILLET_ROW_INIT(3)
  RILLET_ROW_INIT(4) RILLET_ROW_INIT(5) RILLET_ROW_INIT(6) RILLET_ROW_INIT(7)
  for (int64_t k = 0; k < K; k += 4) {
    _mm_prefetch(reinterpret_cast<const char*>(w0 + k * kLanes + kPrefetchBytes), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + k * kLanes + kPrefetchBytes), _MM_HINT_T0);
    for (const uint8_t* stop = std::min(pf + pf_step, pf_end); pf < stop; pf += 64)
      _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T1);
    const __m512i v0 = _mm512_loadu_si512(static_cast<const void*>(w0 + k * kLanes));
    const __m512i v1 = _mm512_loadu_si512(static_cast<const void*>(w1 + k * kLanes));
#define RILLET_ROW_DOT(i) { const __m512i xb = broadcast4(x + (i) * K + k); dpbusd(a##i##0, v0, xb); dpbusd(a##i##1, v1, xb); }
    RILLET_ROW_DOT(0) RILLET_ROW_DOT(1) RILLET_ROW_DOT(2) RILLET_ROW_DOT(3)
    RILLET_ROW_DOT(4) RILLET_ROW_DOT(5) RILLET_ROW_DOT(6) RILLET_ROW_DOT(7)
  }
  const __m512 ws0 = _mm512_loadu_ps(wscale + n), ws1 = _mm512_loadu_ps(wscale + n + kLanes);
#define RILLET_ROW_OUT(i)                                                                                  \
  {                                                                                                         \
    const __m512 sx = _mm512_set1_ps(xr.sx[m + (i)]);                                                      \
    float* o = out + (m + (i)) * N + n;                                                                     \
    _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_cvtepi32_ps(a##i##0), _mm512_mul_ps(ws0, sx)));                \
    _mm512_storeu_ps(o + kLanes, _mm512_mul_ps(_mm512_cvtepi32_ps(a##i##1), _mm512_mul_ps(ws1, sx)));       \
  }
  RILLET_ROW_OUT(0) RILLET_ROW_OUT(1) RILLET_ROW_OUT(2) RILLET_ROW_OUT(3)
  RILLET_ROW_OUT(4) RILLET_ROW_OUT(5) RILLET_ROW_OUT(6) RILLET_ROW_OUT(7)
#undef RILLET_ROW_INIT
#undef RILLET_ROW_DOT
#undef RILLET_ROW_OUT
}

template <int NR>
void rows_of_chunk(const uint8_t* packed, const float* wscale, const QuantizedRows& xr, int64_t M, int64_t K,
                   int64_t G, int64_t N, int64_t n, float* out, int64_t first_row = 0) {
  for (int64_t m = first_row; m < M; m += kMaxRows) {
    switch (std::min(kMaxRows, M - m)) {
      case 1: tile<1, NR>(packed, wscale, xr, m, K, G, N, n, out); break;
      case 2: tile<2, NR>(packed, wscale, xr, m, K, G, N, n, out); break;
      case 3: tile<3, NR>(packed, wscale, xr, m, K, G, N, n, out); break;
      default: tile<4, NR>(packed, wscale, xr, m, K, G, N, n, out); break;
    }
  }
}

void chunk_rows(const uint8_t* packed, const float* wscale, const QuantizedRows& xr, int64_t M, int64_t K,
                int64_t G, int64_t N, int64_t n, int64_t chunk, float* out) {
  const int64_t end = std::min(N, n + chunk);
  for (int64_t piece = n; piece < end; piece += kChunk) {
    int64_t first_row = 0;
    if (G == K && M >= 8 && piece + kChunk <= N) {  // blocks of 8 rows by tile_8x2
      first_row = M / 8 * 8;
      const int64_t share = 2 * K * kLanes / (first_row / 8);
      for (int64_t sub = piece; sub < piece + kChunk; sub += 2 * kLanes) {
        // the next 32 outputs' weights go to L2 while these sit in L1 (none after a claim's last)
        const uint8_t* next = sub + 4 * kLanes <= end ? packed + (sub / kLanes + 2) * K * kLanes : nullptr;
        for (int64_t m = 0; m < first_row; m += 8)
          tile_8x2(packed, wscale, xr, m, K, N, sub, out, next ? next + (m / 8) * share : nullptr, share);
      }
      if (first_row == M) continue;
    }
    switch (std::min(kChunk, N - piece) / kLanes) {  // the last piece may hold fewer vectors of 16 outputs
      case 1: rows_of_chunk<1>(packed, wscale, xr, M, K, G, N, piece, out, first_row); break;
      case 2: rows_of_chunk<2>(packed, wscale, xr, M, K, G, N, piece, out, first_row); break;
      case 3: rows_of_chunk<3>(packed, wscale, xr, M, K, G, N, piece, out, first_row); break;
      default: rows_of_chunk<4>(packed, wscale, xr, M, K, G, N, piece, out, first_row); break;
    }
  }
}
#elif defined(RILLET_W8A8_AVX2)
// AVX2 without VNNI: vpmaddubsw sums pairs of u8 x s8 products into int16 and saturates, so the
// packed q + 128 cannot go in as it is. Its sign bit flipped gives q (s8); |q| (u8, <= 127) times
// x with q's sign (s8) is the same product, and a pair of them fits int16 (2 x 127 x 127). One
// 64-byte block (4 inputs of 16 outputs) is two registers of 8 outputs; vpmaddwd by ones sums the
// pairs into the 4-product int32 lanes that vpdpbusd gives. No +128 correction on this path.
#define RILLET_INLINE inline __attribute__((always_inline))

constexpr int64_t kAvx2Rows = 3;  // rows per tile: at 4, GCC spilled accumulators to the stack

RILLET_INLINE __m256i broadcast4(const int8_t* x) {
  int32_t four;
  std::memcpy(&four, x, 4);
  return _mm256_set1_epi32(four);
}

// MR rows of x (from row m) against 16 outputs from n: 2 x MR int32 accumulators per group, the
// fp32 sums over groups in registers too.
template <int MR>
RILLET_INLINE void tile16(const uint8_t* __restrict packed, const float* __restrict wscale, const QuantizedRows& xr,
                          int64_t m, int64_t K, int64_t G, int64_t N, int64_t n, float* __restrict out) {
  const int64_t groups = K / G;
  const uint8_t* w = packed + (n / kLanes) * K * kLanes;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i dot[MR][2];
    for (int i = 0; i < MR; ++i) dot[i][0] = dot[i][1] = _mm256_setzero_si256();
    for (int64_t k = g * G; k < (g + 1) * G; k += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k * kLanes + kPrefetchBytes), _MM_HINT_T0);
      const __m256i q0 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * kLanes)), flip);
      const __m256i q1 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * kLanes + 32)), flip);
      const __m256i a0 = _mm256_abs_epi8(q0), a1 = _mm256_abs_epi8(q1);
      for (int i = 0; i < MR; ++i) {
        const __m256i xb = broadcast4(xr.xq.data() + (m + i) * K + k);
        dot[i][0] = _mm256_add_epi32(dot[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(xb, q0)), ones));
        dot[i][1] = _mm256_add_epi32(dot[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(xb, q1)), ones));
      }
    }
    for (int i = 0; i < MR; ++i) {
      const __m256 sx = _mm256_set1_ps(xr.sx[(m + i) * groups + g]);
      acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i][0]), sx, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i][1]), sx, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_ps(out + (m + i) * N + n + 8 * h, _mm256_mul_ps(acc[i][h], _mm256_loadu_ps(wscale + n + 8 * h)));
}

void chunk_rows(const uint8_t* packed, const float* wscale, const QuantizedRows& xr, int64_t M, int64_t K,
                int64_t G, int64_t N, int64_t n, int64_t chunk, float* out) {
  // Each 16 outputs' K weights stay in L1 while every 3 rows of x pass over them.
  for (int64_t o = n; o < std::min(N, n + chunk); o += kLanes)
    for (int64_t m = 0; m < M; m += kAvx2Rows) {
      switch (std::min(kAvx2Rows, M - m)) {
        case 1: tile16<1>(packed, wscale, xr, m, K, G, N, o, out); break;
        case 2: tile16<2>(packed, wscale, xr, m, K, G, N, o, out); break;
        default: tile16<3>(packed, wscale, xr, m, K, G, N, o, out); break;
      }
    }
}
#else
// Portable path: the same integer arithmetic, one scalar at a time.
void chunk_rows(const uint8_t* packed, const float* wscale, const QuantizedRows& xr, int64_t M, int64_t K,
                int64_t G, int64_t N, int64_t n, int64_t chunk, float* out) {
  const int64_t groups = K / G;
  for (int64_t o = n; o < std::min(N, n + chunk); ++o)
    for (int64_t m = 0; m < M; ++m) {
      float y = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t dot = xr.correction[m * groups + g];
        for (int64_t k = g * G; k < (g + 1) * G; ++k)
          dot += static_cast<int32_t>(packed[((o / kLanes) * (K / 4) + k / 4) * kLanes * 4 + (o % kLanes) * 4 + k % 4]) *
                 xr.xq[m * K + k];
        y += static_cast<float>(dot) * xr.sx[m * groups + g];
      }
      out[m * N + o] = y * wscale[o];
    }
}
#endif

}  // namespace

// x: [M, K] float32 contiguous   packed: uint8 [N, K] (q + 128 in the layout above)   scale: float32 [N]
// group: inputs per activation scale (a multiple of 4 dividing K)   -> [M, N] float32
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t group) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scale.device().is_cpu(),
              "w8a8_linear takes CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 [rows, in]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.size(1) == K,
              "packed must be a contiguous uint8 [out, ", K, "]");
  TORCH_CHECK(N % kLanes == 0, "out must be a multiple of 16, got ", N);
  TORCH_CHECK(group > 0 && group % 4 == 0 && K % group == 0, "group must be a multiple of 4 dividing in (", K,
              "), got ", group);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "scale must be a contiguous float32 [out]");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const QuantizedRows xr = quantize_rows(x.data_ptr<float>(), M, K, group);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // One group and 8+ rows: claims of 512 outputs, so each next block of weights can be prefetched.
  const int64_t chunk = group == K && M >= 8 ? 8 * kChunk : kChunk;
  const int64_t num_chunks = (N + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < num_chunks; c = next++) chunk_rows(wp, sp, xr, M, K, group, N, c * chunk, chunk, op);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(rillet, m) {
  m.def("w8a8_linear(Tensor x, Tensor packed, Tensor scale, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(rillet, CPU, m) { m.impl("w8a8_linear", &w8a8_linear); }
