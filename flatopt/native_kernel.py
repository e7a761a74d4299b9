"""Optional native CPU kernel for the LSTM update rule's in-place step.

The coordinate-wise LSTM is a tiny network applied to millions of coordinates, so in eager torch
its cost is dominated by memory traffic between operators: every gate, activation and product is a
separate pass over a buffer. This kernel instead streams the recurrent state once, one tile of
coordinates at a time: it loads a tile's state rows, transposes them so that each SIMD lane holds
one coordinate, runs both LSTM cells and the read-out in registers and a few kilobytes of stack, and
writes the new state back in place. Tiles are shared among torch's intra-op threads.

It is built with :func:`torch.utils.cpp_extension.load_inline` on first use and cached by torch (in
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), so the first step on a machine
takes about a minute longer. Where no C++ compiler or ninja is available, on Windows, or with the
environment variable ``FLATOPT_NATIVE=0``, or inside :func:`disabled`, :func:`load` returns ``None``
and callers use the torch implementation, which computes the same function.

Numerics: the gate rows come pre-scaled (see :mod:`flatopt.fused_step`) so that every sigmoid and
tanh is a rational function of one ``2^z``, computed as ``2^round(z)`` times a degree-5 polynomial;
``log`` is a Cephes-style polynomial approximation and reciprocals take one Newton step from the
hardware estimate on x86. All are within a few float32 ulps of the exact functions, well inside the
tolerance the tests hold both implementations to.
"""

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading

import torch

logger = logging.getLogger(__name__)

# The kernel is specialised for the released architecture: 20 units per cell.
HIDDEN_SIZE = 20

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr int kHidden = 20;
constexpr int kState = 4 * kHidden;  // (h1, c1, h2, c2) per coordinate
#if defined(__AVX512F__)
constexpr int kWidth = 16;
constexpr int kUnitsPerPass = 4;  // 16 gate accumulators of 32 vector registers
#elif defined(__AVX__)
constexpr int kWidth = 8;
constexpr int kUnitsPerPass = 2;  // 8 accumulators of 16 registers, leaving room for operands
#else
constexpr int kWidth = 4;
constexpr int kUnitsPerPass = 2;
#endif

// GCC/Clang vector extensions: portable SIMD, one coordinate per lane.
typedef float vf __attribute__((vector_size(4 * kWidth)));
typedef int32_t vi __attribute__((vector_size(4 * kWidth)));

// v - (+0) broadcasts v and, unlike v + 0, keeps the sign of -0.
inline vf splat(float v) { return v - vf{}; }
inline vf as_float(vi v) { return (vf)v; }
inline vi as_int(vf v) { return (vi)v; }
inline vf select(vi mask, vf a, vf b) { return as_float((mask & as_int(a)) | (~mask & as_int(b))); }

// 1 / d for d >= 1: the hardware estimate refined by one Newton step where there is one.
inline vf reciprocal(vf d) {
#if defined(__AVX512F__)
  const vf r = (vf)_mm512_rcp14_ps((__m512)d);
#elif defined(__AVX__)
  const vf r = (vf)_mm256_rcp_ps((__m256)d);
#else
  return 1.0f / d;
#endif
#if defined(__AVX__)
  return r * (2.0f - d * r);
#endif
}

// 2^t, with t clamped to [-60, 60] (NaN passes, so that a diverged network is seen as such by
// the caller): 2^round(t) times a degree-5 minimax polynomial for 2^f, |f| <= 1/2, within three
// float32 ulps. The clamp keeps products of two (1 + 2^t) finite and their reciprocals normal.
inline vf exp2_(vf t) {
#if defined(__AVX512F__)
  // max and min return their second operand when either is NaN.
  const __m512 x = _mm512_min_ps(_mm512_set1_ps(60.0f),
                                 _mm512_max_ps(_mm512_set1_ps(-60.0f), (__m512)t));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = (vf)_mm512_sub_ps(x, n);
#else
  t = select(t < -60.0f, splat(-60.0f), select(t > 60.0f, splat(60.0f), t));
  const vf round = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf shifted = t + round;
  const vf f = t - (shifted - round);
#endif
  vf p = splat(1.3276470561200016e-3f);
  p = p * f + 9.675541620213222e-3f;
  p = p * f + 5.5507132805070525e-2f;
  p = p * f + 2.402211971866276e-1f;
  p = p * f + 6.931469670588519e-1f;
  p = p * f + 1.0000000716556903f;
#if defined(__AVX512F__)
  return (vf)_mm512_scalef_ps((__m512)p, n);
#else
  // The integer in the low mantissa bits of `shifted`, as an exponent; a product keeps NaN.
  return p * as_float((as_int(shifted) - as_int(round) + 127) << 23);
#endif
}

