// One transformer block of a weight-only quantized model over a KV cache (a prompt's prefill or a decode step), as one
// call; and the quantized products it runs (qmm.h), also offered alone (recyclegpt::qmm, what quant.py's layers call).
//
// model.Block does the same in some 60 eager tensor operations, each a few microseconds of dispatch on a small
// model, which made up half of an int4 SmolLM2 step. Here the norms, the rotary embedding, the cache writes,
// attention and the SwiGLU gate are plain loops over float32 (the cache's keys and values float32 or float16,
// converted as they are read and written), and the products are qmm.h's integer kernels.
//
// Every new token's result is that of a one-token call at its slot, whatever else shares the call: the products
// never mix rows, and attention runs one query at a time over the keys it may see, in slot order, with the same
// loops for every query. So verified decoding checks several tokens in one call and still gets the logits
// standard decoding would, bit for bit.
//
// Built by recyclegpt/kernels.py for the CPU it runs on (-march=native), loaded with torch.ops.load_library.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "qmm.h"

namespace {

using at::Half;
using at::Tensor;
constexpr int LANES = 16;  // float lanes summed apart in dot products (vectorised, same order for every row)
// A block's weights (kernels.block_args): 2 norms, (codes, scales) of its 4 products, the q/k/v bias.
constexpr int64_t BLOCK_TENSORS = 11;

// Rows x (M, K) float32 rounded to int8 in blocks of 32 for weights of ``bits`` bits (qmm.h), with what the kernels
// read beside them; the buffers are the calling thread's own, reused from call to call.
qmm::Rows quantize_rows(const float* x, int64_t M, int64_t K, int64_t bits, int path) {
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> s, sq;
  thread_local std::vector<int32_t> off;
  const int64_t Kp = qmm::padded_k(K), G = Kp / qmm::BLOCK;
  q.assign(M * Kp, 0);
  s.resize(M * G);
  sq.resize(M * G);
  off.resize(M * G);
  for (int64_t m = 0; m < M; ++m) {
    if (path == qmm::AVX512) {  // the same bits, vectorised
      qmm::quantize_row_avx512(x + m * K, K, static_cast<int>(bits), q.data() + m * Kp, s.data() + m * G,
                               sq.data() + m * G, off.data() + m * G);
      continue;
    }
    for (int64_t b = 0; b < G; ++b) {
      const int64_t k0 = b * qmm::BLOCK, k1 = std::min(K, k0 + qmm::BLOCK);
      float amax = 0;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::abs(x[m * K + k]));
      const float inv = amax > 0 ? 127 / amax : 0;
      int32_t sum = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const int8_t v = static_cast<int8_t>(std::nearbyint(x[m * K + k] * inv));
        q[m * Kp + k] = v;
        sum += v;
      }
      s[m * G + b] = amax / 127;
      sq[m * G + b] = s[m * G + b] * static_cast<float>(sum);
      off[m * G + b] = qmm::offset_of(static_cast<int>(bits)) * sum;
    }
  }
  return {M, K, Kp, q.data(), s.data(), sq.data(), off.data()};
}

// y (M, N) = x (M, K) times a quantized weight (codes and scales as qmm.h lays them out; bits 4 or 8), float32.
void product(const float* x, int64_t M, int64_t K, const Tensor& codes, const Tensor& scale, int64_t bits,
             int64_t isa, float* y) {
  const int path = qmm::path_for(isa);
  const qmm::Rows rows = quantize_rows(x, M, K, bits, path);
  const int64_t N = codes.size(0);
  TORCH_CHECK(N % qmm::TILE == 0, "the weight's outputs must come in tiles of 16");
  TORCH_CHECK(codes.size(1) * (bits == 4 ? 2 : 1) == rows.Kp, "the weight's K does not match the input's");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() &&
                  scale.numel() == N / qmm::TILE * (rows.Kp / qmm::BLOCK) * qmm::sz_per_block(bits),
              "scales must be contiguous bfloat16, per block of 32 (and zeros for int4)");
  qmm::Weights w{static_cast<int>(bits), N, rows.Kp, reinterpret_cast<const uint8_t*>(codes.data_ptr()),
                 reinterpret_cast<const uint16_t*>(scale.data_ptr())};
  // a tile at a time through every group of up to 8 input rows: the tile's weights stay in the core's cache
  at::parallel_for(0, N / qmm::TILE, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t)
      for (int64_t m0 = 0; m0 < M; m0 += qmm::MAX_ROWS)
        qmm::rows(path, rows, w, t, m0, static_cast<int>(std::min<int64_t>(qmm::MAX_ROWS, M - m0)), y);
  });
}

