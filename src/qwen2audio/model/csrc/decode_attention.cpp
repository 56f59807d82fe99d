// Decode attention on the CPU straight from the paged KV cache (model/attention.py calls it through
// model/cpu_kernels.py).
//
// One new query row per sequence against its first lengths[s] cached keys, read block by block where
// the block table says, in the cache's own dtype (float32 or bfloat16) and widened in registers. The
// eager path gathers the blocks into a new tensor, widens it to float32 and runs two batched products:
// three passes over a 7B step's 0.4 GB of keys and values (bench/RESULTS.md); this reads them once.
// For each sequence and range of KV heads: their query heads' scores over every key, a softmax, then
// the weighted sums of the values, all in float32.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define QWEN2AUDIO_HAVE_ATTENTION 1
#else
#define QWEN2AUDIO_HAVE_ATTENTION 0
#endif

namespace {

constexpr int64_t kLanes = 16;

bool available() { return QWEN2AUDIO_HAVE_ATTENTION; }

#if QWEN2AUDIO_HAVE_ATTENTION

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

inline void store16(at::BFloat16* p, __m512 v) {  // round to nearest even, as torch's conversion does
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i kept = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(kept, 16)));
}

struct Shape {
  int64_t heads, kv_heads, dim, block_size, table_width;
};

// Sequence s, KV heads [first, last): out[s, h * G + g] for their query heads. Each position's keys of
// these heads lie together in the cache ([block, slot, KVH, d]), so a pass over the positions reads one
// piece of each slot in turn instead of 256 bytes every few kilobytes.
template <typename Q, typename C>
void heads_attention(const Q* query, const C* k_cache, const C* v_cache, const int64_t* table, int64_t length,
                     const Shape& shape, int64_t first, int64_t last, Q* out, std::vector<float>& scores,
                     std::vector<float>& q, std::vector<float>& acc) {
  const int64_t group = shape.heads / shape.kv_heads, dim = shape.dim, chunks = dim / kLanes;
  const int64_t rows = (last - first) * group;  // query heads handled here, from query head first * group
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  scores.resize(rows * length);
  q.resize(rows * dim);
  acc.assign(rows * dim, 0.f);
  const Q* own = query + first * group * dim;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < chunks; ++c)
      store16(q.data() + r * dim + c * kLanes, _mm512_mul_ps(load16(own + r * dim + c * kLanes), _mm512_set1_ps(scale)));
  auto slot = [&](const C* cache, int64_t position) {  // this position's first KV head of the range
    const int64_t block = table[position / shape.block_size];
    return cache + ((block * shape.block_size + position % shape.block_size) * shape.kv_heads + first) * dim;
  };
  for (int64_t l = 0; l < length; ++l) {
    const C* keys = slot(k_cache, l);
    for (int64_t r = 0; r < rows; ++r) {
      const C* key = keys + (r / group) * dim;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c)
        sum = _mm512_fmadd_ps(_mm512_loadu_ps(q.data() + r * dim + c * kLanes), load16(key + c * kLanes), sum);
      scores[r * length + l] = _mm512_reduce_add_ps(sum);
    }
  }
  std::vector<float> total(rows, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores.data() + r * length;
    const float top = *std::max_element(row, row + length);
    for (int64_t l = 0; l < length; ++l) {
      row[l] = std::exp(row[l] - top);
      total[r] += row[l];
    }
  }
  for (int64_t l = 0; l < length; ++l) {
    const C* values = slot(v_cache, l);
    for (int64_t r = 0; r < rows; ++r) {
      const C* value = values + (r / group) * dim;
      const __m512 weight = _mm512_set1_ps(scores[r * length + l]);
      for (int64_t c = 0; c < chunks; ++c) {
        float* into = acc.data() + r * dim + c * kLanes;
        _mm512_storeu_ps(into, _mm512_fmadd_ps(weight, load16(value + c * kLanes), _mm512_loadu_ps(into)));
      }
    }
  }
  Q* mine = out + first * group * dim;
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inverse = _mm512_set1_ps(1.f / total[r]);
    for (int64_t c = 0; c < chunks; ++c)
      store16(mine + r * dim + c * kLanes, _mm512_mul_ps(_mm512_loadu_ps(acc.data() + r * dim + c * kLanes), inverse));
  }
}

