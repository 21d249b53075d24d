// One transformer block of a weight-only quantized model, decoding with a KV cache, as one call.
//
// model.Block does the same in some 60 eager tensor operations, each a few microseconds of dispatch on a small
// model, which made up half of an int4 SmolLM2 step. Here only the products go through PyTorch (its int8 / int4 CPU
// kernels, aten::_weight_int8pack_mm and aten::_weight_int4pack_mm_for_cpu, bfloat16 in and out); the norms, the
// rotary embedding, the cache writes, attention and the SwiGLU gate are plain loops over float32.
//
// Every new token's result is that of a one-token call at its slot, whatever else shares the call: the products
// never mix rows (quant.py), and attention runs one query at a time over the keys it may see, in slot order, with
// the same loops for every query. So verified decoding checks several tokens in one call and still gets the logits
// standard decoding would, bit for bit.
//
// Built by recyclegpt/kernels.py for the CPU it runs on (-march=native), loaded with torch.ops.load_library.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;
using bf16 = c10::BFloat16;
constexpr int LANES = 16;  // float lanes summed apart in dot products (vectorised, same order for every row)

// The product of bfloat16 rows a (M, K) with a quantized weight: mode 0 is int8 (weight, per-row scales), a
// positive mode is int4 with that group size (packed weight, scales and zeros). Returns (M, N) bfloat16.
Tensor product(const Tensor& a, const Tensor& w, const Tensor& s, int64_t mode) {
  return mode == 0 ? at::_weight_int8pack_mm(a, w, s) : at::_weight_int4pack_mm_for_cpu(a, w, mode, s);
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

// out[m] = bfloat16(x[m] / rms(x[m]) * weight), rows of d floats.
void rms_norm(const float* x, const float* weight, bf16* out, int64_t M, int64_t d, double eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * d;
    const float inv = 1.0f / std::sqrt(dot(r, r, d) / static_cast<float>(d) + static_cast<float>(eps));
    for (int64_t k = 0; k < d; ++k) out[m * d + k] = bf16(r[k] * inv * weight[k]);
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

// Rotate one head (D floats) by a position's cos and signed sin rows (model.rope_tables):
// out[i] = x[i] cos[i] + x[(i + D/2) % D] sin[i].
void rope(const float* x, const float* cos, const float* sin, float* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) out[i] = x[i] * cos[i] + x[(i + half) % D] * sin[i];
}

struct Part {
  int64_t r0, r1;           // its rows among the call's new tokens
  float *k, *v;             // its layer's cache (B, KV, L, D)
  int64_t L;                // the cache's slots per row
  const bool* mask;         // (1 or B, 1, rows, end) strided, or null: causal
  int64_t mb, mi, mj;       // mask strides (batch stride 0 when shared)
  int64_t n_pre;            // prefix slots written before its own tokens
};

}  // namespace