float dot(const float* a, const float* b, int64_t n) {
  float acc[LANES] = {0};
  int64_t k = 0;
  for (; k + LANES <= n; k += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += a[k + l] * b[k + l];
  float s = 0;
  for (int l = 0; l < LANES; ++l) s += acc[l];
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

// out[m] = x[m] / rms(x[m]) * weight, rows of d floats.
void rms_norm(const float* x, const float* weight, float* out, int64_t M, int64_t d, double eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * d;
    const float inv = 1.0f / std::sqrt(dot(r, r, d) / static_cast<float>(d) + static_cast<float>(eps));
    for (int64_t k = 0; k < d; ++k) out[m * d + k] = r[k] * inv * weight[k];
  }
}

// e^x, branch-free so that loops over it vectorise (glibc's expf does not, and was most of attention's time):
// x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to r^6 (error below 2e-7 relative), times 2^n.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860676533018704e-06f;  // ln 2 in two parts
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// exp_approx on 16 floats at once (the same steps).
__attribute__((target("avx512f,avx512dq,fma"))) inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860676533018704e-06f),
                                    _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// Out lane l of the result: the sum of v[l]'s 16 lanes, for 16 vectors at once (a transposing tree of adds). Each
// output's additions are the same fixed tree over its own vector's lanes, (l, l + 8), (l, l + 4), (l, l + 2),
// (l, l + 1), whatever the other vectors hold.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) __m512 sum16(const __m512* v) {
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

// The cache holds keys and values as float32 or float16 (E); 16 of them as floats.
__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load16(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Attention of one query's ``group`` heads (q: group x D floats, D = 16 DC) over the n keys and values ``seen`` of
// one key/value head (kb, vb: rows of D entries), into out (group x D); score: room for 16 * ceil(n / 16) floats.
// Scores go 16 keys at a time (each key's products summed in a vector, then 16 keys reduced together, sum16);
// the weighted values accumulate in registers, even and odd keys apart.
template <int DC, typename E>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma"))) void attend_avx512(
    const float* q, int64_t group, const E* kb, const E* vb, const int64_t* seen, int64_t n, float scale,
    float* score, float* out) {
  constexpr int64_t D = 16 * DC;
  for (int64_t h = 0; h < group; ++h) {
    __m512 qv[DC];
    for (int c = 0; c < DC; ++c) qv[c] = _mm512_loadu_ps(q + h * D + 16 * c);
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t s0 = 0; s0 < n; s0 += 16) {
      const int64_t count = std::min<int64_t>(16, n - s0);
      __m512 part[16];
      for (int64_t j = 0; j < 16; ++j) {
        if (j >= count) {
          part[j] = _mm512_setzero_ps();
          continue;
        }
        const E* kr = kb + seen[s0 + j] * D;
        __m512 acc = _mm512_mul_ps(qv[0], load16(kr));
        for (int c = 1; c < DC; ++c) acc = _mm512_fmadd_ps(qv[c], load16(kr + 16 * c), acc);
        part[j] = acc;
      }
      const __mmask16 k = static_cast<__mmask16>((1u << count) - 1);
      const __m512 sc = _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale));
      _mm512_storeu_ps(score + s0, sc);
      top = _mm512_mask_max_ps(top, k, top, sc);
    }
    const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sums = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < n; s0 += 16) {
      const __mmask16 k = static_cast<__mmask16>(n - s0 >= 16 ? 0xFFFF : (1u << (n - s0)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_loadu_ps(score + s0), peak)));
      _mm512_storeu_ps(score + s0, e);
      sums = _mm512_add_ps(sums, e);
    }
    __m512 o[2][DC];
    for (int c = 0; c < DC; ++c) o[0][c] = o[1][c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; ++s) {
      const E* vr = vb + seen[s] * D;
      const __m512 e = _mm512_set1_ps(score[s]);
      for (int c = 0; c < DC; ++c) o[s & 1][c] = _mm512_fmadd_ps(e, load16(vr + 16 * c), o[s & 1][c]);
    }
    const __m512 inv = _mm512_set1_ps(n ? 1.0f / _mm512_reduce_add_ps(sums) : 0.0f);
    for (int c = 0; c < DC; ++c) _mm512_storeu_ps(out + h * D + 16 * c, _mm512_mul_ps(_mm512_add_ps(o[0][c], o[1][c]), inv));
  }
}

