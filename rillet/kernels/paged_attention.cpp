// Decode attention read straight from the paged KV cache: one query token per sequence.
//
// For each sequence d and query head h the kernel walks the sequence's block table, scores
// the keys its query may see, keeps an online (streaming) softmax and accumulates V, all in
// fp32. Nothing is gathered: K/V rows are read in place, once for all the query heads that
// share a kv head (GQA: head h reads kv head h / (H / KVH)).
//
//   logical block first_blocks[d] + j lives in physical block block_tables[d, j]
//   key position of row t of that block: (first_blocks[d] + j) * block_size + t
//   visible: key_pos <= q_pos[d] and, with window > 0, key_pos > q_pos[d] - window
//
// Padded table entries (past the query's block) are never read; entries before the window
// are skipped block by block.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

inline float bf16_to_float(uint16_t bf16_bits) {
  uint32_t bits = static_cast<uint32_t>(bf16_bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Element type as the kernel reads it: bfloat16 as raw bits, so widening is a shift and vectorizes.
template <typename T> struct Raw { using type = T; };
template <> struct Raw<c10::BFloat16> { using type = uint16_t; };
template <> struct Raw<c10::Half> { using type = uint16_t; };

// Loops below run over fixed groups of kLanes floats (one 512-bit register) so the compiler
// keeps partial sums and accumulators in vector registers.
constexpr int64_t kLanes = 16;

inline float dot(const float* __restrict q, const float* __restrict k, int64_t n) {
  float partial[2 * kLanes] = {};  // two independent chains, so the FMAs pipeline
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < 2 * kLanes; ++l) partial[l] += q[i + l] * k[i + l];
  }
  // tree sum by halves (fixed sizes, so each step is one vector add)
#pragma omp simd
  for (int64_t l = 0; l < 16; ++l) partial[l] += partial[l + 16];
#pragma omp simd
  for (int64_t l = 0; l < 8; ++l) partial[l] += partial[l + 8];
#pragma omp simd
  for (int64_t l = 0; l < 4; ++l) partial[l] += partial[l + 4];
  float s = (partial[0] + partial[2]) + (partial[1] + partial[3]);
  for (; i < n; ++i) s += q[i] * k[i];
  return s;
}

// exp(x) for x <= 0 (Cephes expf: range reduction to [-ln2/2, ln2/2], degree-6 polynomial),
// ~2 ulp; unlike std::exp, a loop over it vectorizes. Below -87 (and for -inf) it returns
// exp(-87) ~ 1.6e-38, which is nothing next to the exp(0) = 1 every softmax sum holds.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer (no floor call)
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 1);
}

// dst[t * n + i] = src[t * src_stride + i] as fp32, for rows t in [t_begin, t_end); KT: the
// 16-bit type (bfloat16 widens by a shift, float16 by the F16C conversion)
template <typename KT>
inline void widen_rows(const uint16_t* __restrict src, int64_t src_stride, int64_t t_begin, int64_t t_end,
                       float* __restrict dst, int64_t n) {
  for (int64_t t = t_begin; t < t_end; ++t) {
    const uint16_t* row = src + t * src_stride;
    float* out = dst + t * n;
    if constexpr (std::is_same_v<KT, c10::BFloat16>) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(row[i]);
    } else {
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + kLanes <= n; i += kLanes)
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i))));
#elif defined(__F16C__)
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i))));
#endif
      for (; i < n; ++i) out[i] = c10::detail::fp16_ieee_to_fp32_value(row[i]);
    }
  }
}

// One query head: its scaled query, output accumulator and online-softmax state.
struct Head {
  float* q;       // [head_dim], times the softmax scale
  float* acc;     // [head_dim], sum of p * v so far
  float* scores;  // [block_size rounded up to kLanes] scratch
  float max;      // largest score so far
  float denom;    // sum of exp(score - max) so far
};

