// genforge's weight-only quantized products: y = x W^T + b with W read from its packed bytes.
//
// Decoding a token multiplies one activation row by every weight, so its speed is how fast the
// weight bytes stream from memory. These kernels read INT8 codes (1 byte a weight) or 4-bit
// codes (half a byte) and turn them into fp32 in registers, next to the fp32 multiply-adds:
// no fp32 copy of the weight is ever written. Activations stay fp32 and so do the sums
// (weight-only quantization: the result is x times the dequantized weight, up to summation order).
//
// - int8_linear: W[n, k] = codes[n, k] * scale[n] (symmetric, per output row). Sixteen codes
//   are sign-extended and converted to fp32 per step; the row's scale is applied once at the end.
// - lut4_linear: W[n, k] = (levels[code] - offset[n, g]) * scale[n, g] over groups g of
//   `group_size` columns: INT4 (levels 0..15, offset the zero point) and NF4 (levels the NF4
//   table, offset 0). Each group's 16 weight values are one 16-float table, and a vector
//   permute (vpermps) turns 16 codes into 16 weights in one instruction. Two codes share a byte;
//   rather than re-interleave the codes, x is de-interleaved once per call into blocks of 32
//   columns (the columns of the low nibbles, then those of the high nibbles).
//
// Rows of x are taken several at a time (up to 8) per pass over a tile of weight rows, so a
// batch converts each weight once. Output rows are split over threads with at::parallel_for.
// The AVX-512 and AVX2 paths are compiled with target attributes and chosen at run time (`isa`:
// 0 the best this CPU has, 1 portable C++, 2 AVX2, 3 AVX-512), so one build serves any x86 CPU.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GF_X86 1
#endif

namespace {

enum Isa : int64_t { kAuto = 0, kPortable = 1, kAvx2 = 2, kAvx512 = 3 };

bool cpu_has(Isa isa) {
#ifdef GF_X86
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#endif
  return isa == kPortable;
}

Isa resolve_isa(int64_t requested) {
  if (requested == kAuto) {
    if (cpu_has(kAvx512)) return kAvx512;
    if (cpu_has(kAvx2)) return kAvx2;
    return kPortable;
  }
  TORCH_CHECK(requested >= kPortable && requested <= kAvx512, "isa must be 0 (auto), 1, 2 or 3; got ", requested);
  TORCH_CHECK(cpu_has(static_cast<Isa>(requested)), "this CPU lacks the instruction set requested (isa=", requested,
              ")");
  return static_cast<Isa>(requested);
}

// Weights are read as one stream, tile after tile (a tile's rows are adjacent), and each step
// asks for the bytes this far ahead: the hardware prefetcher alone leaves a one-row product
// waiting on memory (measured: INT8 streamed at under half fp32's bytes per second without it).
#ifndef GF_PREFETCH_BYTES
#define GF_PREFETCH_BYTES 4096
#endif

// What every kernel reads: x (rows x K, fp32), the output (rows x N) and the optional bias.
struct Problem {
  const float* x;
  int64_t rows;
  int64_t K;
  int64_t N;
  float* out;
  const float* bias;
};

// ---------------------------------------------------------------- INT8, one scale per row

struct Int8Weight {
  const int8_t* codes;
  const float* scale;
};

void int8_portable(const Problem& p, const Int8Weight& w, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* c = w.codes + n * p.K;
    for (int64_t m = 0; m < p.rows; ++m) {
      const float* xm = p.x + m * p.K;
      float sum = 0.f;
      for (int64_t k = 0; k < p.K; ++k) sum += static_cast<float>(c[k]) * xm[k];
      p.out[m * p.N + n] = sum * w.scale[n] + (p.bias ? p.bias[n] : 0.f);
    }
  }
}