// This CPU's vectorised attention for head size D and cache entries E (16, 32, 64 or 128 with AVX-512), else null:
// plain loops.
template <typename E>
auto vector_attention(bool avx512, int64_t D) {
  constexpr decltype(&attend_avx512<1, E>) by_size[] = {attend_avx512<1, E>, attend_avx512<2, E>, nullptr,
                                                        attend_avx512<4, E>, nullptr, nullptr, nullptr,
                                                        attend_avx512<8, E>};
  return avx512 && D % 16 == 0 && D / 16 <= 8 ? by_size[D / 16 - 1] : nullptr;
}

// n floats into cache entries, and back (float16: rounded to nearest even).
template <typename E>
void store(const float* src, E* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<E>(src[i]);
}
template <typename E>
const float* as_floats(const E* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<E, float>) return src;
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}

// Rotate one head (D floats) by a position's cos and signed sin rows (model.rope_tables):
// out[i] = x[i] cos[i] + x[(i + D/2) % D] sin[i].
void rope(const float* x, const float* cos, const float* sin, float* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + x[i + half] * sin[i];  // two loops: they vectorise
  for (int64_t i = half; i < D; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

__attribute__((target("avx512f,avx512dq,fma"))) void swiglu_avx512(const float* gate, const float* up, float* out,
                                                                    int64_t n) {
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - k >= 16 ? 0xFFFF : (1u << (n - k)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + k);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_mask_storeu_ps(out + k, m, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)),
                                                    _mm512_maskz_loadu_ps(m, up + k)));
  }
}

// out = silu(gate) * up over n floats: gate / (1 + e^-gate) * up, 16 at a time where ``fast`` (AVX-512).
void swiglu(const float* gate, const float* up, float* out, int64_t n, bool fast) {
  if (fast) return swiglu_avx512(gate, up, out, n);
  for (int64_t k = 0; k < n; ++k) out[k] = gate[k] / (1.0f + exp_approx(-gate[k])) * up[k];
}

struct Part {
  int64_t r0, r1;           // its rows among the call's new tokens
  void *k, *v;              // its layer's cache (B, KV, L, D), float32 or float16 (``half``)
  bool half;
  int64_t L;                // the cache's slots per row
  const bool* mask;         // (1 or B, 1, rows, end) strided, or null: causal
  int64_t mb, mi, mj;       // mask strides (batch stride 0 when shared)
  int64_t n_pre;            // prefix slots written before its own tokens
};

}  // namespace

