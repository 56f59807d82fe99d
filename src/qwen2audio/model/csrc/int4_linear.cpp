// Weight-only int4 matrix product for CPU decode steps (model/cpu_kernels.py builds and loads it).
//
// out[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * scale[n, g] + zero[n, g]), g = k / group, q in 0..15.
// The codes are held in "lanes" order (model/quant.py, lanes_layout): for each block of 16 output rows
// and each 8 inputs, 64 bytes, byte 4r + j holding row r's inputs j (low nibble) and 4 + j (high nibble),
// so that one 64-byte load, masked and shifted, is two 16-row x 4-input tiles of unsigned bytes: one
// vpdpbusd each against 4 int8 activations broadcast to every row. Activations are int8 per 32-input
// block (max |x| / 127: llama.cpp's Q8 activations); the codes' offset of 8 comes off each block's
// integer sum (so rounding the activations errs against centred codes), the zeros take the group
// sums of the float activations, and a row block's weights are one sequential stream. Scales and zeros stay bfloat16
// ([N / 16, groups, 2, 16]: the block's 16 scales, then its 16 zeros), as the checkpoint holds them.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QWEN2AUDIO_HAVE_INT4 1
#else
#define QWEN2AUDIO_HAVE_INT4 0
#endif

namespace {

constexpr int64_t kRows = 16;   // output rows per block: one per 32-bit lane
constexpr int64_t kBlock = 32;  // activations per int8 scale
constexpr int kTile = 8;        // activation rows that share one pass over a row block's weights

bool available() { return QWEN2AUDIO_HAVE_INT4; }

#if QWEN2AUDIO_HAVE_INT4

// The activations as the kernel reads them: int8 codes per 32-input block with the block's step and
// 8 x its code sum (the codes' offset), and each group's float sum. float32 activations get a second
// level of codes for what the first leaves over, in steps 254 times finer, so they come through to
// about 1e-5 of a block's largest value instead of 1e-2 (bfloat16 ones are coarser than that already).
struct Activations {
  int64_t M, K, group, levels;
  at::Tensor codes, steps, offsets, sums;  // [levels, M, K] int8, [levels, M, K / 32] float and int, [M, K / group]

  Activations(const at::Tensor& x, int64_t group, int64_t levels)
      : M(x.size(0)), K(x.size(1)), group(group), levels(levels),
        codes(at::empty({levels, M, K}, x.options().dtype(at::kChar))),
        steps(at::empty({levels, M, K / kBlock}, x.options().dtype(at::kFloat))),
        offsets(at::empty({levels, M, K / kBlock}, x.options().dtype(at::kInt))),
        sums(at::zeros({M, K / group}, x.options().dtype(at::kFloat))) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    const float* in = xf.data_ptr<float>();
    int8_t* c = codes.data_ptr<int8_t>();
    float* st = steps.data_ptr<float>();
    int32_t* off = offsets.data_ptr<int32_t>();
    float* su = sums.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < K / kBlock; ++b) {
        __m512 rest[2] = {_mm512_loadu_ps(in + m * K + b * kBlock), _mm512_loadu_ps(in + m * K + b * kBlock + 16)};
        su[m * (K / group) + b * kBlock / group] += _mm512_reduce_add_ps(_mm512_add_ps(rest[0], rest[1]));
        float step = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(rest[0]), _mm512_abs_ps(rest[1]))) / 127.f;
        for (int64_t level = 0; level < levels; ++level, step /= 254.f) {
          const int64_t at = (level * M + m) * (K / kBlock) + b;
          int8_t* out = c + (level * M + m) * K + b * kBlock;
          off[at] = 8 * quantize_block(rest, step, out);
          st[at] = step;
        }
      }
  }

  // 32 values -> int8 codes (nearest, ties to even) in steps of `step`, leaving what they miss in `rest`;
  // returns the codes' sum.
  static int32_t quantize_block(__m512 rest[2], float step, int8_t* out) {
    const __m512 inverse = _mm512_set1_ps(step > 0.f ? 1.f / step : 0.f);
    const __m512 limit = _mm512_set1_ps(127.f);
    int32_t total = 0;
    for (int half = 0; half < 2; ++half) {
      const __m512 scaled = _mm512_min_ps(limit, _mm512_max_ps(-limit, _mm512_mul_ps(rest[half], inverse)));
      const __m512i code = _mm512_cvt_roundps_epi32(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * half), _mm512_cvtepi32_epi8(code));
      rest[half] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(code), _mm512_set1_ps(step), rest[half]);
      total += _mm512_reduce_add_epi32(code);
    }
    return total;
  }
};

inline __m512i dot(__m512i acc, __m512i weights, __m512i activations) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, weights, activations);
#else
  const __m512i pairs = _mm512_maddubs_epi16(weights, activations);  // at most 2 * 15 * 127: no saturation
  return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
#endif
}

inline __m512 bf16_lanes(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof(word));
  return _mm512_set1_epi32(word);
}

// Pointers to activation rows m.. of an Activations, for one tile.
struct Tile {
  const int8_t* codes;
  const float* steps;
  const int32_t* offsets;
  const float* sums;
  int64_t level_codes, level_blocks;  // strides from one level to the next
};

