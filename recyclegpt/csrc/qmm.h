// Products of float32 rows with int4 / int8 weights for a few rows at a time (decoding), in the manner of
// llama.cpp's Q4_1 x Q8_1: the rows are rounded to int8 in blocks of 32 (one float scale per block), and every
// block of weights is multiplied with every row as integers, the weight block loaded once for all rows.
//
// Weights (quant.py lays them out), Kp = K rounded up to 64, blocks of 32 inputs taken in pairs (2p, 2p + 1):
//   int4: codes (N, Kp / 2) uint8. Pair p holds 32 bytes; its position t (0 .. 63) is the low nibble of byte t
//         (t < 32) or the high nibble of byte t - 32, and holds code j = 4 (t / 8) + t % 4 of block 2p + (t / 4) % 2:
//         the blocks alternate every 4 positions, so a 32-bit lane of a dot product belongs to one block, the lanes
//         alternating between the two. sz (N, 2 Kp / 32) bfloat16: a row's Kp / 32 block scales, then its block
//         zeros: w = scale * (code - 8) + zero.
//   int8: codes (N, Kp) int8 in input order, sz (N, Kp / 32) bfloat16 block scales: w = scale * code (as Q8_0).
// Rows: x (M, K) float32 -> int8 codes q (M, Kp), in the int4 pair order for int4 weights and in input order for
// int8, with per block b the scale s_b = max |x| / 127:
//   y[m, n] = sum_b s_b (sum_j q_j * code_j) * wscale_b + [int4] (zero_b - 8 wscale_b) s_b sum_j q_j.
//
// Each output is computed by the same instructions whatever M is: a row's result does not depend on the rows that
// share the call, which keeps verified decoding exact. Three paths, chosen at run time by what the CPU has:
// AVX-512 VNNI (vpdpbusd), AVX2 (vpmaddubsw) and plain C++; they agree up to float rounding.

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace qmm {

constexpr int64_t BLOCK = 32;
constexpr int64_t TILE = 16;  // weight rows (outputs) a kernel call takes at most: rows_avx512 sums them together

// The block (0: 2p, 1: 2p + 1) of position t of an int4 pair, and the position of input j of a pair's block.
inline int pair_block(int t) { return (t / 4) % 2; }
inline int pair_position(int block, int j) { return 8 * (j / 4) + 4 * block + j % 4; }

// Input rows rounded to int8 in blocks of 32 (zero past K, up to Kp), for weights of ``bits`` bits.
struct Rows {
  int64_t M, K, Kp;
  const int8_t* q;       // (M, Kp), in the order the weights' codes are
  const float* s;        // (M, Kp / 32): block scales
  const float* sq;       // (M, Kp / 32): s_b * sum_j q_j (for the int4 offsets)
  const float* lane;     // (M, Kp / 64, 16): the scale of the block each 32-bit lane of a pair's dot product sums
};

struct Weights {
  int bits;  // 4 or 8
  int64_t N, Kp;
  const uint8_t* codes;     // int4: (N, Kp / 2); int8: (N, Kp) int8
  const uint16_t* sz;       // bfloat16, int4: (N, 2 Kp / 32) scales, then zeros; int8: (N, Kp / 32) scales
};

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The int4 offsets' share of an output: sum over a row's G blocks of (zero_b - 8 scale_b) * s_b sum_j q_j, in order.
inline float offsets(const uint16_t* scale, const uint16_t* zero, const float* sq, int64_t G) {
  float acc[8] = {0};
  int64_t b = 0;
  for (; b + 8 <= G; b += 8)
    for (int l = 0; l < 8; ++l) acc[l] += (bf16_to_float(zero[b + l]) - 8 * bf16_to_float(scale[b + l])) * sq[b + l];
  float total = 0;
  for (int l = 0; l < 8; ++l) total += acc[l];
  for (; b < G; ++b) total += (bf16_to_float(zero[b]) - 8 * bf16_to_float(scale[b])) * sq[b];
  return total;
}

// ---- plain C++ ----
inline void rows_scalar(const Rows& r, const Weights& w, int64_t n0, int64_t n1, int64_t m0, int mb, float* y) {
  const int64_t P = w.Kp / 64;
  for (int64_t n = n0; n < n1; ++n)
    for (int i = 0; i < mb; ++i) {
      const int64_t m = m0 + i;
      const int8_t* q = r.q + m * r.Kp;
      float acc = 0;
      for (int64_t p = 0; p < P; ++p) {
        int32_t dot[2] = {0, 0};
        if (w.bits == 4) {
          const uint8_t* c = w.codes + n * (w.Kp / 2) + p * 32;
          for (int t = 0; t < 64; ++t) dot[pair_block(t)] += (t < 32 ? c[t] & 15 : c[t - 32] >> 4) * q[p * 64 + t];
          const uint16_t* sz = w.sz + n * 4 * P;
          for (int b = 0; b < 2; ++b)
            acc += static_cast<float>(dot[b]) * (bf16_to_float(sz[2 * p + b]) * r.s[m * 2 * P + 2 * p + b]);
        } else {
          const int8_t* c = reinterpret_cast<const int8_t*>(w.codes) + n * w.Kp + p * 64;
          for (int t = 0; t < 64; ++t) dot[t / 32] += c[t] * q[p * 64 + t];
          for (int b = 0; b < 2; ++b)
            acc += static_cast<float>(dot[b]) * (bf16_to_float(w.sz[n * 2 * P + 2 * p + b]) * r.s[m * 2 * P + 2 * p + b]);
        }
      }
      y[m * w.N + n] =
          w.bits == 4 ? acc + offsets(w.sz + n * 4 * P, w.sz + n * 4 * P + 2 * P, r.sq + m * 2 * P, 2 * P) : acc;
    }
}

// ---- AVX2: a pair as two 32-byte halves ----
template <int MB>
__attribute__((target("avx2,fma"))) void rows_avx2(const Rows& r, const Weights& w, int64_t n0, int64_t n1,
                                                   int64_t m0, float* y) {
  const int64_t P = w.Kp / 64;
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MB][2];
    for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t p = 0; p < P; ++p) {
      __m256i u[2], sign[2];
      __m256 wl[2];  // the weights' scale in each lane of each half
      if (w.bits == 4) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + n * (w.Kp / 2) + p * 32));
        u[0] = _mm256_and_si256(c, low);
        u[1] = _mm256_and_si256(_mm256_srli_epi16(c, 4), low);
        // s0 s1 s0 s1 ...: lane l sums block l % 2
        const __m256i b = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(w.sz + n * 4 * P + 2 * p));
        wl[0] = wl[1] = _mm256_blend_ps(_mm256_castsi256_ps(_mm256_slli_epi32(b, 16)),  // even lanes: low bfloat16
                                        _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32(-65536))), 0xAA);
      } else {
        for (int h = 0; h < 2; ++h) {
          sign[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + n * w.Kp + p * 64 + h * 32));
          u[h] = _mm256_abs_epi8(sign[h]);
          wl[h] = _mm256_set1_ps(bf16_to_float(w.sz[n * 2 * P + 2 * p + h]));
        }
      }
      for (int i = 0; i < MB; ++i) {
        const int64_t m = m0 + i;
        const float* lane = r.lane + (m * P + p) * 16;
        for (int h = 0; h < 2; ++h) {
          __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.q + m * r.Kp + p * 64 + h * 32));
          if (w.bits == 8) x = _mm256_sign_epi8(x, sign[h]);
          const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(u[h], x), ones);  // 8 sums of 4
          acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(wl[h], _mm256_loadu_ps(lane + 8 * h)),
                                      acc[i][h]);
        }
      }
    }
    for (int i = 0; i < MB; ++i) {
      const __m256 a = _mm256_add_ps(acc[i][0], acc[i][1]);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      float total = _mm_cvtss_f32(h);
      if (w.bits == 4) total += offsets(w.sz + n * 4 * P, w.sz + n * 4 * P + 2 * P, r.sq + (m0 + i) * 2 * P, 2 * P);
      y[(m0 + i) * w.N + n] = total;
    }
  }
}

