// Products of float32 rows with int4 / int8 weights for a few rows at a time (decoding), in the manner of
// llama.cpp's Q4_1 x Q8_1: the rows are rounded to int8 in blocks of 32 (one float scale per block), and every
// block of weights is multiplied with every row as integers, the weight block loaded once for all rows.
//
// Weights (quant.py lays them out):
//   int4: codes (N, Kp / 2) uint8, Kp = K rounded up to 64. Bytes 32 p .. 32 p + 31 hold the blocks 2 p (low
//         nibbles) and 2 p + 1 (high nibbles); scales and zeros (N, Kp / 64, 4) bfloat16, per pair p the scales
//         of its two blocks then their zeros: w = scale (u - 8) + zero.
//   int8: codes (N, Kp) int8, scale (N,) float32: w = scale * code.
// Rows: x (M, K) float32 -> int8 codes q (M, Kp) with, per block b, scale s_b = max |x| / 127:
//   y[m, n] = sum_b s_b (sum_j q_j * wcode_j) * wscale_b + [int4] (zero_b - 8 scale_b) s_b sum_j q_j.
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

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One activation row, rounded to int8 in blocks of 32 (zero past K, up to Kp).
struct Rows {
  int64_t M, K, Kp;
  const int8_t* q;    // (M, Kp)
  const float* s;     // (M, Kp / 32): block scales
  const float* sq;    // (M, Kp / 32): s_b * sum_j q_j (for the int4 zero term)
  const float* lane;  // (M, Kp / 64, 16): s of the pair's two blocks, each over 8 lanes (the AVX-512 layout)
  const float* lane_sq;  // (M, Kp / 64, 16): sq of block 2p in lane 0 and of block 2p + 1 in lane 8, else 0
};

struct Weights {
  int bits;             // 4 or 8
  int64_t N, Kp;
  const uint8_t* codes;  // int4: (N, Kp / 2); int8: (N, Kp) int8
  const uint16_t* sz;     // int4: (N, Kp / 64, 4) bfloat16
  const float* row_scale;  // int8: (N,)
};

// ---- plain C++ ----
inline void rows_scalar(const Rows& r, const Weights& w, int64_t n0, int64_t n1, int64_t m0, int mb, float* y) {
  const int64_t G = w.Kp / BLOCK;
  for (int64_t n = n0; n < n1; ++n)
  for (int i = 0; i < mb; ++i) {
    const int8_t* q = r.q + (m0 + i) * r.Kp;
    float acc = 0;
    for (int64_t b = 0; b < G; ++b) {
      int32_t dot = 0;
      if (w.bits == 4) {
        const uint8_t* c = w.codes + n * (w.Kp / 2) + (b / 2) * 32;
        const int shift = (b % 2) * 4;
        for (int64_t j = 0; j < BLOCK; ++j) dot += ((c[j] >> shift) & 15) * q[b * BLOCK + j];
        const uint16_t* pz = w.sz + (n * G / 2 + b / 2) * 4;
        const float sc = bf16_to_float(pz[b % 2]), zero = bf16_to_float(pz[2 + b % 2]);
        acc += static_cast<float>(dot) * (sc * r.s[(m0 + i) * G + b]);
        acc += (zero - 8 * sc) * r.sq[(m0 + i) * G + b];
      } else {
        const int8_t* c = reinterpret_cast<const int8_t*>(w.codes) + n * w.Kp + b * BLOCK;
        for (int64_t j = 0; j < BLOCK; ++j) dot += c[j] * q[b * BLOCK + j];
        acc += static_cast<float>(dot) * r.s[(m0 + i) * G + b];
      }
    }
    y[(m0 + i) * w.N + n] = w.bits == 4 ? acc : acc * w.row_scale[n];
  }
}