#ifdef GF_X86
// MR rows of x times NR weight rows starting at n: MR x NR accumulators of 16 lanes.
template <int MR, int NR>
__attribute__((target("avx512f,avx512bw"))) void int8_tile_avx512(const Problem& p, const Int8Weight& w, int64_t m0,
                                                                   int64_t n) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t K = p.K, body = K - K % 16;
  const char* stream = reinterpret_cast<const char*>(w.codes + n * K) + GF_PREFETCH_BYTES;
  for (int64_t k = 0; k < body; k += 16) {
    _mm_prefetch(stream + k * NR, _MM_HINT_T0);
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j)
      wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w.codes + (n + j) * K + k))));
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(p.x + (m0 + i) * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    const float* xm = p.x + (m0 + i) * K;
    for (int j = 0; j < NR; ++j) {
      const int8_t* c = w.codes + (n + j) * K;
      float sum = _mm512_reduce_add_ps(acc[i][j]);
      for (int64_t k = body; k < K; ++k) sum += static_cast<float>(c[k]) * xm[k];
      p.out[(m0 + i) * p.N + n + j] = sum * w.scale[n + j] + (p.bias ? p.bias[n + j] : 0.f);
    }
  }
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MR, int NR>
__attribute__((target("avx2,fma"))) void int8_tile_avx2(const Problem& p, const Int8Weight& w, int64_t m0, int64_t n) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t K = p.K, body = K - K % 8;
  const char* stream = reinterpret_cast<const char*>(w.codes + n * K) + GF_PREFETCH_BYTES;
  for (int64_t k = 0; k < body; k += 8) {
    if (k % 16 == 0) _mm_prefetch(stream + k * NR, _MM_HINT_T0);
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j)
      wv[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w.codes + (n + j) * K + k))));
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(p.x + (m0 + i) * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(wv[j], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    const float* xm = p.x + (m0 + i) * K;
    for (int j = 0; j < NR; ++j) {
      const int8_t* c = w.codes + (n + j) * K;
      float sum = hsum256(acc[i][j]);
      for (int64_t k = body; k < K; ++k) sum += static_cast<float>(c[k]) * xm[k];
      p.out[(m0 + i) * p.N + n + j] = sum * w.scale[n + j] + (p.bias ? p.bias[n + j] : 0.f);
    }
  }
}
#endif

// ---------------------------------------------------------------- 4-bit codes through a table

struct Lut4Weight {
  const uint8_t* packed;  // N x K/2, column 2j in the low nibble of byte j, 2j + 1 in the high
  const float* levels;    // 16 values a code stands for before its group's offset and scale
  const float* scales;    // N x K/group_size
  const uint8_t* zeros;   // N x K/group_size offsets, or null for none
  int64_t group_size;     // a multiple of 32
};

// x de-interleaved per block of 32 columns: the 16 columns the low nibbles hold, then the 16 of
// the high nibbles. For INT4 (low = even column) that is x[0::2] then x[1::2]; with
// `high_nibble_first` (NF4's order) the odd columns come first.
std::vector<float> deinterleave(const Problem& p, bool high_nibble_first) {
  std::vector<float> xp(p.rows * p.K);
  const int low = high_nibble_first ? 1 : 0;
  for (int64_t m = 0; m < p.rows; ++m)
    for (int64_t b = 0; b < p.K; b += 32) {
      const float* src = p.x + m * p.K + b;
      float* dst = xp.data() + m * p.K + b;
      for (int j = 0; j < 16; ++j) {
        dst[j] = src[2 * j + low];
        dst[16 + j] = src[2 * j + 1 - low];
      }
    }
  return xp;
}

void lut4_portable(const Problem& p, const Lut4Weight& w, int64_t n0, int64_t n1) {
  const int64_t groups = p.K / w.group_size;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < p.rows; ++m) {
      const float* xm = p.x + m * p.K;  // de-interleaved
      float sum = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float table[16];
        const float offset = w.zeros ? static_cast<float>(w.zeros[n * groups + g]) : 0.f;
        for (int c = 0; c < 16; ++c) table[c] = (w.levels[c] - offset) * w.scales[n * groups + g];
        for (int64_t b = g * w.group_size; b < (g + 1) * w.group_size; b += 32) {
          const uint8_t* bytes = w.packed + n * (p.K / 2) + b / 2;
          for (int j = 0; j < 16; ++j) sum += table[bytes[j] & 15] * xm[b + j] + table[bytes[j] >> 4] * xm[b + 16 + j];
        }
      }
      p.out[m * p.N + n] = sum + (p.bias ? p.bias[n] : 0.f);
    }
  }
}