// x (B, T, d) float32 -> the block's output (B, T, d). See model.Block and kernels.fused_block for the arguments.
Tensor quant_block(const Tensor& x, const Tensor& cos, const Tensor& sin, std::vector<Tensor> weights,
                   std::vector<int64_t> ints, double eps, std::vector<Tensor> caches, int64_t start,
                   std::vector<int64_t> rows, const c10::List<std::optional<Tensor>>& masks,
                   const c10::List<std::optional<Tensor>>& prefixes) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be (B, T, d) float32");
  TORCH_CHECK(weights.size() == 11 && ints.size() == 7, "weights: 11 tensors, ints: 7");
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), M = B * T;
  const int64_t H = ints[0], KV = ints[1], D = ints[2], group = H / KV;
  const int64_t qd = H * D, kvd = KV * D;
  const Tensor &ln1 = weights[0], &ln2 = weights[1], &bias = weights[10];
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
  Tensor a = at::empty({M, d}, x.options().dtype(at::kBFloat16));
  rms_norm(x.data_ptr<float>(), ln1.data_ptr<float>(), a.data_ptr<bf16>(), M, d, eps);
  Tensor qkv = product(a, weights[2], weights[3], ints[3]).to(at::kFloat);  // (M, qd + 2 kvd)
  if (bias.numel()) qkv.add_(bias);
  const float* qkvp = qkv.data_ptr<float>();
  const int64_t stride = qd + 2 * kvd;

  // 2. rotate queries (into q) and keys (into each part's cache, after its prefix); copy values
  std::vector<Part> parts(n_parts);
  Tensor q = at::empty({M, qd}, x.options());
  float* qp = q.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  for (size_t p = 0; p < n_parts; ++p) {
    Part& P = parts[p];
    P.r0 = rows[2 * p];
    P.r1 = rows[2 * p + 1];
    const Tensor &kc = caches[2 * p], &vc = caches[2 * p + 1];
    TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.scalar_type() == at::kFloat && kc.dim() == 4 &&
                    kc.size(0) == B && kc.size(1) == KV && kc.size(3) == D,
                "caches must be contiguous float32 (B, KV, max_len, D)");
    const int64_t L = P.L = kc.size(2);
    P.k = kc.data_ptr<float>();
    P.v = vc.data_ptr<float>();
    P.n_pre = 0;
    if (prefixes[2 * p].has_value()) {
      const Tensor pk = prefixes[2 * p].value().contiguous(), pv = prefixes[2 * p + 1].value().contiguous();
      P.n_pre = pk.size(2);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t g = 0; g < KV; ++g)
          for (int64_t j = 0; j < P.n_pre; ++j) {
            const int64_t src = ((b * KV + g) * P.n_pre + j) * D, dst = ((b * KV + g) * L + start + j) * D;
            std::copy_n(pk.data_ptr<float>() + src, D, P.k + dst);
            std::copy_n(pv.data_ptr<float>() + src, D, P.v + dst);
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
          rope(row + qd + g * D, cp + pos, sp + pos, P.k + dst, D);
          std::copy_n(row + qd + kvd + g * D, D, P.v + dst);
        }
      }
  }

  // 3. attention, one query at a time over the keys it may see, in slot order; the query heads that share a
  // key/value head go together (one unit), so that each key and value row is loaded once for them
  Tensor att = at::empty({M, qd}, x.options().dtype(at::kBFloat16));
  bf16* ap = att.data_ptr<bf16>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<int64_t> first(n_parts + 1, 0);  // units (b, i, g) of part p: first[p] .. first[p + 1]
  int64_t keys_max = 1;
  for (size_t p = 0; p < n_parts; ++p) {
    first[p + 1] = first[p] + B * (parts[p].r1 - parts[p].r0) * KV;
    keys_max = std::max(keys_max, start + parts[p].n_pre + parts[p].r1 - parts[p].r0);
  }
  const int64_t grain = std::max<int64_t>(1, 65536 / (keys_max * D * 2 * group));  // ~64k flops a task
  at::parallel_for(0, first[n_parts], grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> score(group * keys_max), out(group * D);
    std::vector<int64_t> seen(keys_max);
    for (int64_t u = lo; u < hi; ++u) {
      const size_t p = std::upper_bound(first.begin(), first.end(), u) - first.begin() - 1;
      const Part& P = parts[p];
      const int64_t n = u - first[p], Tp = P.r1 - P.r0;
      const int64_t g = n % KV, i = (n / KV) % Tp, b = n / (KV * Tp);
      const int64_t m = b * T + P.r0 + i, own = start + P.n_pre + i, end = start + P.n_pre + Tp;
      const float* kb = P.k + (b * KV + g) * P.L * D;
      const float* vb = P.v + (b * KV + g) * P.L * D;
      const float* qv = qp + m * qd + g * group * D;  // the group's query heads, one after another
      int64_t n_seen = 0;
      if (P.mask == nullptr) {
        for (int64_t j = 0; j <= own; ++j) seen[n_seen++] = j;
      } else {
        const bool* mr = P.mask + b * P.mb + i * P.mi;
        for (int64_t j = 0; j < end; ++j)
          if (mr[j * P.mj]) seen[n_seen++] = j;
      }
      for (int64_t s = 0; s < n_seen; ++s) {
        const float* kr = kb + seen[s] * D;
        for (int64_t h = 0; h < group; ++h) score[h * keys_max + s] = dot(qv + h * D, kr, D) * scale;
      }
      std::fill(out.begin(), out.end(), 0.0f);
      std::vector<float> total(group, 0.0f);
      for (int64_t h = 0; h < group; ++h) {
        float* e = score.data() + h * keys_max;
        float top = -INFINITY;
        for (int64_t s = 0; s < n_seen; ++s) top = std::max(top, e[s]);
        for (int64_t s = 0; s < n_seen; ++s) e[s] = exp_approx(e[s] - top);
        for (int64_t s = 0; s < n_seen; ++s) total[h] += e[s];
      }
      for (int64_t s = 0; s < n_seen; ++s) {
        const float* vr = vb + seen[s] * D;
        for (int64_t h = 0; h < group; ++h) {
          const float e = score[h * keys_max + s];
          float* o = out.data() + h * D;
          for (int64_t k = 0; k < D; ++k) o[k] += e * vr[k];
        }
      }
      for (int64_t h = 0; h < group; ++h) {
        const float inv = n_seen ? 1.0f / total[h] : 0.0f;
        for (int64_t k = 0; k < D; ++k) ap[m * qd + (g * group + h) * D + k] = bf16(out[h * D + k] * inv);
      }
    }
  });

  // 4. output projection and residual; norm -> gate and up in one product
  Tensor o = product(att, weights[4], weights[5], ints[4]);  // (M, d) bf16
  Tensor y = at::empty_like(x);
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const bf16* op = o.data_ptr<bf16>();
  for (int64_t k = 0; k < M * d; ++k) yp[k] = xp[k] + static_cast<float>(op[k]);
  rms_norm(yp, ln2.data_ptr<float>(), a.data_ptr<bf16>(), M, d, eps);
  Tensor gu = product(a, weights[6], weights[7], ints[5]);  // (M, 2F) bf16
  const int64_t F = gu.size(1) / 2;

  // 5. SwiGLU: silu(gate) * up -> down, and the residual
  Tensor hidden = at::empty({M, F}, x.options().dtype(at::kBFloat16));
  const bf16* gp = gu.data_ptr<bf16>();
  bf16* hp = hidden.data_ptr<bf16>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < F; ++k) {
      const float gate = static_cast<float>(gp[m * 2 * F + k]), up = static_cast<float>(gp[m * 2 * F + F + k]);
      hp[m * F + k] = bf16(gate / (1.0f + exp_approx(-gate)) * up);
    }
  Tensor down = product(hidden, weights[8], weights[9], ints[6]);  // (M, d) bf16
  const bf16* dp = down.data_ptr<bf16>();
  for (int64_t k = 0; k < M * d; ++k) yp[k] += static_cast<float>(dp[k]);
  return y;
}

TORCH_LIBRARY(recyclegpt, m) {
  m.def("quant_block(Tensor x, Tensor cos, Tensor sin, Tensor[] weights, int[] ints, float eps, Tensor[] caches, "
        "int start, int[] rows, Tensor?[] masks, Tensor?[] prefixes) -> Tensor");
}

TORCH_LIBRARY_IMPL(recyclegpt, CPU, m) { m.impl("quant_block", &quant_block); }
