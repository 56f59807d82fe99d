// Weight-only int8 matrix-vector product for CPU decode steps (model/cpu_int8.py builds and loads it).
//
// out[m, n] = scale[n] * sum_k x[m, k] * q[n, k], q the layer's int8 codes as saved ([N, K], row-major).
// Each block of 64 activations is turned into int16 with its own scale (max |x| / 32767, about 1e-5
// relative: finer than the bfloat16 activations themselves), so a 64-wide piece of a row is one int16 x
// int16 dot product on the integer units (vpdpwssd), flushed to float once per block. A thread walks whole
// rows one after another, so its reads are one sequential stream the hardware prefetcher follows: for a
// decode row, speed is the memory read rate (torch's _weight_int8pack_mm interleaves rows and on short
// rows reads at half of it, bench/RESULTS.md).

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QWEN2AUDIO_HAVE_KERNEL 1
#else
#define QWEN2AUDIO_HAVE_KERNEL 0
#endif

namespace {

constexpr int64_t kBlock = 64;  // activations per int16 scale; K must be a multiple
constexpr int64_t kTile = 4;    // at most this many activation rows share one pass over a weight row,
constexpr int64_t kCodeBytes = 16384;  // as many as have their codes in this many bytes (they stay in L1)

bool available() { return QWEN2AUDIO_HAVE_KERNEL; }

#if QWEN2AUDIO_HAVE_KERNEL

// x [M, K] float -> codes [M, K] int16 and per-block scales [M, K / kBlock]. With `residual`, a second
// code array [M, K] holds what the first leaves over, in steps 32767 times finer (float32 activations
// then come through to about 1e-9 instead of 1e-5).
void quantize_rows(const float* x, int64_t M, int64_t K, int16_t* codes, int16_t* residual, float* scales) {
  const int64_t blocks = K / kBlock;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t base = m * K + b * kBlock;
      float top = 0.f;
      for (int64_t i = 0; i < kBlock; ++i) top = std::max(top, std::fabs(x[base + i]));
      const float step = top / 32767.f, inverse = top > 0.f ? 32767.f / top : 0.f;
      for (int64_t i = 0; i < kBlock; ++i) {
        const float code = std::nearbyint(x[base + i] * inverse);
        codes[base + i] = static_cast<int16_t>(code);
        if (residual) residual[base + i] = static_cast<int16_t>(std::nearbyint((x[base + i] - code * step) * inverse * 32767.f));
      }
      scales[m * blocks + b] = step;
    }
  }
}

inline __m512i dot(__m512i acc, __m512i w, __m512i x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}

inline __m512i widen(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// One weight row against T activation rows: out[t] = sum over blocks of scale[t, b] * integer dot (plus
// the residual codes' dot at 1/32767 of the scale when there are residual codes).
template <int T, bool Residual>
void row_dot(const int8_t* w, const int16_t* codes, const int16_t* residual, const float* scales, int64_t K,
             float* out) {
  const int64_t blocks = K / kBlock;
  __m512 total[T];
  for (int t = 0; t < T; ++t) total[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i acc[T], rest[T];
    for (int t = 0; t < T; ++t) acc[t] = rest[t] = _mm512_setzero_si512();
    for (int64_t k = b * kBlock; k < (b + 1) * kBlock; k += 32) {
      const __m512i weights = widen(w + k);
      for (int t = 0; t < T; ++t) {
        acc[t] = dot(acc[t], weights, _mm512_loadu_si512(codes + t * K + k));
        if (Residual) rest[t] = dot(rest[t], weights, _mm512_loadu_si512(residual + t * K + k));
      }
    }
    for (int t = 0; t < T; ++t) {
      const float scale = scales[t * blocks + b];
      total[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), _mm512_set1_ps(scale), total[t]);
      if (Residual) total[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(rest[t]), _mm512_set1_ps(scale / 32767.f), total[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[t] = _mm512_reduce_add_ps(total[t]);
}

template <bool Residual>
void tile_dot(int tile, const int8_t* w, const int16_t* codes, const int16_t* residual, const float* scales,
              int64_t K, float* out) {
  switch (tile) {
    case 1: return row_dot<1, Residual>(w, codes, residual, scales, K, out);
    case 2: return row_dot<2, Residual>(w, codes, residual, scales, K, out);
    case 3: return row_dot<3, Residual>(w, codes, residual, scales, K, out);
    default: return row_dot<4, Residual>(w, codes, residual, scales, K, out);
  }
}

// out [M, N] for weight rows [first, last), one after another, the activations in tiles whose codes
// stay in L1 (longer inputs: torch's kernel is faster, model/cpu_int8.py sends them there).
template <bool Residual>
void product(int64_t first, int64_t last, const int8_t* w, const int16_t* codes, const int16_t* residual,
             const float* block_scales, const float* row_scales, int64_t M, int64_t K, int64_t N, float* out) {
  float dots[kTile];
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(kTile, kCodeBytes / (K * sizeof(int16_t))));
  for (int64_t n = first; n < last; ++n) {
    for (int64_t m = 0; m < M; m += most) {
      const int tile = static_cast<int>(std::min(most, M - m));
      tile_dot<Residual>(tile, w + n * K, codes + m * K, Residual ? residual + m * K : nullptr,
                         block_scales + m * (K / kBlock), K, dots);
      for (int t = 0; t < tile; ++t) out[(m + t) * N + n] = dots[t] * row_scales[n];
    }
  }
}

#endif

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(available(), "this build of the int8 kernel has no AVX-512 code");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && scales.dim() == 1, "x [M, K], weight [N, K], scales [N]");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous(), "weight: contiguous int8");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && scales.size(0) == N, "shapes differ: x ", x.sizes(), ", weight ",
              weight.sizes(), ", scales ", scales.sizes());
  TORCH_CHECK(K % kBlock == 0, "the input width must be a multiple of ", kBlock);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
#if QWEN2AUDIO_HAVE_KERNEL
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor sf = scales.to(at::kFloat).contiguous();
  const bool exact = x.scalar_type() == at::kFloat;  // bfloat16 inputs are already coarser than the codes
  at::Tensor codes = at::empty({exact ? 2 : 1, M, K}, x.options().dtype(at::kShort));
  at::Tensor block_scales = at::empty({M, K / kBlock}, x.options().dtype(at::kFloat));
  int16_t* c = codes.data_ptr<int16_t>();
  int16_t* r = exact ? c + M * K : nullptr;
  quantize_rows(xf.data_ptr<float>(), M, K, c, r, block_scales.data_ptr<float>());
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* bs = block_scales.data_ptr<float>();
  const float* s = sf.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t first, int64_t last) {
    if (exact) return product<true>(first, last, w, c, r, bs, s, M, K, N, o);
    return product<false>(first, last, w, c, r, bs, s, M, K, N, o);
  });
#endif
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(qwen2audio_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("int8_available() -> bool", &available);
}

TORCH_LIBRARY_IMPL(qwen2audio_cpu, CPU, m) { m.impl("int8_linear", int8_linear); }