// ---- AVX-512 VNNI: a pair (64 codes) per step ----
// Out lane l of the result: the sum of v[l]'s 16 lanes, for 16 vectors at once (a transposing tree of adds). Each
// output's additions are the same fixed tree over its own vector's lanes, (l, l + 8), (l, l + 4), (l, l + 2),
// (l, l + 1), whatever the other vectors hold.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)  // halves: vector 2j's 8 partial sums, then 2j + 1's
    a[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // quarters: vectors 4j .. 4j + 3, 4 partial sums each
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xDD));
  for (int j = 0; j < 2; ++j)  // in quarter Q: vectors 8j + Q, 8j + 4 + Q, 2 partial sums each, interleaved
    c[j] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * j], b[2 * j + 1]), _mm512_unpackhi_ps(b[2 * j], b[2 * j + 1]));
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x44), _mm512_shuffle_ps(c[0], c[1], 0xEE));
  // lane 4Q + r holds vector 4r + Q
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, d);
}

// A tile of at most 16 weight rows: per output, the integer dot products of each pair are scaled into two float
// accumulators (even and odd pairs, so that consecutive fused multiply-adds do not wait on each other); int4 adds its
// offsets, per 16 blocks at once; the tile's 16 sums per input row are then reduced together (sum16). Weight rows go
// one after another: a decode step streams its weights from memory, and reading four rows side by side (faster
// with the weights in cache) made a SmolLM2 step 30 % slower.
template <int MB, int BITS>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma"))) void rows_avx512(
    const Rows& r, const Weights& w, int64_t n0, int64_t n1, int64_t m0, float* y) {
  const int64_t P = w.Kp / 64, G = 2 * P;
  const __m512i low = _mm512_set1_epi8(15);
  const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);  // high nibbles above
  // int4, from a pair's two bfloat16 scales broadcast to every 32-bit lane: lane l gets scale l % 2 as a float
  const __m512i pick = _mm512_setr_epi32(0, 0x00010000, 0, 0x00010000, 0, 0x00010000, 0, 0x00010000, 0, 0x00010000,
                                         0, 0x00010000, 0, 0x00010000, 0, 0x00010000);
  // int8: lanes 0-7 get the first scale, 8-15 the second
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0x00010000, 0x00010000, 0x00010000, 0x00010000,
                                           0x00010000, 0x00010000, 0x00010000, 0x00010000);
  __m512 sums[MB][TILE];  // sum16 reduces 16 vectors: TILE is 16
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MB][2];
    for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; ++p) {
      __m512i u;
      __mmask64 neg = 0;
      const __m512i b = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(w.sz + n * (BITS == 4 ? 2 : 1) * G + 2 * p));
      __m512 wl;  // the weights' scale in each lane
      if constexpr (BITS == 4) {
        const __m512i c = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + n * (w.Kp / 2) + p * 32)));
        u = _mm512_and_si512(_mm512_srlv_epi16(c, shift), low);
        wl = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAA, pick, b));
      } else {
        const __m512i c = _mm512_loadu_si512(w.codes + n * w.Kp + p * 64);
        u = _mm512_abs_epi8(c);
        neg = _mm512_movepi8_mask(c);
        wl = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAA, halves, b));
      }
      for (int i = 0; i < MB; ++i) {
        const int64_t m = m0 + i;
        __m512i x = _mm512_loadu_si512(r.q + m * r.Kp + p * 64);
        if constexpr (BITS == 8) x = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, x);  // 16 sums of 4
        const __m512 s = _mm512_loadu_ps(r.lane + (m * P + p) * 16);
        acc[i][p & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wl, s), acc[i][p & 1]);
      }
    }
    if constexpr (BITS == 4) {  // + (zero_b - 8 scale_b) * s_b sum_j q_j over the blocks, 16 at a time
      const uint16_t* sz = w.sz + n * 2 * G;
      for (int64_t b = 0; b < G; b += 16) {
        const __mmask16 k = G - b >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (G - b)) - 1);
        auto wide = [&](const uint16_t* h) {
          return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, h)), 16));
        };
        const __m512 off = _mm512_fnmadd_ps(_mm512_set1_ps(8), wide(sz + b), wide(sz + G + b));
        for (int i = 0; i < MB; ++i)
          acc[i][0] = _mm512_fmadd_ps(off, _mm512_maskz_loadu_ps(k, r.sq + (m0 + i) * G + b), acc[i][0]);
      }
    }
    for (int i = 0; i < MB; ++i) sums[i][n - n0] = _mm512_add_ps(acc[i][0], acc[i][1]);
  }
  for (int i = 0; i < MB; ++i) {
    for (int64_t n = n1; n < n0 + TILE; ++n) sums[i][n - n0] = _mm512_setzero_ps();
    _mm512_mask_storeu_ps(y + (m0 + i) * w.N + n0, static_cast<__mmask16>((1u << (n1 - n0)) - 1), sum16(sums[i]));
  }
}