// Folds keys/values t in [t_begin, t_end) of one block (rows row_stride elements apart) into h.
void attend_block(Head& h, const float* __restrict kb, const float* __restrict vb, int64_t row_stride,
                  int64_t t_begin, int64_t t_end, int64_t head_dim) {
  float* __restrict s = h.scores;
  float block_max = -std::numeric_limits<float>::infinity();
  for (int64_t t = t_begin; t < t_end; ++t) {
    s[t] = dot(h.q, kb + t * row_stride, head_dim);
    block_max = std::max(block_max, s[t]);
  }
  float* __restrict acc = h.acc;
  if (block_max > h.max) {
    const float correction = std::exp(h.max - block_max);  // 0 on the first block
    h.denom *= correction;
#pragma omp simd
    for (int64_t i = 0; i < head_dim; ++i) acc[i] *= correction;
    h.max = block_max;
  }
  // p = exp(score - max) over whole kLanes-wide slices; keys outside [t_begin, t_end) score
  // -inf, so they add (almost) nothing to the sum and are skipped below
  const int64_t padded = (t_end + kLanes - 1) / kLanes * kLanes;
  for (int64_t t = 0; t < t_begin; ++t) s[t] = -std::numeric_limits<float>::infinity();
  for (int64_t t = t_end; t < padded; ++t) s[t] = -std::numeric_limits<float>::infinity();
  const float m = h.max;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum) simdlen(kLanes)
  for (int64_t t = 0; t < padded; ++t) {
    s[t] = exp_nonpositive(s[t] - m);
    sum += s[t];
  }
  h.denom += sum;
  // acc += sum_t s[t] * v[t], one register-wide slice of acc at a time
  int64_t i = 0;
  for (; i + kLanes <= head_dim; i += kLanes) {
    float a[kLanes];
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) a[l] = acc[i + l];
    for (int64_t t = t_begin; t < t_end; ++t) {
      const float p = s[t];
      const float* vt = vb + t * row_stride + i;
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) a[l] += p * vt[l];
    }
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) acc[i + l] = a[l];
  }
  for (; i < head_dim; ++i)
    for (int64_t t = t_begin; t < t_end; ++t) acc[i] += s[t] * vb[t * row_stride + i];
}

#if defined(__AVX512F__)
#define RILLET_HEADS_VECTORIZED 1
// 16 cache elements from p as floats
template <typename K>
inline __m512 load16(const K* p) {
  if constexpr (std::is_same_v<K, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<K, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {  // bfloat16: the high half of a float
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
}

// exp(x) for x <= 0, 16 lanes: exp_nonpositive's range reduction and polynomial
inline __m512 exp16_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(y, r), r, r), _mm512_set1_ps(1.f));
  const __m512i two_n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(two_n));
}

// All G query heads of one kv head over keys [t_begin, t_begin + n) of a block, n <= 16, head_dim a
// multiple of 16, read straight from the cache (rows row_stride elements apart): each K and V row
// is loaded (and widened) once for the G heads.
template <int G, typename K>
void attend_keys(Head* heads, const K* __restrict kb, const K* __restrict vb, int64_t row_stride,
                 int64_t t_begin, int64_t n, int64_t head_dim) {
  alignas(64) float s[G][kLanes];
  for (int64_t t = 0; t < n; ++t) {
    const K* kt = kb + (t_begin + t) * row_stride;
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t i = 0; i < head_dim; i += kLanes) {
      const __m512 kv = load16(kt + i);
      for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(heads[g].q + i), kv, acc[g]);
    }
    for (int g = 0; g < G; ++g) s[g][t] = _mm512_reduce_add_ps(acc[g]);
  }
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
  for (int g = 0; g < G; ++g) {
    Head& h = heads[g];
    const __m512 sv = _mm512_maskz_loadu_ps(valid, s[g]);
    const float block_max = _mm512_mask_reduce_max_ps(valid, sv);
    if (block_max > h.max) {
      const float correction = std::exp(h.max - block_max);  // 0 on the first block
      h.denom *= correction;
      const __m512 c = _mm512_set1_ps(correction);
      for (int64_t i = 0; i < head_dim; i += kLanes) _mm512_storeu_ps(h.acc + i, _mm512_mul_ps(_mm512_loadu_ps(h.acc + i), c));
      h.max = block_max;
    }
    const __m512 p = _mm512_maskz_mov_ps(valid, exp16_nonpositive(_mm512_sub_ps(sv, _mm512_set1_ps(h.max))));
    _mm512_store_ps(s[g], p);
    h.denom += _mm512_reduce_add_ps(p);
  }
  for (int64_t i = 0; i < head_dim; i += kLanes) {
    __m512 a[G];
    for (int g = 0; g < G; ++g) a[g] = _mm512_loadu_ps(heads[g].acc + i);
    for (int64_t t = 0; t < n; ++t) {
      const __m512 vt = load16(vb + (t_begin + t) * row_stride + i);
      for (int g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(_mm512_set1_ps(s[g][t]), vt, a[g]);
    }
    for (int g = 0; g < G; ++g) _mm512_storeu_ps(heads[g].acc + i, a[g]);
  }
}

