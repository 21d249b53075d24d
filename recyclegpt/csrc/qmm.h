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
// Each row keeps two accumulators (even pairs, odd pairs) so that consecutive fused multiply-adds do not wait on
// each other. Weight rows go one after another: a decode step streams its weights from memory, and reading four
// rows side by side (their sums reduced together, faster with the weights in cache) made a SmolLM2 step 30 % slower.
template <int MB, int BITS>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma"))) void rows_avx512(
    const Rows& r, const Weights& w, int64_t n0, int64_t n1, int64_t m0, float* y) {
  const int64_t P = w.Kp / 64;
  const __m256i low = _mm256_set1_epi8(15);
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MB][2];
    for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; ++p) {
      __m512i u;
      __mmask64 neg = 0;
      __m512 wl;  // the weights' scale in each lane
      if constexpr (BITS == 4) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + n * (w.Kp / 2) + p * 32));
        u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(c, low)),
                               _mm256_and_si256(_mm256_srli_epi16(c, 4), low), 1);
        const __m512i b = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(w.sz + n * 4 * P + 2 * p));
        wl = _mm512_castsi512_ps(_mm512_mask_blend_epi32(  // s0 s1 s0 s1 ...: lane l sums block l % 2
            0xAAAA, _mm512_slli_epi32(b, 16), _mm512_and_si512(b, _mm512_set1_epi32(-65536))));
      } else {
        const __m512i c = _mm512_loadu_si512(w.codes + n * w.Kp + p * 64);
        u = _mm512_abs_epi8(c);
        neg = _mm512_movepi8_mask(c);
        const __m512i b = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(w.sz + n * 2 * P + 2 * p));
        wl = _mm512_castsi512_ps(_mm512_mask_blend_epi32(  // lanes 0-7 sum block 2p, 8-15 block 2p + 1
            0xFF00, _mm512_slli_epi32(b, 16), _mm512_and_si512(b, _mm512_set1_epi32(-65536))));
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
    for (int i = 0; i < MB; ++i) {
      const float total = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
      if constexpr (BITS == 4) {
        const uint16_t* sz = w.sz + n * 4 * P;
        y[(m0 + i) * w.N + n] = total + offsets(sz, sz + 2 * P, r.sq + (m0 + i) * 2 * P, 2 * P);
      } else {
        y[(m0 + i) * w.N + n] = total;
      }
    }
  }
}

enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

inline int best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
  return SCALAR;
}

using Kernel = void (*)(const Rows&, const Weights&, int64_t, int64_t, int64_t, float*);
constexpr Kernel AVX512_INT4[] = {rows_avx512<1, 4>, rows_avx512<2, 4>, rows_avx512<3, 4>, rows_avx512<4, 4>};
constexpr Kernel AVX512_INT8[] = {rows_avx512<1, 8>, rows_avx512<2, 8>, rows_avx512<3, 8>, rows_avx512<4, 8>};
constexpr Kernel AVX2_ANY[] = {rows_avx2<1>, rows_avx2<2>, rows_avx2<3>, rows_avx2<4>};

// The outputs y[m, n] (y (M, N), row-major) of weight rows n0 .. n1 - 1 for rows m0 .. m0 + mb - 1 (1 <= mb <= 4).
inline void rows(int isa, const Rows& r, const Weights& w, int64_t n0, int64_t n1, int64_t m0, int mb, float* y) {
  if (isa == AVX512) return (w.bits == 4 ? AVX512_INT4 : AVX512_INT8)[mb - 1](r, w, n0, n1, m0, y);
  if (isa == AVX2) return AVX2_ANY[mb - 1](r, w, n0, n1, m0, y);
  rows_scalar(r, w, n0, n1, m0, mb, y);
}

}  // namespace qmm