// One input row x (K floats) rounded to int8 in blocks of 32, as quant_block.cpp's quantize_rows lays it out (q:
// Kp codes in the weights' order, s / sq: Kp / 32 block scales and scaled sums, lane: 16 per pair), with the same
// arithmetic (a block's largest magnitude / 127; x * 127 / largest rounded to nearest even), so the same bits.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) inline void quantize_row_avx512(
    const float* x, int64_t K, int bits, int8_t* q, float* s, float* sq, float* lane) {
  const int64_t Kp = (K + 63) / 64 * 64;
  // int4: the pair's 32-bit groups of 4 codes alternate between its blocks (pair_position)
  const __m512i alternate = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  for (int64_t p = 0; p < Kp / 64; ++p) {
    __m512i codes[2];
    float scale[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t k0 = p * 64 + h * 32;
      __m512 v[2];
      for (int i = 0; i < 2; ++i) {
        const int64_t left = K - (k0 + 16 * i);
        const __mmask16 k = left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
        v[i] = _mm512_maskz_loadu_ps(k, x + k0 + 16 * i);
      }
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
      const __m512 inv = _mm512_set1_ps(amax > 0 ? 127 / amax : 0);
      const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(v[0], inv)), b = _mm512_cvtps_epi32(_mm512_mul_ps(v[1], inv));
      scale[h] = amax / 127;
      s[2 * p + h] = scale[h];
      sq[2 * p + h] = scale[h] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(a, b)));
      codes[h] = _mm512_castsi256_si512(
          _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(a)), _mm512_cvtepi32_epi8(b), 1));
    }
    __m512i out;
    __m512 l;
    if (bits == 4) {
      out = _mm512_permutex2var_epi32(codes[0], alternate, codes[1]);
      l = _mm512_mask_blend_ps(0xAAAA, _mm512_set1_ps(scale[0]), _mm512_set1_ps(scale[1]));
    } else {
      out = _mm512_inserti64x4(codes[0], _mm512_castsi512_si256(codes[1]), 1);
      l = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(scale[0]), _mm512_set1_ps(scale[1]));
    }
    _mm512_storeu_si512(q + p * 64, out);
    _mm512_storeu_ps(lane + p * 16, l);
  }
}

enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

inline int detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
  return SCALAR;
}

inline int best_isa() {
  static const int isa = detect_isa();
  return isa;
}

// The path a caller's ``isa`` asks for: -1 this CPU's best, else that Isa.
inline int path_for(int64_t isa) { return isa < 0 ? best_isa() : static_cast<int>(isa); }

using Kernel = void (*)(const Rows&, const Weights&, int64_t, int64_t, int64_t, float*);
constexpr Kernel AVX512_INT4[] = {rows_avx512<1, 4>, rows_avx512<2, 4>, rows_avx512<3, 4>, rows_avx512<4, 4>};
constexpr Kernel AVX512_INT8[] = {rows_avx512<1, 8>, rows_avx512<2, 8>, rows_avx512<3, 8>, rows_avx512<4, 8>};
constexpr Kernel AVX2_ANY[] = {rows_avx2<1>, rows_avx2<2>, rows_avx2<3>, rows_avx2<4>};

// The outputs y[m, n] (y (M, N), row-major) of weight rows n0 .. n1 - 1 (n1 - n0 <= TILE) for rows m0 .. m0 + mb - 1
// (1 <= mb <= 4).
inline void rows(int isa, const Rows& r, const Weights& w, int64_t n0, int64_t n1, int64_t m0, int mb, float* y) {
  if (isa == AVX512) return (w.bits == 4 ? AVX512_INT4 : AVX512_INT8)[mb - 1](r, w, n0, n1, m0, y);
  if (isa == AVX2) return AVX2_ANY[mb - 1](r, w, n0, n1, m0, y);
  rows_scalar(r, w, n0, n1, m0, mb, y);
}

}  // namespace qmm