// x (B, T, d) float32 -> the block's output (B, T, d). See model.Block and kernels.run_block for the arguments.
Tensor quant_block(const Tensor& x, const Tensor& cos, const Tensor& sin, at::TensorList weights, at::IntArrayRef ints,
                   double eps, at::TensorList caches, int64_t start, at::IntArrayRef rows,
                   const c10::List<std::optional<Tensor>>& masks, const c10::List<std::optional<Tensor>>& prefixes) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be (B, T, d) float32");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == BLOCK_TENSORS && ints.size() == 8, "weights: ", BLOCK_TENSORS,
              " tensors, ints: 8");
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), M = B * T;
  const int64_t H = ints[0], KV = ints[1], D = ints[2], group = H / KV;
  const int64_t qd = H * D, kvd = KV * D;
  const Tensor &ln1 = weights[0], &ln2 = weights[1], &bias = weights[10];
  const int64_t path = qmm::path_for(ints[7]);  // the products' and the loops' instruction set
  const bool avx512 = path == qmm::AVX512;  // else plain loops
  // the four products: (codes, scales) at weights[2 + 2 i], bits at ints[3 + i]
  auto mm = [&](int i, const float* in, int64_t K, float* out) {
    product(in, M, K, weights[2 + 2 * i], weights[3 + 2 * i], ints[3 + i], path, out);
  };
  const auto f32 = x.options();
  const size_t n_parts = rows.size() / 2;
  TORCH_CHECK(caches.size() == 2 * n_parts && masks.size() == n_parts && prefixes.size() == 2 * n_parts,
              "one (k, v) cache, mask and (k, v) prefix per part");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat,
              "cos / sin must be contiguous float32");
  const bool per_row_pos = cos.dim() == 4;  // (B, 1, T, D), else (T, D)
  for (size_t p = 0, next = 0; p < n_parts; next = rows[2 * p + 1], ++p)
    TORCH_CHECK(rows[2 * p] == static_cast<int64_t>(next) && rows[2 * p + 1] > rows[2 * p] &&
                    (p + 1 < n_parts || rows[2 * p + 1] == T),
                "parts must cover the rows 0..T in order");

  // 1. norm -> q, k, v in one product
  Tensor a = at::empty({M, d}, f32);
  rms_norm(x.data_ptr<float>(), ln1.data_ptr<float>(), a.data_ptr<float>(), M, d, eps);
  Tensor qkv = at::empty({M, qd + 2 * kvd}, f32);
  mm(0, a.data_ptr<float>(), d, qkv.data_ptr<float>());
  if (bias.numel()) qkv.add_(bias);
  const float* qkvp = qkv.data_ptr<float>();
  const int64_t stride = qd + 2 * kvd;

  // 2. rotate queries (into q) and keys (into each part's cache, after its prefix); copy values
  std::vector<Part> parts(n_parts);
  Tensor q = at::empty({M, qd}, x.options());
  float* qp = q.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  std::vector<float> rotated(D);  // a key, rotated, before it goes into the cache
  for (size_t p = 0; p < n_parts; ++p) {
    Part& P = parts[p];
    P.r0 = rows[2 * p];
    P.r1 = rows[2 * p + 1];
    const Tensor &kc = caches[2 * p], &vc = caches[2 * p + 1];
    const auto dtype = kc.scalar_type();
    TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && (dtype == at::kFloat || dtype == at::kHalf) &&
                    vc.scalar_type() == dtype && kc.dim() == 4 && kc.size(0) == B && kc.size(1) == KV &&
                    kc.size(3) == D,
                "caches must be contiguous float32 or float16 (B, KV, max_len, D)");
    const int64_t L = P.L = kc.size(2), bytes = kc.element_size();
    P.half = dtype == at::kHalf;
    P.k = kc.data_ptr();
    P.v = vc.data_ptr();
    P.n_pre = 0;
    if (prefixes[2 * p].has_value()) {
      const Tensor pk = prefixes[2 * p].value().contiguous(), pv = prefixes[2 * p + 1].value().contiguous();
      TORCH_CHECK(pk.scalar_type() == dtype && pv.scalar_type() == dtype, "prefixes must have the cache's dtype");
      P.n_pre = pk.size(2);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t g = 0; g < KV; ++g)
          for (int64_t j = 0; j < P.n_pre; ++j) {
            const int64_t src = ((b * KV + g) * P.n_pre + j) * D, dst = ((b * KV + g) * L + start + j) * D;
            std::memcpy(static_cast<char*>(P.k) + dst * bytes, static_cast<const char*>(pk.data_ptr()) + src * bytes,
                        D * bytes);
            std::memcpy(static_cast<char*>(P.v) + dst * bytes, static_cast<const char*>(pv.data_ptr()) + src * bytes,
                        D * bytes);
          }
    }
    TORCH_CHECK(start + P.n_pre + (P.r1 - P.r0) <= L, "the cache is full");
    P.mask = nullptr;
    if (masks[p].has_value()) {
      const Tensor& m = masks[p].value();
      TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4, "masks must be bool (1 or B, 1, rows, keys)");
      P.mask = m.data_ptr<bool>();
      P.mb = m.size(0) == 1 ? 0 : m.stride(0);
      P.mi = m.stride(2);
      P.mj = m.stride(3);
    }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t r = P.r0; r < P.r1; ++r) {
        const int64_t m = b * T + r, slot = start + P.n_pre + (r - P.r0);
        const int64_t pos = per_row_pos ? (b * T + r) * D : r * D;
        const float* row = qkvp + m * stride;
        for (int64_t h = 0; h < H; ++h) rope(row + h * D, cp + pos, sp + pos, qp + m * qd + h * D, D);
        for (int64_t g = 0; g < KV; ++g) {
          const int64_t dst = ((b * KV + g) * L + slot) * D;
          rope(row + qd + g * D, cp + pos, sp + pos, rotated.data(), D);
          if (P.half) {
            store(rotated.data(), static_cast<Half*>(P.k) + dst, D);
            store(row + qd + kvd + g * D, static_cast<Half*>(P.v) + dst, D);
          } else {
            store(rotated.data(), static_cast<float*>(P.k) + dst, D);
            store(row + qd + kvd + g * D, static_cast<float*>(P.v) + dst, D);
          }
        }
      }
  }

  // 3. attention, one query at a time over the keys it may see, in slot order; the query heads that share a
  // key/value head go together (one unit), so that each key and value row is loaded once for them
  Tensor att = at::empty({M, qd}, f32);
  float* ap = att.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<int64_t> first(n_parts + 1, 0);  // units (b, i, g) of part p: first[p] .. first[p + 1]
  int64_t keys_max = 1;
  for (size_t p = 0; p < n_parts; ++p) {
    first[p + 1] = first[p] + B * (parts[p].r1 - parts[p].r0) * KV;
    keys_max = std::max(keys_max, start + parts[p].n_pre + parts[p].r1 - parts[p].r0);
  }
  const int64_t grain = std::max<int64_t>(1, 65536 / (keys_max * D * 2 * group));  // ~64k flops a task
  // this CPU's vectorised loops for head sizes 16, 32, 64 and 128 (the same for every query), else plain ones
  const auto attend_f32 = vector_attention<float>(avx512, D);
  const auto attend_f16 = vector_attention<Half>(avx512, D);
  at::parallel_for(0, first[n_parts], grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> score(std::max(group * keys_max, (keys_max + 15) / 16 * 16)), out(group * D), total(group);
    std::vector<float> row(D);  // a key or value as floats (plain loops over a float16 cache)
    std::vector<int64_t> seen(keys_max);
    // one unit: the query heads of key/value head g for new token i of row b, over the keys it may see
    auto unit = [&](const Part& P, int64_t b, int64_t i, int64_t g, auto* cache_k, auto* cache_v, auto attend) {
      const int64_t m = b * T + P.r0 + i, own = start + P.n_pre + i, end = start + P.n_pre + (P.r1 - P.r0);
      const auto* kb = cache_k + (b * KV + g) * P.L * D;
      const auto* vb = cache_v + (b * KV + g) * P.L * D;
      const float* qv = qp + m * qd + g * group * D;  // the group's query heads, one after another
      int64_t n_seen = 0;
      if (P.mask == nullptr) {
        for (int64_t j = 0; j <= own; ++j) seen[n_seen++] = j;
      } else {
        const bool* mr = P.mask + b * P.mb + i * P.mi;
        for (int64_t j = 0; j < end; ++j)
          if (mr[j * P.mj]) seen[n_seen++] = j;
      }
      if (attend != nullptr) {
        attend(qv, group, kb, vb, seen.data(), n_seen, scale, score.data(), ap + m * qd + g * group * D);
        return;
      }
      for (int64_t s = 0; s < n_seen; ++s) {
        const float* kr = as_floats(kb + seen[s] * D, row.data(), D);
        for (int64_t h = 0; h < group; ++h) score[h * keys_max + s] = dot(qv + h * D, kr, D) * scale;
      }
      std::fill(out.begin(), out.end(), 0.0f);
      std::fill(total.begin(), total.end(), 0.0f);
      for (int64_t h = 0; h < group; ++h) {
        float* e = score.data() + h * keys_max;
        float top = -INFINITY;
        for (int64_t s = 0; s < n_seen; ++s) top = std::max(top, e[s]);
        for (int64_t s = 0; s < n_seen; ++s) e[s] = exp_approx(e[s] - top);
        for (int64_t s = 0; s < n_seen; ++s) total[h] += e[s];
      }
      for (int64_t s = 0; s < n_seen; ++s) {
        const float* vr = as_floats(vb + seen[s] * D, row.data(), D);
        for (int64_t h = 0; h < group; ++h) {
          const float e = score[h * keys_max + s];
          float* o = out.data() + h * D;
          for (int64_t k = 0; k < D; ++k) o[k] += e * vr[k];
        }
      }
      for (int64_t h = 0; h < group; ++h) {
        const float inv = n_seen ? 1.0f / total[h] : 0.0f;
        for (int64_t k = 0; k < D; ++k) ap[m * qd + (g * group + h) * D + k] = out[h * D + k] * inv;
      }
    };
    for (int64_t u = lo; u < hi; ++u) {
      const size_t p = std::upper_bound(first.begin(), first.end(), u) - first.begin() - 1;
      const Part& P = parts[p];
      const int64_t n = u - first[p], Tp = P.r1 - P.r0;
      const int64_t g = n % KV, i = (n / KV) % Tp, b = n / (KV * Tp);
      if (P.half)
        unit(P, b, i, g, static_cast<const Half*>(P.k), static_cast<const Half*>(P.v), attend_f16);
      else
        unit(P, b, i, g, static_cast<const float*>(P.k), static_cast<const float*>(P.v), attend_f32);
    }
  });

  // 4. output projection and residual; norm -> gate and up in one product
  Tensor y = at::empty_like(x);
  float* yp = y.data_ptr<float>();
  mm(1, ap, qd, yp);
  const float* xp = x.data_ptr<float>();
  for (int64_t k = 0; k < M * d; ++k) yp[k] += xp[k];
  rms_norm(yp, ln2.data_ptr<float>(), a.data_ptr<float>(), M, d, eps);
  const int64_t F = weights[6].size(0) / 2;  // gate_up codes: (2F, Kp or Kp / 2)
  Tensor gu = at::empty({M, 2 * F}, f32);
  mm(2, a.data_ptr<float>(), d, gu.data_ptr<float>());

  // 5. SwiGLU: silu(gate) * up -> down, and the residual
  Tensor hidden = at::empty({M, F}, f32);
  const float* gp = gu.data_ptr<float>();
  float* hp = hidden.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) swiglu(gp + m * 2 * F, gp + m * 2 * F + F, hp + m * F, F, avx512);
  Tensor down = at::empty({M, d}, f32);
  mm(3, hp, F, down.data_ptr<float>());
  const float* dp = down.data_ptr<float>();
  for (int64_t k = 0; k < M * d; ++k) yp[k] += dp[k];
  return y;
}