inline vf log_(vf x) {  // Cephes logf, for normal x > 0
  vi bits = as_int(x);
  vi exponent = ((bits >> 23) & 0xFF) - 127;
  vf m = as_float((bits & 0x007FFFFF) | 0x3F800000);  // mantissa in [1, 2)
  vi high = m > 1.41421356f;  // move m to [sqrt(1/2), sqrt(2)); -1 where true
  m = select(high, m * 0.5f, m);
  vf e = __builtin_convertvector(exponent - high, vf);
  vf t = m - 1.0f;
  vf z = t * t;
  vf y = splat(7.0376836292e-2f);
  y = y * t - 1.1514610310e-1f;
  y = y * t + 1.1676998740e-1f;
  y = y * t - 1.2420140846e-1f;
  y = y * t + 1.4249322787e-1f;
  y = y * t - 1.6668057665e-1f;
  y = y * t + 2.0000714765e-1f;
  y = y * t - 2.4999993993e-1f;
  y = y * t + 3.3333331174e-1f;
  y = y * t * z;
  y = y - 2.12194440e-4f * e;
  y = y - 0.5f * z;
  return t + y + 0.693359375f * e;
}

struct Network {
  // Gate rows pre-scaled by the caller: by -log2(e) for i, f, o and -2 log2(e) for g.
  const float* w1;  // [unit][gate i, f, g, o][2 + kHidden]
  const float* b1;  // [unit][gate]
  const float* w2;  // [unit][gate][2 * kHidden]
  const float* b2;
  const float* wo;  // [unit]
  float bo, scale, threshold, p, exp_p, sign;
};

// One LSTM cell on a tile. Its input features are a[0..KA) then b[0..KB), each vector holding one
// feature of every lane; c is updated in place and the new hidden state written to h.
template <int KA, int KB>
inline void lstm_cell(const vf* a, const vf* b, vf* c, vf* h, const float* w, const float* bias) {
  constexpr int K = KA + KB;
  for (int j0 = 0; j0 < kHidden; j0 += kUnitsPerPass) {
    vf z[kUnitsPerPass * 4];
    for (int r = 0; r < kUnitsPerPass * 4; ++r) z[r] = splat(bias[4 * j0 + r]);
    const float* wj = w + 4 * j0 * K;
    for (int k = 0; k < KA; ++k) {
      const vf x = a[k];
      for (int r = 0; r < kUnitsPerPass * 4; ++r) z[r] += wj[r * K + k] * x;
    }
    for (int k = 0; k < KB; ++k) {
      const vf x = b[k];
      for (int r = 0; r < kUnitsPerPass * 4; ++r) z[r] += wj[r * K + KA + k] * x;
    }
    for (int u = 0; u < kUnitsPerPass; ++u) {
      // With the pre-scaled rows, sigmoid(x) = 1 / (1 + 2^z) and tanh(x) = (1 - 2^z) / (1 + 2^z);
      // sigmoid(i) tanh(g) and sigmoid(o) tanh(c) share one reciprocal each.
      const vf* g = z + 4 * u;
      const int j = j0 + u;
      const vf ei = exp2_(g[0]), ef = exp2_(g[1]), eg = exp2_(g[2]), eo = exp2_(g[3]);
      const vf cell =
          c[j] * reciprocal(1.0f + ef) + (1.0f - eg) * reciprocal((1.0f + ei) * (1.0f + eg));
      c[j] = cell;
      const vf ec = exp2_(cell * -2.88539008177792681f);  // -2 log2(e)
      h[j] = (1.0f - ec) * reciprocal((1.0f + eo) * (1.0f + ec));
    }
  }
}