#ifdef GF_X86
template <int MR, int NR>
__attribute__((target("avx512f,avx512bw"))) void lut4_tile_avx512(const Problem& p, const Lut4Weight& w, int64_t m0,
                                                                   int64_t n) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512 levels = _mm512_loadu_ps(w.levels);
  const int64_t K = p.K, groups = K / w.group_size;
  const char* stream = reinterpret_cast<const char*>(w.packed + n * (K / 2)) + GF_PREFETCH_BYTES;
  for (int64_t g = 0; g < groups; ++g) {
    // The group's 16 weight values, (level - offset) * scale: the same fp32 operations as the
    // dequantized weight, so each weight is equal to it bit for bit.
    __m512 table[NR];
    for (int j = 0; j < NR; ++j) {
      const int64_t at = (n + j) * groups + g;
      const float offset = w.zeros ? static_cast<float>(w.zeros[at]) : 0.f;
      table[j] = _mm512_mul_ps(_mm512_sub_ps(levels, _mm512_set1_ps(offset)), _mm512_set1_ps(w.scales[at]));
    }
    for (int64_t b = g * w.group_size; b < (g + 1) * w.group_size; b += 32) {
      _mm_prefetch(stream + b / 2 * NR, _MM_HINT_T0);
      __m512 low[NR], high[NR];
      for (int j = 0; j < NR; ++j) {
        // vpermps reads the low 4 bits of each index, so the low nibble needs no mask.
        const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w.packed + (n + j) * (K / 2) + b / 2)));
        low[j] = _mm512_permutexvar_ps(codes, table[j]);
        high[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table[j]);
      }
      for (int i = 0; i < MR; ++i) {
        const __m512 x_low = _mm512_loadu_ps(p.x + (m0 + i) * K + b);
        const __m512 x_high = _mm512_loadu_ps(p.x + (m0 + i) * K + b + 16);
        for (int j = 0; j < NR; ++j) {
          acc[i][j] = _mm512_fmadd_ps(low[j], x_low, acc[i][j]);
          acc[i][j] = _mm512_fmadd_ps(high[j], x_high, acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      p.out[(m0 + i) * p.N + n + j] = _mm512_reduce_add_ps(acc[i][j]) + (p.bias ? p.bias[n + j] : 0.f);
}

// AVX2 permutes 8 floats (3-bit indices): a 16-entry table is two registers, and bit 3 of the
// code picks between the two lookups.
__attribute__((target("avx2,fma"))) inline __m256 lookup16(__m256i codes, __m256 table_low, __m256 table_high) {
  const __m256 from_low = _mm256_permutevar8x32_ps(table_low, codes);
  const __m256 from_high = _mm256_permutevar8x32_ps(table_high, codes);
  return _mm256_blendv_ps(from_low, from_high, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}

template <int MR, int NR>
__attribute__((target("avx2,fma"))) void lut4_tile_avx2(const Problem& p, const Lut4Weight& w, int64_t m0, int64_t n) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const __m256 levels_low = _mm256_loadu_ps(w.levels), levels_high = _mm256_loadu_ps(w.levels + 8);
  const int64_t K = p.K, groups = K / w.group_size;
  const char* stream = reinterpret_cast<const char*>(w.packed + n * (K / 2)) + GF_PREFETCH_BYTES;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 table_low[NR], table_high[NR];
    for (int j = 0; j < NR; ++j) {
      const int64_t at = (n + j) * groups + g;
      const __m256 offset = _mm256_set1_ps(w.zeros ? static_cast<float>(w.zeros[at]) : 0.f);
      const __m256 scale = _mm256_set1_ps(w.scales[at]);
      table_low[j] = _mm256_mul_ps(_mm256_sub_ps(levels_low, offset), scale);
      table_high[j] = _mm256_mul_ps(_mm256_sub_ps(levels_high, offset), scale);
    }
    // Eight bytes hold 8 low-nibble columns and 8 high-nibble ones; a block of 32 columns is
    // two such halves.
    for (int64_t b = g * w.group_size; b < (g + 1) * w.group_size; b += 16) {
      if (b % 32 == 0) _mm_prefetch(stream + b / 2 * NR, _MM_HINT_T0);
      const int64_t half = b % 32 / 2;  // 0 or 8: where this half's columns sit in the block
      const int64_t block = b - b % 32;
      __m256 low[NR], high[NR];
      for (int j = 0; j < NR; ++j) {
        const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(w.packed + (n + j) * (K / 2) + b / 2)));
        low[j] = lookup16(codes, table_low[j], table_high[j]);
        high[j] = lookup16(_mm256_srli_epi32(codes, 4), table_low[j], table_high[j]);
      }
      for (int i = 0; i < MR; ++i) {
        const __m256 x_low = _mm256_loadu_ps(p.x + (m0 + i) * K + block + half);
        const __m256 x_high = _mm256_loadu_ps(p.x + (m0 + i) * K + block + 16 + half);
        for (int j = 0; j < NR; ++j) {
          acc[i][j] = _mm256_fmadd_ps(low[j], x_low, acc[i][j]);
          acc[i][j] = _mm256_fmadd_ps(high[j], x_high, acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) p.out[(m0 + i) * p.N + n + j] = hsum256(acc[i][j]) + (p.bias ? p.bias[n + j] : 0.f);
}
#endif

// ---------------------------------------------------------------- tiling and threads

// Runs Tile<MR, NR> over output rows [n0, n1) and every row of x: x rows in chunks of 8, 4, 2, 1
// (each chunk converts a weight once for all its rows), weight rows NR at a time, the rest
// one at a time. NR is the main tile's row count; MR=8 is used only where registers allow.
template <typename Weight, template <int, int> class Tile, int NR, bool Wide>
void run_tiles(const Problem& p, const Weight& w, int64_t n0, int64_t n1) {
  const int64_t main_end = n0 + (n1 - n0) / NR * NR;
  for (int64_t n = n0; n < n1;) {
    const bool full = n < main_end;
    int64_t m = 0;
    if (full) {
      if (Wide)
        for (; m + 8 <= p.rows; m += 8) Tile<8, (NR > 2 ? 2 : NR)>::run(p, w, m, n, NR);
      for (; m + 4 <= p.rows; m += 4) Tile<4, (NR > 2 ? 2 : NR)>::run(p, w, m, n, NR);
      for (; m + 2 <= p.rows; m += 2) Tile<2, NR>::run(p, w, m, n, NR);
      for (; m < p.rows; ++m) Tile<1, NR>::run(p, w, m, n, NR);
      n += NR;
    } else {
      for (; m + 4 <= p.rows; m += 4) Tile<4, 1>::run(p, w, m, n, 1);
      for (; m < p.rows; ++m) Tile<1, 1>::run(p, w, m, n, 1);
      n += 1;
    }
  }
}

// A tile of MR x rows and `count` weight rows (a multiple of NR) starting at n.
#ifdef GF_X86
template <int MR, int NR>
struct Int8Avx512 {
  static void run(const Problem& p, const Int8Weight& w, int64_t m, int64_t n, int64_t count) {
    for (int64_t j = 0; j < count; j += NR) int8_tile_avx512<MR, NR>(p, w, m, n + j);
  }
};
template <int MR, int NR>
struct Int8Avx2 {
  static void run(const Problem& p, const Int8Weight& w, int64_t m, int64_t n, int64_t count) {
    for (int64_t j = 0; j < count; j += NR) int8_tile_avx2<MR, NR>(p, w, m, n + j);
  }
};
template <int MR, int NR>
struct Lut4Avx512 {
  static void run(const Problem& p, const Lut4Weight& w, int64_t m, int64_t n, int64_t count) {
    for (int64_t j = 0; j < count; j += NR) lut4_tile_avx512<MR, NR>(p, w, m, n + j);
  }
};
template <int MR, int NR>
struct Lut4Avx2 {
  static void run(const Problem& p, const Lut4Weight& w, int64_t m, int64_t n, int64_t count) {
    for (int64_t j = 0; j < count; j += NR) lut4_tile_avx2<MR, NR>(p, w, m, n + j);
  }
};
#endif

// Output rows per task: at least ~64K weights each, so that a small layer runs on one thread
// (a parallel region costs microseconds) and a large one is split evenly.
int64_t grain_rows(int64_t K, int64_t bytes_per_weight_x2) {
  return std::max<int64_t>(16, (int64_t{1} << 17) / std::max<int64_t>(1, K * bytes_per_weight_x2 / 2));
}

Problem problem_of(const at::Tensor& x, const at::Tensor& out, const std::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(0) == x.size(0) &&
                  out.size(1) == N,
              "out must be a contiguous float32 tensor of shape (rows, out_features)");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias must be a contiguous float32 tensor of out_features values");
    bias_ptr = bias->data_ptr<float>();
  }
  return Problem{x.data_ptr<float>(), x.size(0), x.size(1), N, out.data_ptr<float>(), bias_ptr};
}

void int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                 const std::optional<at::Tensor>& bias, at::Tensor& out, int64_t isa) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(),
              "codes must be a contiguous int8 (out_features, in_features) tensor");
  TORCH_CHECK(x.size(1) == codes.size(1), "x has ", x.size(1), " columns, the weight ", codes.size(1));
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == codes.size(0),
              "scale must hold one float32 per output row");
  const int64_t N = codes.size(0);
  const Problem p = problem_of(x, out, bias, N);
  const Int8Weight w{codes.data_ptr<int8_t>(), scale.data_ptr<float>()};
  const Isa chosen = resolve_isa(isa);
  at::parallel_for(0, N, grain_rows(p.K, 2), [&](int64_t n0, int64_t n1) {
#ifdef GF_X86
    if (chosen == kAvx512) return run_tiles<Int8Weight, Int8Avx512, 4, true>(p, w, n0, n1);
    if (chosen == kAvx2) return run_tiles<Int8Weight, Int8Avx2, 2, false>(p, w, n0, n1);
#endif
    int8_portable(p, w, n0, n1);
  });
}