// Folds keys t in [t_begin, t_end) of one block into every head of the item; false where the
// shapes do not fit (the caller then widens the rows and goes head by head).
template <typename K>
bool attend_block_heads(std::vector<Head>& heads, const K* kb, const K* vb, int64_t row_stride,
                        int64_t t_begin, int64_t t_end, int64_t head_dim) {
  if (head_dim % kLanes) return false;
  auto run = [&](auto group) {
    constexpr int G = decltype(group)::value;
    for (int64_t t = t_begin; t < t_end; t += kLanes)
      attend_keys<G, K>(heads.data(), kb, vb, row_stride, t, std::min<int64_t>(kLanes, t_end - t), head_dim);
  };
  switch (heads.size()) {
    case 1: run(std::integral_constant<int, 1>{}); return true;
    case 2: run(std::integral_constant<int, 2>{}); return true;
    case 4: run(std::integral_constant<int, 4>{}); return true;
    case 8: run(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}
#endif

template <typename QT, typename KT>
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_tables, const at::Tensor& first_blocks,
                      const at::Tensor& q_pos, int64_t window, double scale, at::Tensor& out) {
  using K = typename Raw<KT>::type;
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t num_kv_heads = k_cache.size(2), max_blocks = block_tables.size(1);
  const int64_t group = num_heads / num_kv_heads;      // query heads sharing one kv head
  const int64_t row_stride = num_kv_heads * head_dim;  // between tokens of a block
  const int64_t block_stride = block_size * row_stride;
  const int64_t padded_block = (block_size + kLanes - 1) / kLanes * kLanes;
  const int64_t q_stride0 = q.stride(0), q_stride1 = q.stride(1);

  const QT* q_data = q.data_ptr<QT>();
  const K* k_data = reinterpret_cast<const K*>(k_cache.data_ptr<KT>());
  const K* v_data = reinterpret_cast<const K*>(v_cache.data_ptr<KT>());
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* firsts = first_blocks.data_ptr<int64_t>();
  const int64_t* positions = q_pos.data_ptr<int64_t>();
  QT* out_data = out.data_ptr<QT>();
  const float fscale = static_cast<float>(scale);

  // A work item is a sequence and the query heads of one kv head, so each K/V row, once in
  // cache, serves all of them; with fewer (sequence, kv head) pairs than threads, items are
  // single query heads instead.
  const int64_t heads_per_item = num_seqs * num_kv_heads >= at::get_num_threads() ? group : 1;
  const int64_t items_per_seq = num_heads / heads_per_item;

  at::parallel_for(0, num_seqs * items_per_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(heads_per_item * (2 * head_dim + padded_block));
    std::vector<Head> heads(heads_per_item);
    // bfloat16 caches: the block's rows of this kv head, widened once for all the item's heads
    std::vector<float> k_rows, v_rows;
    if constexpr (!std::is_same_v<K, float>) {
      k_rows.resize(block_size * head_dim);
      v_rows.resize(block_size * head_dim);
    }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t d = item / items_per_seq, first_head = item % items_per_seq * heads_per_item;
      const int64_t kvh = first_head / group;
      for (int64_t g = 0; g < heads_per_item; ++g) {
        Head& h = heads[g];
        h.q = buffer.data() + g * (2 * head_dim + padded_block);
        h.acc = h.q + head_dim;
        h.scores = h.acc + head_dim;
        h.max = -std::numeric_limits<float>::infinity();
        h.denom = 0.f;
        const QT* qrow = q_data + d * q_stride0 + (first_head + g) * q_stride1;
        for (int64_t i = 0; i < head_dim; ++i) h.q[i] = static_cast<float>(qrow[i]) * fscale;
        std::fill(h.acc, h.acc + head_dim, 0.f);
      }

      const int64_t pos = positions[d], first = firsts[d];
      const int64_t lo = window > 0 ? std::max<int64_t>(pos - window + 1, 0) : 0;  // first visible key
      const int64_t j_begin = std::max<int64_t>(lo / block_size - first, 0);
      const int64_t j_end = std::min<int64_t>(pos / block_size - first + 1, max_blocks);
      const int64_t* table = tables + d * max_blocks;
      for (int64_t j = j_begin; j < j_end; ++j) {
        const int64_t block = table[j];
        TORCH_CHECK(block >= 0 && block < num_blocks, "block id ", block, " out of range [0, ", num_blocks, ")");
        const int64_t base = (first + j) * block_size;
        const int64_t t_begin = std::max<int64_t>(lo - base, 0);
        const int64_t t_end = std::min<int64_t>(pos - base + 1, block_size);
        if (t_begin >= t_end) continue;  // only for a negative q_pos
        if (j + 1 < j_end) {  // blocks are scattered: start fetching the next one now
          const int64_t next = std::clamp<int64_t>(table[j + 1], 0, num_blocks - 1);
          for (int64_t t = 0; t < block_size; ++t) {
            prefetch(k_data + next * block_stride + t * row_stride + kvh * head_dim, head_dim * sizeof(K));
            prefetch(v_data + next * block_stride + t * row_stride + kvh * head_dim, head_dim * sizeof(K));
          }
        }
        const int64_t offset = block * block_stride + kvh * head_dim;
#ifdef RILLET_HEADS_VECTORIZED
        const KT* kb = reinterpret_cast<const KT*>(k_data + offset);
        const KT* vb = reinterpret_cast<const KT*>(v_data + offset);
        if (attend_block_heads<KT>(heads, kb, vb, row_stride, t_begin, t_end, head_dim)) continue;
#endif
        if constexpr (std::is_same_v<K, float>) {
          for (Head& h : heads) attend_block(h, k_data + offset, v_data + offset, row_stride, t_begin, t_end, head_dim);
        } else {
          widen_rows<KT>(k_data + offset, row_stride, t_begin, t_end, k_rows.data(), head_dim);
          widen_rows<KT>(v_data + offset, row_stride, t_begin, t_end, v_rows.data(), head_dim);
          for (Head& h : heads) attend_block(h, k_rows.data(), v_rows.data(), head_dim, t_begin, t_end, head_dim);
        }
      }

      for (int64_t g = 0; g < heads_per_item; ++g) {
        const float inv = heads[g].denom > 0.f ? 1.f / heads[g].denom : 0.f;
        QT* orow = out_data + (d * num_heads + first_head + g) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) orow[i] = static_cast<QT>(heads[g].acc[i] * inv);
      }
    }
  });
}