// x (M, K) float32 times a quantized weight (qmm.h) -> (M, N) float32; isa -1 picks this CPU's fastest path.
Tensor qmm_op(const Tensor& x, const Tensor& codes, const Tensor& scale, int64_t bits, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be (M, K) float32");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  Tensor y = at::empty({x.size(0), codes.size(0)}, x.options());
  product(x.data_ptr<float>(), x.size(0), x.size(1), codes, scale, bits, isa, y.data_ptr<float>());
  return y;
}

int64_t best_isa_op() { return qmm::best_isa(); }

// Logical layers first .. last - 1 of a stack, each a plain decode call (one part: every row, at the cache's next
// slots, ``mask`` or causal): weights holds BLOCK_TENSORS per unique block (layer i runs block i % unique blocks),
// k_caches / v_caches one tensor per logical layer.
Tensor quant_stack(const Tensor& x, const Tensor& cos, const Tensor& sin, at::TensorList weights, at::IntArrayRef ints,
                   double eps, at::TensorList k_caches, at::TensorList v_caches, int64_t start,
                   const std::optional<Tensor>& mask, int64_t first, int64_t last) {
  const int64_t n_weights = weights.size();
  TORCH_CHECK(n_weights % BLOCK_TENSORS == 0 && n_weights > 0, "weights: ", BLOCK_TENSORS, " tensors per block");
  TORCH_CHECK(0 <= first && first <= last && last <= static_cast<int64_t>(k_caches.size()) &&
                  k_caches.size() == v_caches.size(),
              "layers out of range");
  const int64_t unique = n_weights / BLOCK_TENSORS;
  c10::List<std::optional<Tensor>> masks, prefixes;
  masks.push_back(mask);
  prefixes.push_back(std::nullopt);
  prefixes.push_back(std::nullopt);
  const std::vector<int64_t> rows{0, x.size(1)};
  Tensor y = x;
  for (int64_t i = first; i < last; ++i)
    y = quant_block(y, cos, sin, weights.slice((i % unique) * BLOCK_TENSORS, BLOCK_TENSORS), ints, eps,
                    {k_caches[i], v_caches[i]}, start, rows, masks, prefixes);
  return y;
}

TORCH_LIBRARY(recyclegpt, m) {
  m.def("quant_block(Tensor x, Tensor cos, Tensor sin, Tensor[] weights, int[] ints, float eps, Tensor[] caches, "
        "int start, int[] rows, Tensor?[] masks, Tensor?[] prefixes) -> Tensor");
  m.def("qmm(Tensor x, Tensor codes, Tensor scale, int bits, int isa) -> Tensor");
  m.def("best_isa() -> int", &best_isa_op);
  m.def("quant_stack(Tensor x, Tensor cos, Tensor sin, Tensor[] weights, int[] ints, float eps, Tensor[] k_caches, "
        "Tensor[] v_caches, int start, Tensor? mask, int first, int last) -> Tensor");
}

TORCH_LIBRARY_IMPL(recyclegpt, CPU, m) {
  m.impl("quant_block", &quant_block);
  m.impl("qmm", &qmm_op);
  m.impl("quant_stack", &quant_stack);
}
