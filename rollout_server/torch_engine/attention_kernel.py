"""Decode attention as one C++ kernel over the slot K/V cache: every row at its own length, one call.

`decode_attention(q, keys, values, slots, lens, scale)` computes, for each decode row i, KV head h
and query head g of that KV head's group (GQA),

    out[i, h, g] = softmax(q[i, h, g] . keys[slots[i], h, :lens[i]]^T * scale) @ values[slots[i], h, :lens[i]]

reading the cache buffers (`[slots, Hkv, alloc, D]`, as `kv_cache.SlotKVCache` holds them) in place:
no view per bucket, no gather of scattered rows, no padding to the batch's longest row.

Invariants:
- Each (row, KV head) reads its keys and its values exactly once, for all G query heads of the
  group: scores for the G heads are computed from one key row while it is in L1, and the output
  of the G heads accumulates from one value row. Work is split over (row, KV head) pairs with
  `at::parallel_for`, so it follows torch's thread count.
- Two passes over keys with an exact max (scores go to a per-(row, head) buffer of `lens[i]`
  floats), accumulation in fp32 whatever the cache dtype; the exponential is a Cephes-style
  polynomial (about 1 ulp in fp32) written so the compiler vectorises it. Keys and values are
  walked in blocks of 64 rows that stay in L1 while the G heads use them.
- fp32 with a head dimension divisible by 8 on an AVX2+FMA build takes explicit intrinsics (four
  keys' dot products per reduction, output accumulators in registers); every other case (bf16,
  fp16, other head dims, other CPUs) the portable loops. Both are tested against SDPA.
- Inputs are checked (shapes, dtypes, devices, slot and length ranges); a violation is a
  `RuntimeError` naming it, never an out-of-bounds read.

Building: `torch.utils.cpp_extension.load_inline` with -O3 -march=native into a directory keyed by
the source's hash, the CPU's flags and torch's version, under the per-machine cache
($AREAL_PY_EXT_DIR, else $XDG_CACHE_HOME/areal-py/ext), so it compiles once per machine; later
loads find the built library. `load_kernel` never raises: a missing compiler or any build or load
error gives a `KernelBuild` with `fn=None` and the reason, and the caller keeps SDPA. A failed build
is remembered in the build directory (`build_failure`): later loads report it without compiling
until the compiler or torch changes, the marker is deleted, or $AREAL_PY_KERNEL_RETRY=1.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rollout_server.torch_engine.build_failure import (
    clear_failure,
    failure_path,
    read_failure,
    record_failure,
    retry_requested,
)

__all__ = ["KernelBuild", "build_dir", "decode_attention_ref", "is_built", "load_kernel", "remembered_failure"]

log = logging.getLogger(__name__)

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

template <typename T>
void run(const T* q, const T* k, const T* v, const int64_t* slots, const int64_t* lens, T* out,
         int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t alloc, int64_t max_len, float scale) {
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(G * max_len), o(G * D), qf(G * D), kv(D), inv(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / Hkv, h = task % Hkv, L = lens[i];
      const int64_t base = (slots[i] * Hkv + h) * alloc * D;
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

}  // namespace

at::Tensor decode_attention(at::Tensor q, at::Tensor keys, at::Tensor values, at::Tensor slots, at::Tensor lens,
                            double scale) {
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
  auto qc = q.contiguous();
  auto sc = slots.contiguous();
  auto lc = lens.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  const int64_t* lp = lc.data_ptr<int64_t>();
  int64_t max_len = 1;
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK(sp[i] >= 0 && sp[i] < S, "row ", i, ": slot ", sp[i], " outside the cache's ", S, " slots");
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= alloc, "row ", i, ": length ", lp[i], " outside 1..", alloc);
    max_len = std::max(max_len, lp[i]);
  }
  auto out = at::empty_like(qc);
  const float sc_f = static_cast<float>(scale);
  if (q.scalar_type() == at::kFloat) {
    run<float>(qc.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), sp, lp,
               out.data_ptr<float>(), B, Hkv, G, D, alloc, max_len, sc_f);
  } else if (q.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(qc.data_ptr<at::BFloat16>(), keys.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>(),
                      sp, lp, out.data_ptr<at::BFloat16>(), B, Hkv, G, D, alloc, max_len, sc_f);
  } else if (q.scalar_type() == at::kHalf) {
    run<at::Half>(qc.data_ptr<at::Half>(), keys.data_ptr<at::Half>(), values.data_ptr<at::Half>(), sp, lp,
                  out.data_ptr<at::Half>(), B, Hkv, G, D, alloc, max_len, sc_f);
  } else {
    TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return out;
}
"""

CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math")
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
Builder = Callable[[str, Path], Kernel]