// Tasks are (sequence, KV head) pairs; a thread takes a run of them and does each sequence's part of
// the run as one range of heads.
template <typename Q, typename C>
void run(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& tables,
         const std::vector<int64_t>& lengths, const Shape& shape, at::Tensor& out) {
  const Q* q = query.data_ptr<Q>();
  const C* k = k_cache.data_ptr<C>();
  const C* v = v_cache.data_ptr<C>();
  const int64_t* t = tables.data_ptr<int64_t>();
  Q* o = out.data_ptr<Q>();
  const int64_t sequences = query.size(0), heads = shape.kv_heads;
  at::parallel_for(0, sequences * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, q_buffer, acc;
    for (int64_t task = begin; task < end;) {
      const int64_t s = task / heads, first = task % heads, last = std::min(heads, first + (end - task));
      heads_attention<Q, C>(q + s * shape.heads * shape.dim, k, v, t + s * shape.table_width, lengths[s], shape, first,
                            last, o + s * shape.heads * shape.dim, scores, q_buffer, acc);
      task += last - first;
    }
  });
}

#endif

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& tables, const at::Tensor& lengths) {
  TORCH_CHECK(available(), "this build of the attention kernel has no AVX-512 code");
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && tables.dim() == 2,
              "query [D, H, d], caches [blocks, block_size, KVH, d], tables [D, B]");
  TORCH_CHECK(query.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
              (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16),
              "a float32 or bfloat16 cache");
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16, "a float32 or bfloat16 query");
  const Shape shape{query.size(1), k_cache.size(2), query.size(2), k_cache.size(1), tables.size(1)};
  TORCH_CHECK(k_cache.size(3) == shape.dim && shape.dim % kLanes == 0 && shape.heads % shape.kv_heads == 0,
              "head sizes do not fit: query ", query.sizes(), ", cache ", k_cache.sizes());
  TORCH_CHECK(tables.size(0) == query.size(0) && lengths.numel() == query.size(0), "one table and length a sequence");
  const at::Tensor table = tables.to(at::kLong).contiguous();
  const at::Tensor counts = lengths.to(at::kLong).contiguous();
  std::vector<int64_t> length(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + counts.numel());
  const int64_t* blocks = table.data_ptr<int64_t>();
  for (int64_t s = 0; s < query.size(0); ++s) {
    TORCH_CHECK(length[s] >= 1 && length[s] <= shape.table_width * shape.block_size, "sequence ", s, ": length ",
                length[s], " outside its table");
    for (int64_t b = 0; b < (length[s] + shape.block_size - 1) / shape.block_size; ++b)
      TORCH_CHECK(blocks[s * shape.table_width + b] >= 0 && blocks[s * shape.table_width + b] < k_cache.size(0),
                  "sequence ", s, ": block ", blocks[s * shape.table_width + b], " outside the cache");
  }
  at::Tensor out = at::empty_like(query);
#if QWEN2AUDIO_HAVE_ATTENTION
  const bool q32 = query.scalar_type() == at::kFloat, c32 = k_cache.scalar_type() == at::kFloat;
  if (q32 && c32) run<float, float>(query, k_cache, v_cache, table, length, shape, out);
  else if (q32) run<float, at::BFloat16>(query, k_cache, v_cache, table, length, shape, out);
  else if (c32) run<at::BFloat16, float>(query, k_cache, v_cache, table, length, shape, out);
  else run<at::BFloat16, at::BFloat16>(query, k_cache, v_cache, table, length, shape, out);
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen2audio_cpu, m) {
  m.def("decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lengths) -> Tensor");
  m.def("attention_available() -> bool", &available);
}

TORCH_LIBRARY_IMPL(qwen2audio_cpu, CPU, m) { m.impl("decode_attention", decode_attention); }