inline float load_value(float v) { return v; }
inline float load_value(at::BFloat16 v) {
  uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void store_value(float& out, float v) { out = v; }
inline void store_value(at::BFloat16& out, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest even, as torch does; v is finite
  out.x = uint16_t(bits >> 16);
}

#if defined(__AVX512F__)
inline void transpose(__m512* r) {  // 16 x 16
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
  }
}
typedef __m512 Row;
inline Row load_row(const float* p) { return _mm512_loadu_ps(p); }
inline Row load_row(const at::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline void store_row(float* p, Row v) { _mm512_storeu_ps(p, v); }
inline void store_row(at::BFloat16* p, Row v) {
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
#define FLATOPT_TRANSPOSE 1
#elif defined(__AVX2__)
inline void transpose(__m256* r) {  // 8 x 8
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x31);
  }
}
typedef __m256 Row;
inline Row load_row(const float* p) { return _mm256_loadu_ps(p); }
inline Row load_row(const at::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline void store_row(float* p, Row v) { _mm256_storeu_ps(p, v); }
inline void store_row(at::BFloat16* p, Row v) {
  __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  // Pack the low halves of the eight 32-bit lanes: packus works per 128-bit lane, then reorder.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#define FLATOPT_TRANSPOSE 1
#endif

// Rows of n <= kWidth coordinates -> features[k][lane]; missing lanes are zero.
template <typename S>
inline void load_tile(const S* state, int n, vf* features) {
#if defined(FLATOPT_TRANSPOSE)
  if (n == kWidth) {
    for (int block = 0; block < kState / kWidth; ++block) {
      Row r[kWidth];
      for (int l = 0; l < kWidth; ++l) r[l] = load_row(state + l * kState + kWidth * block);
      transpose(r);
      std::memcpy(features + kWidth * block, r, sizeof(r));
    }
    return;
  }
#endif
  for (int k = 0; k < kState; ++k) {
    alignas(64) float lanes[kWidth];
    for (int l = 0; l < kWidth; ++l) lanes[l] = l < n ? load_value(state[l * kState + k]) : 0.0f;
    std::memcpy(features + k, lanes, sizeof(vf));
  }
}

template <typename S>
inline void store_tile(S* state, int n, const vf* features) {
#if defined(FLATOPT_TRANSPOSE)
  if (n == kWidth) {
    for (int block = 0; block < kState / kWidth; ++block) {
      Row r[kWidth];
      std::memcpy(r, features + kWidth * block, sizeof(r));
      transpose(r);
      for (int l = 0; l < kWidth; ++l) store_row(state + l * kState + kWidth * block, r[l]);
    }
    return;
  }
#endif
  for (int k = 0; k < kState; ++k) {
    alignas(64) float lanes[kWidth];
    std::memcpy(lanes, features + k, sizeof(vf));
    for (int l = 0; l < n; ++l) store_value(state[l * kState + k], lanes[l]);
  }
}

template <typename S>
void step_tile(const float* grad, S* state, float* update, int n, const Network& net, bool write) {
  // Feature-major tile: x[0..1] gradient features, then the state's rows (h1, c1, h2, c2).
  vf x[2 + kState];
  vf* const h1 = x + 2;
  vf* const c1 = h1 + kHidden;
  vf* const h2 = c1 + kHidden;
  vf* const c2 = h2 + kHidden;
  load_tile(state, n, h1);
  // 0 in lanes whose state is finite, NaN in the others: the cells would squash an infinite
  // state into a finite update, and the caller must see that the state is corrupt.
  vf corrupt[4] = {};
  for (int k = 0; k < kState; k += 4) {
    for (int a = 0; a < 4; ++a) corrupt[a] += h1[k + a] * 0.0f;
  }
  const vf state_check = (corrupt[0] + corrupt[1]) + (corrupt[2] + corrupt[3]);

  vf g;
  if (n == kWidth) {
    std::memcpy(&g, grad, sizeof(vf));
  } else {
    alignas(64) float lanes[kWidth];
    for (int l = 0; l < kWidth; ++l) lanes[l] = l < n ? grad[l] : 0.0f;
    std::memcpy(&g, lanes, sizeof(vf));
  }
  g *= net.sign;
  const vi sign_bit = vi{} + int32_t(0x80000000u);
  const vf magnitude = as_float(as_int(g) & ~sign_bit);
  const vi large = magnitude >= net.threshold;
  const vf log_part = log_(select(large, magnitude, splat(net.threshold))) / net.p;
  const vf sign = select(g > 0.0f, splat(1.0f), select(g < 0.0f, splat(-1.0f), splat(0.0f)));
  x[0] = select(large, log_part, splat(-1.0f));
  x[1] = select(large, sign, g * net.exp_p);

  vf h1_new[kHidden], h2_new[kHidden];
  lstm_cell<2 + kHidden, 0>(x, nullptr, c1, h1_new, net.w1, net.b1);
  lstm_cell<kHidden, kHidden>(h1_new, h2, c2, h2_new, net.w2, net.b2);

  vf u = splat(net.bo);
  for (int k = 0; k < kHidden; ++k) u += net.wo[k] * h2_new[k];
  u *= net.scale;
  u = select(state_check == state_check, u, state_check);
  if (n == kWidth) {
    std::memcpy(update, &u, sizeof(vf));
  } else {
    alignas(64) float lanes[kWidth];
    std::memcpy(lanes, &u, sizeof(vf));
    for (int l = 0; l < n; ++l) update[l] = lanes[l];
  }
  if (!write) return;

  std::memcpy(h1, h1_new, sizeof(h1_new));
  std::memcpy(h2, h2_new, sizeof(h2_new));
  store_tile(state, n, h1);
}

}  // namespace

void lstm_step(const at::Tensor& grad, const at::Tensor& state, const at::Tensor& update,
               const at::Tensor& weights, double output_bias, double output_scale,
               double threshold, double p, double exp_p, double sign, bool write_state) {
  const int64_t n = grad.numel();
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.dim() == 1 &&
              grad.is_contiguous(), "grad must be a contiguous 1-D float32 CPU tensor");
  TORCH_CHECK(state.device().is_cpu() && state.dim() == 2 && state.size(0) == n &&
              state.size(1) == kState && state.is_contiguous() &&
              (state.scalar_type() == at::kFloat || state.scalar_type() == at::kBFloat16),
              "state must be a contiguous (N, 80) float32 or bfloat16 CPU tensor");
  TORCH_CHECK(update.device().is_cpu() && update.scalar_type() == at::kFloat &&
              update.numel() == n && update.is_contiguous(),
              "update must be a contiguous float32 CPU tensor of N elements");
  const int64_t sizes[] = {4 * kHidden * (2 + kHidden), 4 * kHidden, 4 * kHidden * 2 * kHidden,
                           4 * kHidden, kHidden};
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous() &&
              weights.numel() == sizes[0] + sizes[1] + sizes[2] + sizes[3] + sizes[4],
              "weights must be the packed float32 network");
  const float* w = weights.data_ptr<float>();
  const Network net{w, w + sizes[0], w + sizes[0] + sizes[1], w + sizes[0] + sizes[1] + sizes[2],
                    w + sizes[0] + sizes[1] + sizes[2] + sizes[3], float(output_bias),
                    float(output_scale), float(threshold), float(p), float(exp_p),
                    float(sign)};
  const float* g = grad.data_ptr<float>();
  float* u = update.data_ptr<float>();
  const int64_t tiles = (n + kWidth - 1) / kWidth;
  auto run = [&](auto* s) {
    // About 1000 coordinates per task: large enough to amortise scheduling.
    at::parallel_for(0, tiles, 1024 / kWidth, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t start = t * kWidth;
        const int count = int(std::min<int64_t>(kWidth, n - start));
        step_tile(g + start, s + start * kState, u + start, count, net, write_state);
      }
    });
  };
  if (state.scalar_type() == at::kBFloat16) {
    run(state.data_ptr<at::BFloat16>());
  } else {
    run(state.data_ptr<float>());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_step", &lstm_step, "In-place step of the coordinate-wise LSTM update rule",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lanes", [] { return kWidth; }, "Coordinates per SIMD vector in this build");
}
"""

_lock = threading.Lock()
_kernel = None
_attempted = False
_disabled = 0


def load():
    """Return the compiled kernel module, building it on first use, or ``None`` if unavailable.

    A failed build is logged and not retried in this process.
    """
    global _kernel, _attempted
    if _disabled or os.environ.get("FLATOPT_NATIVE", "1") == "0":
        return None
    if not _attempted:
        with _lock:
            if not _attempted:
                _kernel = _build()
                _attempted = True
    return _kernel


@contextlib.contextmanager
def disabled():
    """Use the torch implementation inside the block, e.g. to test or time it on this machine.

    Affects every thread of the process while active.
    """
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def _build(extra_cflags=()):
    """Build the kernel, or return ``None``; ``extra_cflags`` select e.g. another instruction set."""
    if sys.platform == "win32":
        # The source relies on GCC/Clang vector extensions, which MSVC lacks.
        logger.info("flatopt's native step kernel is not built on Windows; using torch operators")
        return None
    flags = ["-O3"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=native")
    flags.extend(extra_cflags)
    attempts = [(flags, [])]
    if torch._C.has_openmp:
        # at::parallel_for is a header template: compiled without OpenMP it runs on one thread.
        # Linking -fopenmp names libgomp.so.1, which resolves to the copy torch has loaded.
        attempts.insert(0, ([*flags, "-fopenmp"], ["-fopenmp"]))
    from torch.utils.cpp_extension import load_inline

    for cflags, ldflags in attempts:
        name = f"flatopt_lstm_step_{_build_digest(cflags)}"
        logger.info(
            "building flatopt's native step kernel %s (once per machine; may take a minute)", name
        )
        try:
            with _build_guard(name), _quiet_torch_build_log():
                return load_inline(
                    name,
                    cpp_sources=_SOURCE,
                    extra_cflags=cflags,
                    extra_ldflags=ldflags,
                    verbose=False,
                )
        # No compiler, no ninja, no OpenMP, a failed build or load: try the next, then the torch
        # path.
        except Exception as exc:  # noqa: BLE001
            logger.info("flatopt's native step kernel %s is unavailable (%s)", name, exc)
    logger.info("using torch operators for the step")
    return None


@contextlib.contextmanager
def _build_guard(name):
    """Hold flatopt's lock on the build of ``name``, and clear a lock left by a killed build.

    torch marks a build in progress with an empty ``lock`` file in the build folder, which other
    processes wait on without limit and which a killed build never removes. flatopt builds under
    its own lock as well: an ``flock`` on a file beside it, which the operating system releases
    when its holder exits, however it exits. Whoever holds it is the only flatopt process
    building ``name``, so a torch lock present then was left by a killed build; a build in
    progress, however slow, is waited for and never broken. Where the lock cannot be taken (no
    ``fcntl``, a file system without ``flock``), the build goes on without it.
    """
    try:
        import fcntl

        from torch.utils import cpp_extension

        folder = cpp_extension._get_build_directory(name, False)
        handle = open(os.path.join(folder, "flatopt.lock"), "a")  # noqa: SIM115 (held below)
    # A private helper of torch's may change, a folder may be read-only: build as torch does.
    except Exception:  # noqa: BLE001
        yield
        return
    with handle:
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.warning(
                    "waiting for another process's build of flatopt's native step kernel (%s)",
                    folder,
                )
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            yield
            return
        lock = os.path.join(folder, "lock")
        if os.path.exists(lock):
            logger.warning(
                "removing the build lock %s, left by an interrupted build of flatopt's native "
                "step kernel",
                lock,
            )
            with contextlib.suppress(OSError):
                os.remove(lock)
        yield  # the flock goes with the file


@contextlib.contextmanager
def _quiet_torch_build_log():
    """Pass torch's build warnings (e.g. about an unexpected compiler) to this module's log.

    A failed build is not an error for flatopt, which then uses torch operators, so what torch
    says about it goes to flatopt's logger at INFO level instead of the user's console.
    """
    source = logging.getLogger("torch.utils.cpp_extension")

    def divert(record):
        if record.levelno >= logging.WARNING:
            logger.info("torch, building the kernel: %s", record.getMessage())
            return False
        return True

    source.addFilter(divert)
    try:
        yield
    finally:
        source.removeFilter(divert)


def _build_digest(flags):
    # -march=native code may not run on another CPU, so a cache shared between machines (e.g. a
    # home directory on a network file system) keeps one build per instruction set.
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            cpu = next((line for line in cpuinfo if line.startswith("flags")), cpu)
    except OSError:
        pass
    text = "\0".join([_SOURCE, *flags, cpu, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
