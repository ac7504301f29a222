"""The C++ source of the decode attention kernel (`attention_kernel` builds, loads and checks it).

Two entry points over the slot K/V cache buffers (`[slots, Hkv, alloc, D]`, contiguous):

- `decode_attention(q, keys, values, slots, lens, scale)`: for each decode row i, KV head h and
  query head g of that head's group, softmax(q . keys[slots[i], h, :lens[i]]^T * scale) @ values[...].
- `decode_attention_append(q, keys, values, slots, lens, scale, k_new, v_new)`: first stores row i's
  new key/value (`[rows, Hkv, D]`) at position `lens[i] - 1` of its slot, then attends exactly as
  above. The stored row is the last one the attention reads for that (row, head), so it is read
  back from L1 instead of being written by a separate scatter that misses the cache per line.
  Slots must be distinct (two rows writing one slot would race between threads): checked.

Invariants:
- Each (row, KV head) reads its keys and its values exactly once, for all G query heads of the
  group; work is split over (row, KV head) pairs with `at::parallel_for` (torch's thread count),
  and each pair is computed whole by one thread, so the result does not depend on the thread count.
- Two passes over keys with an exact max, fp32 accumulation whatever the cache dtype, a Cephes-style
  exponential (about 1 ulp) written so it vectorises; keys and values walked in blocks of 64 rows.
- No software prefetch: read-ahead along each thread's K, V, next-K stream (sequential, or the
  values prefetched into L2 during the keys' pass) was measured and did not help
  (docs/benchmarks.md, "Decode step: what is left ..."), so the hardware prefetcher does it.
- fp32 with a head dimension divisible by 8 on an AVX2+FMA build takes explicit intrinsics; every
  other case the portable loops. Inputs are checked; a violation is a `RuntimeError` naming it.
"""
from __future__ import annotations

__all__ = ["CPP_SOURCE", "FUNCTIONS"]

FUNCTIONS = ("decode_attention", "decode_attention_append")

