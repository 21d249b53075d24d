// Products of float32 rows with int4 / int8 weights for a few to a few dozen rows at a time (decoding, prefill), in
// the manner of llama.cpp's Q4_1 x Q8_1: the rows are rounded to int8 in blocks of 32 (one float scale per block),
// and every block of weights is multiplied with every row as integers, the weight block loaded once for all rows.
//
// Weights (quant.py lays them out): N a multiple of 16, Kp = K rounded up to 32, G = Kp / 32 blocks of 32 inputs.
// The rows go in tiles of 16 (TILE) and a tile's weights lie block after block, the 16 outputs side by side: within
// block b, the codes of inputs 32 b + 4 g .. 32 b + 4 g + 3 (group g, 0 .. 7) of the tile's output o sit in the 4
// bytes 4 o .. 4 o + 3 of a 64-byte vector, so that one integer dot-product instruction with a row's 4 inputs of the
// group broadcast sums them for 16 outputs at once.
//   int4: a tile's block is 256 bytes, 4 vectors: vector j holds group j in its low nibbles and group j + 4 in its
//         high nibbles; w = scale * (code - 8) + zero. sz: per tile and block, 16 bfloat16 scales then 16 zeros.
//   int8: a tile's block is 512 bytes, 8 vectors (group g in vector g), each code stored + 128 (as an unsigned byte);
//         w = scale * (code - 128). sz: per tile and block, 16 bfloat16 scales.
// So codes take N Kp / 2 (int4) or N Kp (int8) bytes and sz N 2 G or N G bfloat16, as a row-major (N, Kp / 2 or Kp)
// and (N, 2 G or G) tensor would, in the order above.
// Rows: x (M, K) float32 -> int8 codes q (M, Kp) in input order, per block b the scale s_b = max |x| / 127, the
// integer sum of the block's codes times the weights' offset (8 or 128), and s_b times the sum (int4's zeros):
//   y[m, n] = sum_b fl(scale_b s_b) * (sum_j code_j q_j - offset sum_j q_j) [+ zero_b (s_b sum_j q_j) for int4],
// each block's integer sum exact, its float steps two (int4: three) roundings in block order: the same operations
// on every path, so the AVX-512 VNNI (vpdpbusd), AVX2 (vpmaddubsw) and plain C++ paths give the same bits, and a row's
// result does not depend on the rows that share the call (which keeps verified decoding exact).

#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace qmm {

constexpr int64_t BLOCK = 32;
constexpr int64_t TILE = 16;   // outputs side by side in the weights' layout
constexpr int MAX_ROWS = 8;    // input rows a kernel call takes at most (the tile's weights unpacked once for them)

inline int offset_of(int bits) { return bits == 4 ? 8 : 128; }
inline int64_t padded_k(int64_t K) { return (K + BLOCK - 1) / BLOCK * BLOCK; }
// A tile's codes of one block (256 or 512 bytes), and its bfloat16 scales (and int4's zeros) of one block.
constexpr int64_t block_bytes(int bits) { return TILE * BLOCK * bits / 8; }
constexpr int64_t sz_per_block(int bits) { return bits == 4 ? 2 * TILE : TILE; }

// Input rows rounded to int8 in blocks of 32 (zero past K, up to Kp), for weights of some bits.
struct Rows {
  int64_t M, K, Kp;
  const int8_t* q;       // (M, Kp), input order
  const float* s;        // (M, Kp / 32): block scales
  const float* sq;       // (M, Kp / 32): s_b * sum_j q_j (int4's zeros)
  const int32_t* off;    // (M, Kp / 32): the weights' offset (8 or 128) * sum_j q_j
};

struct Weights {
  int bits;  // 4 or 8
  int64_t N, Kp;
  const uint8_t* codes;     // the layout above
  const uint16_t* sz;       // bfloat16 scales (and zeros), the layout above

  int64_t blocks() const { return Kp / BLOCK; }
  const uint8_t* tile_codes(int64_t t) const { return codes + t * blocks() * block_bytes(bits); }
  const uint16_t* tile_sz(int64_t t) const { return sz + t * blocks() * sz_per_block(bits); }
};

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The code of input k = 32 b + 4 g + i for output o of a tile whose codes start at c (the plain C++ path).
inline int code_at(const Weights& w, const uint8_t* c, int64_t b, int g, int o, int i) {
  if (w.bits == 8) return c[b * block_bytes(8) + g * 64 + 4 * o + i];
  const uint8_t byte = c[b * block_bytes(4) + (g % 4) * 64 + 4 * o + i];
  return g < 4 ? byte & 15 : byte >> 4;
}