void lut4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& levels, const at::Tensor& scales,
                 const std::optional<at::Tensor>& zeros, int64_t group_size, bool high_nibble_first,
                 const std::optional<at::Tensor>& bias, at::Tensor& out, int64_t isa) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be a contiguous uint8 (out_features, in_features / 2) tensor");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "group_size must be a multiple of 32 that divides in_features; got ", group_size);
  const int64_t groups = K / group_size;
  TORCH_CHECK(levels.scalar_type() == at::kFloat && levels.is_contiguous() && levels.numel() == 16,
              "levels must be 16 float32 values");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N * groups,
              "scales must hold one float32 per (row, group)");
  const uint8_t* zeros_ptr = nullptr;
  if (zeros.has_value() && zeros->defined()) {
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->is_contiguous() && zeros->numel() == N * groups,
                "zeros must hold one uint8 per (row, group)");
    zeros_ptr = zeros->data_ptr<uint8_t>();
  }
  Problem p = problem_of(x, out, bias, N);
  const std::vector<float> xp = deinterleave(p, high_nibble_first);
  p.x = xp.data();
  const Lut4Weight w{packed.data_ptr<uint8_t>(), levels.data_ptr<float>(), scales.data_ptr<float>(), zeros_ptr,
                     group_size};
  const Isa chosen = resolve_isa(isa);
  at::parallel_for(0, N, grain_rows(K, 1), [&](int64_t n0, int64_t n1) {
#ifdef GF_X86
    if (chosen == kAvx512) return run_tiles<Lut4Weight, Lut4Avx512, 4, true>(p, w, n0, n1);
    if (chosen == kAvx2) return run_tiles<Lut4Weight, Lut4Avx2, 2, false>(p, w, n0, n1);
#endif
    lut4_portable(p, w, n0, n1);
  });
}

int64_t best_isa() { return resolve_isa(kAuto); }

}  // namespace

TORCH_LIBRARY(genforge_quant, m) {
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scale, Tensor? bias, Tensor(a!) out, int isa) -> ()",
        &int8_linear);
  m.def(
      "lut4_linear(Tensor x, Tensor packed, Tensor levels, Tensor scales, Tensor? zeros, int group_size, "
      "bool high_nibble_first, Tensor? bias, Tensor(a!) out, int isa) -> ()",
      &lut4_linear);
  m.def("best_isa() -> int", &best_isa);
}