// ---- AVX2: one block of 32 per step ----
template <int MB>
__attribute__((target("avx2,fma"))) void rows_avx2(const Rows& r, const Weights& w, int64_t n0, int64_t n1,
                                                   int64_t m0, float* y) {
  const int64_t G = w.Kp / BLOCK;
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
  for (int64_t n = n0; n < n1; ++n) {
  __m256 acc[MB];
  float zacc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_ps(), zacc[i] = 0;
  for (int64_t b = 0; b < G; ++b) {
    __m256i u;  // unsigned first operand of vpmaddubsw
    __m256i sign = _mm256_setzero_si256();
    float wscale = 1, wzero = 0;
    if (w.bits == 4) {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + n * (w.Kp / 2) + (b / 2) * 32));
      u = (b % 2) ? _mm256_and_si256(_mm256_srli_epi16(c, 4), low) : _mm256_and_si256(c, low);
      const uint16_t* pz = w.sz + (n * G / 2 + b / 2) * 4;
      wscale = bf16_to_float(pz[b % 2]);
      wzero = bf16_to_float(pz[2 + b % 2]) - 8 * wscale;
    } else {
      sign = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + n * w.Kp + b * BLOCK));
      u = _mm256_abs_epi8(sign);
    }
    for (int i = 0; i < MB; ++i) {
      __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.q + (m0 + i) * r.Kp + b * BLOCK));
      if (w.bits == 8) x = _mm256_sign_epi8(x, sign);
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones);  // 8 sums of 4
      const float s = r.s[(m0 + i) * G + b];
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(wscale * s), acc[i]);
      if (w.bits == 4) zacc[i] += wzero * r.sq[(m0 + i) * G + b];
    }
  }
  for (int i = 0; i < MB; ++i) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    const float total = _mm_cvtss_f32(h) + zacc[i];
    y[(m0 + i) * w.N + n] = w.bits == 4 ? total : total * w.row_scale[n];
  }
  }
}

// ---- AVX-512 VNNI: two blocks (64 codes) per step ----
// Each row keeps three accumulators (even pairs, odd pairs, the zero term) so that consecutive fused multiply-adds
// do not wait on each other.
template <int MB, int BITS>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma"))) void rows_avx512(
    const Rows& r, const Weights& w, int64_t n0, int64_t n1, int64_t m0, float* y) {
  const int64_t P = w.Kp / 64;
  const __m256i low = _mm256_set1_epi8(15);
  const __m512i first = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);  // lanes 0-7: block 2p
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(2));
  for (int64_t n = n0; n < n1; ++n) {
  __m512 acc[MB][3];
  for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = acc[i][2] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512i u;
    __mmask64 neg = 0;
    __m512 wl = _mm512_set1_ps(1), zl = _mm512_setzero_ps();
    if constexpr (BITS == 4) {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + n * (w.Kp / 2) + p * 32));
      u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(c, low)),
                             _mm256_and_si256(_mm256_srli_epi16(c, 4), low), 1);
      // [s0, s1, z0, z1] bfloat16 -> float32, spread over the lanes of each block
      const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.sz + (n * P + p) * 4));
      const __m512 sz = _mm512_castps128_ps512(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
      wl = _mm512_permutexvar_ps(first, sz);
      zl = _mm512_fmadd_ps(wl, _mm512_set1_ps(-8), _mm512_permutexvar_ps(second, sz));
    } else {
      const __m512i c = _mm512_loadu_si512(w.codes + n * w.Kp + p * 64);
      u = _mm512_abs_epi8(c);
      neg = _mm512_movepi8_mask(c);
    }
    for (int i = 0; i < MB; ++i) {
      __m512i x = _mm512_loadu_si512(r.q + (m0 + i) * r.Kp + p * 64);
      if constexpr (BITS == 8) x = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, x);  // 16 sums of 4
      const __m512 s = _mm512_loadu_ps(r.lane + ((m0 + i) * P + p) * 16);
      const __m512 scale = BITS == 4 ? _mm512_mul_ps(wl, s) : s;
      acc[i][p & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i][p & 1]);
      if constexpr (BITS == 4)
        acc[i][2] = _mm512_fmadd_ps(zl, _mm512_loadu_ps(r.lane_sq + ((m0 + i) * P + p) * 16), acc[i][2]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    const float total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), acc[i][2]));
    y[(m0 + i) * w.N + n] = BITS == 4 ? total : total * w.row_scale[n];
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