// ---- plain C++ ----
inline void rows_scalar(const Rows& r, const Weights& w, int64_t t, int64_t m0, int mb, float* y) {
  const int64_t G = w.blocks(), per = sz_per_block(w.bits);
  const uint8_t* c = w.tile_codes(t);
  const uint16_t* sz = w.tile_sz(t);
  for (int i = 0; i < mb; ++i) {
    const int64_t m = m0 + i;
    for (int o = 0; o < TILE; ++o) {
      float acc = 0;
      for (int64_t b = 0; b < G; ++b) {
        int32_t dot = 0;
        for (int g = 0; g < 8; ++g)
          for (int j = 0; j < 4; ++j) dot += code_at(w, c, b, g, o, j) * r.q[m * r.Kp + b * BLOCK + 4 * g + j];
        dot -= r.off[m * G + b];
        const float scale = bf16_to_float(sz[b * per + o]) * r.s[m * G + b];
        acc = std::fma(static_cast<float>(dot), scale, acc);
        if (w.bits == 4) acc = std::fma(bf16_to_float(sz[b * per + TILE + o]), r.sq[m * G + b], acc);
      }
      y[m * w.N + t * TILE + o] = acc;
    }
  }
}

// ---- AVX2: a tile as two halves of 8 outputs ----
template <int MB>
__attribute__((target("avx2,fma"))) void rows_avx2(const Rows& r, const Weights& w, int64_t t, int64_t m0, float* y) {
  const int64_t G = w.blocks(), per = sz_per_block(w.bits), bytes = block_bytes(w.bits);
  const uint8_t* c = w.tile_codes(t);
  const uint16_t* sz = w.tile_sz(t);
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15), flip = _mm256_set1_epi8(-128);
  for (int h = 0; h < 2; ++h) {
    __m256 acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < G; ++b) {
      __m256i u[8];  // the 8 groups' codes: unsigned for int4; int8's magnitudes (their signs in s8)
      __m256i s8[8];
      if (w.bits == 4) {
        for (int j = 0; j < 4; ++j) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b * bytes + j * 64 + h * 32));
          u[j] = _mm256_and_si256(v, low);
          u[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
      } else {
        for (int g = 0; g < 8; ++g) {
          s8[g] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b * bytes + g * 64 + h * 32)),
                                   flip);  // code - 128
          u[g] = _mm256_abs_epi8(s8[g]);
        }
      }
      const __m128i sv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sz + b * per + 8 * h));
      const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(sv), 16));
      __m256 zero = _mm256_setzero_ps();
      if (w.bits == 4) {
        const __m128i zv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sz + b * per + TILE + 8 * h));
        zero = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(zv), 16));
      }
      for (int i = 0; i < MB; ++i) {
        const int64_t m = m0 + i;
        const int8_t* q = r.q + m * r.Kp + b * BLOCK;
        __m256i dot = _mm256_setzero_si256();
        for (int g = 0; g < 8; ++g) {
          __m256i x = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(q + 4 * g));
          if (w.bits == 8) x = _mm256_sign_epi8(x, s8[g]);
          dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(u[g], x), ones));
        }
        if (w.bits == 4) dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(r.off[m * G + b]));  // int8: signed already
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(scale, _mm256_set1_ps(r.s[m * G + b])), acc[i]);
        if (w.bits == 4) acc[i] = _mm256_fmadd_ps(zero, _mm256_set1_ps(r.sq[m * G + b]), acc[i]);
      }
    }
    for (int i = 0; i < MB; ++i) _mm256_storeu_ps(y + (m0 + i) * w.N + t * TILE + 8 * h, acc[i]);
  }
}