// One block of 16 output rows against T activation rows, Levels levels of codes: out[t * N + r], r < 16.
// Few rows get more accumulators each (Chains), so that the products do not wait on one another.
template <int T, int Levels>
void block_dot(const uint8_t* w, const uint16_t* sz, const Tile& a, int64_t K, int64_t group, int64_t N,
               float* out) {
  constexpr int Chains = T * Levels >= 4 ? 1 : (T * Levels >= 2 ? 2 : 4);
  const int64_t blocks = K / kBlock, groups = K / group;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 total[T];
  for (int t = 0; t < T; ++t) total[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 scale = bf16_lanes(sz + g * 2 * kRows);
    for (int64_t b = g * group / kBlock; b < (g + 1) * group / kBlock; ++b) {
      __m512i acc[Levels][T][Chains];
      for (int l = 0; l < Levels; ++l)
        for (int t = 0; t < T; ++t)
          for (int c = 0; c < Chains; ++c) acc[l][t][c] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int step = 0; step < kBlock / 8; ++step) {
        const int64_t k = b * kBlock + step * 8;
        const __m512i packed = _mm512_loadu_si512(w + k * kRows / 2);
        const __m512i first = _mm512_and_si512(packed, nibble);
        const __m512i second = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
        for (int l = 0; l < Levels; ++l)
          for (int t = 0; t < T; ++t) {
            const int8_t* codes = a.codes + l * a.level_codes + t * K + k;
            __m512i& one = acc[l][t][(2 * step) % Chains];
            __m512i& two = acc[l][t][(2 * step + 1) % Chains];
            one = dot(one, first, broadcast4(codes));
            two = dot(two, second, broadcast4(codes + 4));
          }
      }
      for (int l = 0; l < Levels; ++l)
        for (int t = 0; t < T; ++t) {
          __m512i sum = acc[l][t][0];
          for (int c = 1; c < Chains; ++c) sum = _mm512_add_epi32(sum, acc[l][t][c]);
          const int64_t at = l * a.level_blocks + t * blocks + b;
          const __m512i centred = _mm512_sub_epi32(sum, _mm512_set1_epi32(a.offsets[at]));
          total[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), _mm512_mul_ps(scale, _mm512_set1_ps(a.steps[at])),
                                     total[t]);
        }
    }
    const __m512 zero = bf16_lanes(sz + g * 2 * kRows + kRows);
    for (int t = 0; t < T; ++t) total[t] = _mm512_fmadd_ps(zero, _mm512_set1_ps(a.sums[t * groups + g]), total[t]);
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(out + t * N, total[t]);
}

template <int Levels>
void tile_dot(int tile, const uint8_t* w, const uint16_t* sz, const Tile& a, int64_t K, int64_t group, int64_t N,
              float* out) {
  switch (tile) {
    case 1: return block_dot<1, Levels>(w, sz, a, K, group, N, out);
    case 2: return block_dot<2, Levels>(w, sz, a, K, group, N, out);
    case 3: return block_dot<3, Levels>(w, sz, a, K, group, N, out);
    case 4: return block_dot<4, Levels>(w, sz, a, K, group, N, out);
    case 5: return block_dot<5, Levels>(w, sz, a, K, group, N, out);
    case 6: return block_dot<6, Levels>(w, sz, a, K, group, N, out);
    case 7: return block_dot<7, Levels>(w, sz, a, K, group, N, out);
    default: return block_dot<8, Levels>(w, sz, a, K, group, N, out);
  }
}

#endif

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales_zeros,
                       int64_t group) {
  TORCH_CHECK(available(), "this build of the int4 kernel has no AVX-512 code");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && scales_zeros.dim() == 4,
              "x [M, K], weight [N, K / 2], scales_zeros [N / 16, K / group, 2, 16]");
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous(), "weight: contiguous uint8");
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.is_contiguous(),
              "scales_zeros: contiguous bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(group % kBlock == 0 && K % group == 0, "the group size must be a multiple of ", kBlock,
              " that divides the input width");
  TORCH_CHECK(N % kRows == 0 && weight.size(1) * 2 == K, "shapes differ: x ", x.sizes(), ", weight ", weight.sizes());
  TORCH_CHECK(scales_zeros.size(0) * kRows == N && scales_zeros.size(1) == K / group && scales_zeros.size(2) == 2 &&
              scales_zeros.size(3) == kRows, "scales_zeros ", scales_zeros.sizes(), " do not fit weight ", weight.sizes());
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
#if QWEN2AUDIO_HAVE_INT4
  const Activations acts(x, group, x.scalar_type() == at::kFloat ? 2 : 1);
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const auto* sz = reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr<at::BFloat16>());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N / kRows, 1, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      for (int64_t m = 0; m < M; m += kTile) {
        const int tile = static_cast<int>(std::min<int64_t>(kTile, M - m));
        const Tile a{acts.codes.data_ptr<int8_t>() + m * K, acts.steps.data_ptr<float>() + m * (K / kBlock),
                     acts.offsets.data_ptr<int32_t>() + m * (K / kBlock), acts.sums.data_ptr<float>() + m * (K / group),
                     M * K, M * (K / kBlock)};
        const uint8_t* wb = w + block * kRows * K / 2;
        const uint16_t* szb = sz + block * (K / group) * 2 * kRows;
        float* ob = o + m * N + block * kRows;
        if (acts.levels == 2) tile_dot<2>(tile, wb, szb, a, K, group, N, ob);
        else tile_dot<1>(tile, wb, szb, a, K, group, N, ob);
      }
    }
  });
#endif
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen2audio_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor weight, Tensor scales_zeros, int group) -> Tensor");
  m.def("int4_available() -> bool", &available);
}

TORCH_LIBRARY_IMPL(qwen2audio_cpu, CPU, m) { m.impl("int4_linear", int4_linear); }