@dataclass(frozen=True)
class KernelBuild:
    """The outcome of building/loading the kernel: `fn` None means unusable, and `reason` says why."""

    fn: Kernel | None
    reason: str
    seconds: float = 0.0


def _cpu_flags() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def source_key() -> str:
    """What the built library depends on: the source, the flags, the CPU (for -march=native), torch."""
    text = "\n".join([CPP_SOURCE, " ".join(CFLAGS), _cpu_flags(), torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_root() -> Path:
    """$AREAL_PY_EXT_DIR, else $XDG_CACHE_HOME/areal-py/ext (~/.cache by default): per machine, not per run."""
    if os.environ.get("AREAL_PY_EXT_DIR"):
        return Path(os.environ["AREAL_PY_EXT_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "areal-py" / "ext"


def build_dir(root: Path | None = None) -> Path:
    return (root or build_root()) / f"decode_attention_{source_key()}"


def _module_name() -> str:
    return f"areal_decode_attention_{source_key()}"


def is_built(root: Path | None = None) -> bool:
    """True when this machine already has the library for this source (loading it costs no compile)."""
    return (build_dir(root) / f"{_module_name()}.so").exists()


def _load_inline(name: str, directory: Path) -> Kernel:
    from torch.utils.cpp_extension import load_inline

    directory.mkdir(parents=True, exist_ok=True)
    module = load_inline(name=name, cpp_sources=[CPP_SOURCE], functions=["decode_attention"],
                         extra_cflags=list(CFLAGS), build_directory=str(directory), verbose=False)
    return module.decode_attention


def _import_built(name: str, directory: Path) -> Kernel:
    """The already-built library, imported directly (no compiler, no ninja run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, directory / f"{name}.so")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {directory / name}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.decode_attention


def remembered_failure(root: Path | None = None) -> str | None:
    """Why the kernel is not built, when an earlier build on this machine failed and still applies
    (`build_failure.read_failure`; None with $AREAL_PY_KERNEL_RETRY=1 or once it is built)."""
    directory = build_dir(root)
    if is_built(root) or retry_requested():
        return None
    failed = read_failure(directory)
    return None if failed is None else failed.describe(failure_path(directory))


_loaded: dict[Path, KernelBuild] = {}


def load_kernel(root: Path | None = None, builder: Builder = _load_inline, build: bool = True) -> KernelBuild:
    """Load the kernel, building it first if this machine has not (with a log line: a compile takes
    tens of seconds); with `build=False` an unbuilt kernel is reported unusable instead.

    Never raises: any failure (no compiler, a compile error, an import error) is a `KernelBuild`
    with `fn=None` and the reason, logged as a warning. One load per process and directory. A build
    that failed before on this machine is not retried (`remembered_failure`)."""
    directory = build_dir(root)
    if directory in _loaded:
        return _loaded[directory]
    built = is_built(root)
    failed = remembered_failure(root)
    if failed is not None:
        return KernelBuild(None, failed)
    if not built and not build:
        return KernelBuild(None, "not built on this machine yet (areal-py run and serve build it before the roles "
                           "start)")
    if not built:
        log.info("building the decode attention kernel into %s (once per machine; a compile takes tens of seconds)",
                 directory)
    start = time.perf_counter()
    try:
        fn = _import_built(_module_name(), directory) if built and builder is _load_inline else \
            builder(_module_name(), directory)
    except Exception as e:  # noqa: BLE001 - a build may fail in any way; SDPA must keep the run going
        error = f"{type(e).__name__}: {str(e).strip()}"
        if not built:  # a compile failure repeats at every start: remember it (a load failure may not)
            record_failure(directory, error)
        result = KernelBuild(None, f"build/load failed: {error[:150]} ... {error[-150:]}" if len(error) > 300
                             else f"build/load failed: {error}", time.perf_counter() - start)
        log.warning("decode attention kernel unavailable (%s); using SDPA", result.reason)
    else:
        clear_failure(directory)
        seconds = time.perf_counter() - start
        result = KernelBuild(fn, "loaded" if built else f"built in {seconds:.0f}s", seconds)
        if not built:
            log.info("decode attention kernel %s", result.reason)
    _loaded[directory] = result
    return result


def decode_attention_ref(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                         lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel's contract in plain torch (row by row SDPA in fp64): what the tests compare against."""
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        n, s = int(lens[i]), int(slots[i])
        k, v = keys[s, :, :n].double(), values[s, :, :n].double()  # [Hkv, n, D]
        w = torch.softmax(q[i].double() @ k.transpose(1, 2) * scale, dim=-1)  # [Hkv, G, n]
        out[i] = (w @ v).to(q.dtype)
    return out