// ---- AVX-512 VNNI: a tile's 16 outputs in one vector ----
// A tile's block of weights is unpacked once (8 vectors of unsigned codes, one per group) for the MB rows; each row's
// block sum takes 8 vpdpbusd with its inputs broadcast (two chains of 4), then the offsets and scales.
template <int MB, int BITS>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma"))) void rows_avx512(
    const Rows& r, const Weights& w, int64_t t, int64_t m0, float* y) {
  constexpr int64_t bytes = block_bytes(BITS), per = sz_per_block(BITS);
  const int64_t G = w.blocks();
  const uint8_t* c = w.tile_codes(t);
  const uint16_t* sz = w.tile_sz(t);
  const __m512i low = _mm512_set1_epi8(15);
  auto wide = [](const uint16_t* h) {  // 16 bfloat16 -> float32
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h))), 16));
  };
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < G; ++b) {
    __m512i u[8];
    if constexpr (BITS == 4) {
      for (int j = 0; j < 4; ++j) {
        const __m512i v = _mm512_loadu_si512(c + b * bytes + j * 64);
        u[j] = _mm512_and_si512(v, low);
        u[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    } else {
      for (int g = 0; g < 8; ++g) u[g] = _mm512_loadu_si512(c + b * bytes + g * 64);
    }
    const __m512 scale = wide(sz + b * per);
    const __m512 zero = BITS == 4 ? wide(sz + b * per + TILE) : _mm512_setzero_ps();
    for (int i = 0; i < MB; ++i) {
      const int64_t m = m0 + i;
      const int32_t* q = reinterpret_cast<const int32_t*>(r.q + m * r.Kp + b * BLOCK);
      __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[0], _mm512_set1_epi32(q[0]));
      __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[1], _mm512_set1_epi32(q[1]));
      for (int g = 2; g < 8; g += 2) {
        d0 = _mm512_dpbusd_epi32(d0, u[g], _mm512_set1_epi32(q[g]));
        d1 = _mm512_dpbusd_epi32(d1, u[g + 1], _mm512_set1_epi32(q[g + 1]));
      }
      const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(d0, d1), _mm512_set1_epi32(r.off[m * G + b]));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, _mm512_set1_ps(r.s[m * G + b])), acc[i]);
      if constexpr (BITS == 4) acc[i] = _mm512_fmadd_ps(zero, _mm512_set1_ps(r.sq[m * G + b]), acc[i]);
    }
  }
  for (int i = 0; i < MB; ++i) _mm512_storeu_ps(y + (m0 + i) * w.N + t * TILE, acc[i]);
}

// One input row x (K floats) rounded to int8 in blocks of 32 (q: Kp codes in input order, zero past K; s, sq, off:
// per block), as quant_block.cpp's quantize_rows does with plain loops: the same arithmetic (a block's largest
// magnitude / 127; x * 127 / largest rounded to nearest even), so the same bits.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) inline void quantize_row_avx512(
    const float* x, int64_t K, int bits, int8_t* q, float* s, float* sq, int32_t* off) {
  const int64_t Kp = padded_k(K);
  for (int64_t b = 0; b < Kp / BLOCK; ++b) {
    const int64_t k0 = b * BLOCK;
    __m512 v[2];
    for (int i = 0; i < 2; ++i) {
      const int64_t left = K - (k0 + 16 * i);
      const __mmask16 k = left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
      v[i] = _mm512_maskz_loadu_ps(k, x + k0 + 16 * i);
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
    const __m512 inv = _mm512_set1_ps(amax > 0 ? 127 / amax : 0);
    const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(v[0], inv)), c = _mm512_cvtps_epi32(_mm512_mul_ps(v[1], inv));
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(a, c));
    s[b] = amax / 127;
    sq[b] = s[b] * static_cast<float>(sum);
    off[b] = offset_of(bits) * sum;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0), _mm512_cvtepi32_epi8(a));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0 + 16), _mm512_cvtepi32_epi8(c));
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

using Kernel = void (*)(const Rows&, const Weights&, int64_t, int64_t, float*);
template <int BITS>
constexpr Kernel AVX512_BY_ROWS[] = {rows_avx512<1, BITS>, rows_avx512<2, BITS>, rows_avx512<3, BITS>,
                                     rows_avx512<4, BITS>, rows_avx512<5, BITS>, rows_avx512<6, BITS>,
                                     rows_avx512<7, BITS>, rows_avx512<8, BITS>};
constexpr Kernel AVX2_BY_ROWS[] = {rows_avx2<1>, rows_avx2<2>, rows_avx2<3>, rows_avx2<4>,
                                   rows_avx2<5>, rows_avx2<6>, rows_avx2<7>, rows_avx2<8>};

// The 16 outputs y[m, 16 t ..] (y (M, N), row-major) of weight tile t for rows m0 .. m0 + mb - 1 (1 <= mb <= 8).
inline void rows(int isa, const Rows& r, const Weights& w, int64_t t, int64_t m0, int mb, float* y) {
  if (isa == AVX512) return (w.bits == 4 ? AVX512_BY_ROWS<4> : AVX512_BY_ROWS<8>)[mb - 1](r, w, t, m0, y);
  if (isa == AVX2) return AVX2_BY_ROWS[mb - 1](r, w, t, m0, y);
  rows_scalar(r, w, t, m0, mb, y);
}

}  // namespace qmm