template <typename QT>
void dispatch_cache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& block_tables, const at::Tensor& first_blocks, const at::Tensor& q_pos,
                    int64_t window, double scale, at::Tensor& out) {
  if (k_cache.scalar_type() == at::kFloat)
    decode_attention<QT, float>(q, k_cache, v_cache, block_tables, first_blocks, q_pos, window, scale, out);
  else if (k_cache.scalar_type() == at::kHalf)
    decode_attention<QT, c10::Half>(q, k_cache, v_cache, block_tables, first_blocks, q_pos, window, scale, out);
  else
    decode_attention<QT, c10::BFloat16>(q, k_cache, v_cache, block_tables, first_blocks, q_pos, window, scale,
                                        out);
}

bool supported(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }
bool supported_cache(at::ScalarType t) { return supported(t) || t == at::kHalf; }

}  // namespace

// q: [D, H, hd]   k_cache, v_cache: [num_blocks, block_size, KVH, hd]   block_tables: [D, max_blocks]
// first_blocks, q_pos: [D]   -> [D, H, hd] in q's dtype
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& first_blocks,
                                  const at::Tensor& q_pos, int64_t window, double scale) {
  for (const at::Tensor* t : {&q, &k_cache, &v_cache, &block_tables, &first_blocks, &q_pos})
    TORCH_CHECK(t->device().is_cpu(), "paged_decode_attention takes CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [D, H, hd] with contiguous rows");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k/v caches must both be [num_blocks, block_size, KVH, hd]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "k/v caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k/v caches must share a dtype");
  TORCH_CHECK(supported(q.scalar_type()) && supported_cache(k_cache.scalar_type()),
              "q must be float32 or bfloat16, the caches float32, bfloat16 or float16");
  TORCH_CHECK(k_cache.size(3) == q.size(2), "head_dim of q and the caches differ");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of kv heads");
  const int64_t num_seqs = q.size(0);
  auto int64_rows = [num_seqs](const at::Tensor& t, int64_t dim) {
    return t.dim() == dim && t.size(0) == num_seqs && t.is_contiguous() && t.scalar_type() == at::kLong;
  };
  TORCH_CHECK(int64_rows(block_tables, 2), "block_tables must be contiguous int64 [D, max_blocks]");
  TORCH_CHECK(int64_rows(first_blocks, 1), "first_blocks must be contiguous int64 [D]");
  TORCH_CHECK(int64_rows(q_pos, 1), "q_pos must be contiguous int64 [D]");

  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.scalar_type() == at::kFloat)
    dispatch_cache<float>(q, k_cache, v_cache, block_tables, first_blocks, q_pos, window, scale, out);
  else
    dispatch_cache<c10::BFloat16>(q, k_cache, v_cache, block_tables, first_blocks, q_pos, window, scale, out);
  return out;
}

// Registered as a torch operator, so it shows in the profiler as rillet::paged_decode_attention.
TORCH_LIBRARY_FRAGMENT(rillet, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor first_blocks, Tensor q_pos, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(rillet, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