CPP_SOURCE = r"""
#include <ATen/Parallel.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int LANES = 16;

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[LANES] = {0};
  int64_t d = 0;
  for (; d + LANES <= n; d += LANES)
    for (int t = 0; t < LANES; ++t) acc[t] += a[d + t] * b[d + t];
  float s = 0.f;
  for (; d < n; ++d) s += a[d] * b[d];
  for (int t = 0; t < LANES; ++t) s += acc[t];
  return s;
}

// exp(x) for x <= 0 (scores minus their max): Cephes expf, branch-free so loops over it vectorise.
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
inline const float* as_float(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same<T, float>::value) {
    return src;
  } else {
    for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<float>(src[d]);
    return buf;
  }
}

constexpr int64_t BLOCK = 64;  // keys per block: the block stays in L1 while the G heads use it

template <typename T>  // pass 1, any dtype: scores of the G heads from one key row at a time
void scores(const float* qf, const T* k, int64_t L, int64_t G, int64_t D, float* kv, float* s) {
  for (int64_t j = 0; j < L; ++j) {
    const float* kj = as_float(k + j * D, kv, D);
    for (int64_t g = 0; g < G; ++g) s[g * L + j] = dot(qf + g * D, kj, D);
  }
}

template <typename T>  // pass 2, any dtype: the G outputs from one value row at a time
void weighted_sum(const float* s, const T* v, int64_t L, int64_t G, int64_t D, float* kv, float* o) {
  for (int64_t j = 0; j < L; ++j) {
    const float* vj = as_float(v + j * D, kv, D);
    for (int64_t g = 0; g < G; ++g) {
      const float p = s[g * L + j];
      float* og = o + g * D;
      for (int64_t d = 0; d < D; ++d) og[d] += p * vj[d];
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
constexpr bool kAvx2 = true;

// Scores of 4 consecutive keys (rows of D floats, D % 8 == 0) against q: four independent FMA
// chains, one horizontal reduction for all four.
inline void dot4(const float* q, const float* k, int64_t D, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + d), a0);
    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + D + d), a1);
    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * D + d), a2);
    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * D + d), a3);
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

// o[0 : 8*NV] += sum_j p[j] * v[j, 0 : 8*NV] over n rows of stride D, accumulators in registers.
template <int NV>
inline void pv_block(const float* v, const float* p, int64_t n, int64_t D, float* o) {
  __m256 acc[NV];
  for (int t = 0; t < NV; ++t) acc[t] = _mm256_loadu_ps(o + 8 * t);
  for (int64_t j = 0; j < n; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j]);
    for (int t = 0; t < NV; ++t) acc[t] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * D + 8 * t), acc[t]);
  }
  for (int t = 0; t < NV; ++t) _mm256_storeu_ps(o + 8 * t, acc[t]);
}

void scores_avx2(const float* qf, const float* k, int64_t L, int64_t G, int64_t D, float* s) {
  for (int64_t jb = 0; jb < L; jb += BLOCK) {
    const int64_t je = std::min(L, jb + BLOCK);
    for (int64_t g = 0; g < G; ++g) {
      int64_t j = jb;
      for (; j + 4 <= je; j += 4) dot4(qf + g * D, k + j * D, D, s + g * L + j);
      for (; j < je; ++j) s[g * L + j] = dot(qf + g * D, k + j * D, D);
    }
  }
}

void weighted_sum_avx2(const float* s, const float* v, int64_t L, int64_t G, int64_t D, float* o) {
  for (int64_t jb = 0; jb < L; jb += BLOCK) {
    const int64_t n = std::min(L, jb + BLOCK) - jb;
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t c = 0; c < D; c += 64) {  // at most 8 accumulators (64 floats) at a time
        const float* vb = v + jb * D + c;
        const float* p = s + g * L + jb;
        float* og = o + g * D + c;
        switch (std::min<int64_t>(8, (D - c) / 8)) {
          case 1: pv_block<1>(vb, p, n, D, og); break;
          case 2: pv_block<2>(vb, p, n, D, og); break;
          case 3: pv_block<3>(vb, p, n, D, og); break;
          case 4: pv_block<4>(vb, p, n, D, og); break;
          case 5: pv_block<5>(vb, p, n, D, og); break;
          case 6: pv_block<6>(vb, p, n, D, og); break;
          case 7: pv_block<7>(vb, p, n, D, og); break;
          default: pv_block<8>(vb, p, n, D, og); break;
        }
      }
    }
  }
}
#else
constexpr bool kAvx2 = false;
void scores_avx2(const float*, const float*, int64_t, int64_t, int64_t, float*) {}
void weighted_sum_avx2(const float*, const float*, int64_t, int64_t, int64_t, float*) {}
#endif

// kn/vn: the new key/value rows ([B, Hkv, D]) stored at position lens[i] - 1 first, or null.
template <typename T>
void run(const T* q, T* k, T* v, const T* kn, const T* vn, const int64_t* slots, const int64_t* lens, T* out,
         int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t alloc, int64_t max_len, float scale) {
  const int64_t rb = D * static_cast<int64_t>(sizeof(T));
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(G * max_len), o(G * D), qf(G * D), kv(D), inv(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / Hkv, h = task % Hkv, L = lens[i];
      const int64_t base = (slots[i] * Hkv + h) * alloc * D;
      if (kn != nullptr) {
        std::memcpy(k + base + (L - 1) * D, kn + task * D, rb);
        std::memcpy(v + base + (L - 1) * D, vn + task * D, rb);
      }
      const T* qp = q + (i * Hkv + h) * G * D;
      for (int64_t x = 0; x < G * D; ++x) qf[x] = static_cast<float>(qp[x]) * scale;
      bool fast = false;
      if constexpr (std::is_same<T, float>::value) fast = kAvx2 && D % 8 == 0;
      if constexpr (std::is_same<T, float>::value) {
        if (fast) scores_avx2(qf.data(), k + base, L, G, D, s.data());
      }
      if (!fast) scores(qf.data(), k + base, L, G, D, kv.data(), s.data());
      for (int64_t g = 0; g < G; ++g) {  // exact max, exponentials, their sum
        float* sg = s.data() + g * L;
        float m = sg[0];
        for (int64_t j = 1; j < L; ++j) m = std::max(m, sg[j]);
        for (int64_t j = 0; j < L; ++j) sg[j] = exp_nonpos(sg[j] - m);
        float acc[LANES] = {0};
        int64_t j = 0;
        for (; j + LANES <= L; j += LANES)
          for (int t = 0; t < LANES; ++t) acc[t] += sg[j + t];
        float sum = 0.f;
        for (; j < L; ++j) sum += sg[j];
        for (int t = 0; t < LANES; ++t) sum += acc[t];
        inv[g] = 1.0f / sum;
      }
      std::fill(o.begin(), o.end(), 0.f);
      if constexpr (std::is_same<T, float>::value) {
        if (fast) weighted_sum_avx2(s.data(), v + base, L, G, D, o.data());
      }
      if (!fast) weighted_sum(s.data(), v + base, L, G, D, kv.data(), o.data());
      T* op = out + (i * Hkv + h) * G * D;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) op[g * D + d] = static_cast<T>(o[g * D + d] * inv[g]);
    }
  });
}

at::Tensor attend(at::Tensor q, at::Tensor keys, at::Tensor values, at::Tensor slots, at::Tensor lens, double scale,
                  const at::Tensor* k_new, const at::Tensor* v_new) {
  TORCH_CHECK(q.dim() == 4, "q must be [rows, kv_heads, group, head_dim], got ", q.sizes());
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes(),
              "keys and values must be equal [slots, kv_heads, alloc, head_dim], got ", keys.sizes(), " and ",
              values.sizes());
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && q.scalar_type() == values.scalar_type(),
              "q, keys and values must share a dtype");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "keys and values must be contiguous buffers");
  TORCH_CHECK(slots.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "slots and lens must be int64");
  const int64_t B = q.size(0), Hkv = q.size(1), G = q.size(2), D = q.size(3);
  const int64_t S = keys.size(0), alloc = keys.size(2);
  TORCH_CHECK(keys.size(1) == Hkv && keys.size(3) == D, "q ", q.sizes(), " does not match the cache ", keys.sizes());
  TORCH_CHECK(slots.numel() == B && lens.numel() == B, "slots and lens need one entry per row (", B, ")");
  at::Tensor kc, vc;
  if (k_new != nullptr) {
    for (const at::Tensor* t : {k_new, v_new}) {
      TORCH_CHECK(t->dim() == 3 && t->size(0) == B && t->size(1) == Hkv && t->size(2) == D,
                  "k_new and v_new must be [rows, kv_heads, head_dim] = [", B, ", ", Hkv, ", ", D, "], got ",
                  t->sizes());
      TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                  "k_new and v_new must be CPU tensors of q's dtype");
    }
    kc = k_new->contiguous();
    vc = v_new->contiguous();
  }
  auto qc = q.contiguous();
  auto sc = slots.contiguous();
  auto lc = lens.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  const int64_t* lp = lc.data_ptr<int64_t>();
  int64_t max_len = 1;
  std::vector<char> taken(k_new != nullptr ? S : 0, 0);
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK(sp[i] >= 0 && sp[i] < S, "row ", i, ": slot ", sp[i], " outside the cache's ", S, " slots");
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= alloc, "row ", i, ": length ", lp[i], " outside 1..", alloc);
    if (k_new != nullptr) {
      TORCH_CHECK(!taken[sp[i]], "row ", i, ": slot ", sp[i], " appears twice (each row appends to its own slot)");
      taken[sp[i]] = 1;
    }
    max_len = std::max(max_len, lp[i]);
  }
  auto out = at::empty_like(qc);
  const float sc_f = static_cast<float>(scale);
#define AREAL_RUN(T)                                                                                         \
  run<T>(qc.data_ptr<T>(), keys.data_ptr<T>(), values.data_ptr<T>(), k_new ? kc.data_ptr<T>() : nullptr,     \
         k_new ? vc.data_ptr<T>() : nullptr, sp, lp, out.data_ptr<T>(), B, Hkv, G, D, alloc, max_len, sc_f)
  if (q.scalar_type() == at::kFloat) {
    AREAL_RUN(float);
  } else if (q.scalar_type() == at::kBFloat16) {
    AREAL_RUN(at::BFloat16);
  } else if (q.scalar_type() == at::kHalf) {
    AREAL_RUN(at::Half);
  } else {
    TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
#undef AREAL_RUN
  return out;
}

}  // namespace

at::Tensor decode_attention(at::Tensor q, at::Tensor keys, at::Tensor values, at::Tensor slots, at::Tensor lens,
                            double scale) {
  return attend(q, keys, values, slots, lens, scale, nullptr, nullptr);
}

at::Tensor decode_attention_append(at::Tensor q, at::Tensor keys, at::Tensor values, at::Tensor slots,
                                   at::Tensor lens, double scale, at::Tensor k_new, at::Tensor v_new) {
  return attend(q, keys, values, slots, lens, scale, &k_new, &v_new);
}
"""
