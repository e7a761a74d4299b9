"""Optional native CPU kernel for the LSTM update rule's in-place step.

The coordinate-wise LSTM is a tiny network applied to millions of coordinates, so in eager torch
its cost is dominated by memory traffic between operators: every gate, activation and product is a
separate pass over a buffer. This kernel instead streams the recurrent state once, one tile of
coordinates at a time: it loads a tile's state rows, transposes them so that each SIMD lane holds
one coordinate, runs both LSTM cells and the read-out in registers and a few kilobytes of stack, and
writes the new state back in place.

It is built with :func:`torch.utils.cpp_extension.load_inline` on first use and cached by torch (in
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), so the first step on a machine
takes about a minute longer. Where no C++ compiler or ninja is available, on Windows, or with the
environment variable ``FLATOPT_NATIVE=0``, or inside :func:`disabled`, :func:`load` returns ``None``
and callers use the torch implementation, which computes the same function.

Numerics: ``exp`` and ``log`` are Cephes-style polynomial approximations, ``tanh`` is a rational
approximation and reciprocals use one Newton step on AVX-512; all are within a few float32 ulps of
the exact functions, well inside the tolerance the tests hold the torch implementation to.
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
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kHidden = 20;
constexpr int kState = 4 * kHidden;  // (h1, c1, h2, c2) per coordinate
constexpr int kInput1 = 2 + kHidden;  // cell 1 sees [x0, x1, h1]
constexpr int kInput2 = 2 * kHidden;  // cell 2 sees [h1, h2]
// Units whose four gates are accumulated together: 16 accumulators stay in registers.
constexpr int kUnitsPerPass = 4;
#if defined(__AVX512F__)
constexpr int kWidth = 16;
#elif defined(__AVX__)
constexpr int kWidth = 8;
#else
constexpr int kWidth = 4;
#endif

// GCC/Clang vector extensions: portable SIMD, one coordinate per lane.
typedef float vf __attribute__((vector_size(4 * kWidth)));
typedef int32_t vi __attribute__((vector_size(4 * kWidth)));

// v - (+0) broadcasts v and, unlike v + 0, keeps the sign of -0.
inline vf splat(float v) { return v - vf{}; }
inline vf as_float(vi v) { return (vf)v; }
inline vi as_int(vf v) { return (vi)v; }
inline vf select(vi mask, vf a, vf b) { return as_float((mask & as_int(a)) | (~mask & as_int(b))); }
// Clamps that let NaN through, so that a diverged network is seen as such by the caller.
inline vf clamp(vf x, float lo, float hi) {
  return select(x < lo, splat(lo), select(x > hi, splat(hi), x));
}
inline vf reciprocal(vf d) {
#if defined(__AVX512F__)
  vf r = (vf)_mm512_rcp14_ps((__m512)d);
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

inline vf exp_(vf x) {  // Cephes expf: exp(x) = 2^n exp(r), |r| <= ln(2) / 2
  x = clamp(x, -87.0f, 88.0f);
  const vf round = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + round) - round;
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vf y = p * (r * r) + r + 1.0f;
  return y * as_float((__builtin_convertvector(n, vi) + 127) << 23);
}

inline vf sigmoid_(vf x) { return reciprocal(1.0f + exp_(-x)); }

// Rational minimax approximation; beyond the clamp, tanh is 1 to float precision.
inline vf tanh_(vf x) {
  x = clamp(x, -7.90531110763549805f, 7.90531110763549805f);
  vf x2 = x * x;
  vf p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  vf q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p * reciprocal(q);
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
  const float* w1;  // [unit][gate i, f, g, o][kInput1]
  const float* b1;  // [unit][gate]
  const float* w2;  // [unit][gate][kInput2]
  const float* b2;
  const float* wo;  // [unit]
  float bo, scale, threshold, p, exp_p, sign;
};

// One LSTM cell on a tile: in[k] holds input feature k of every lane; c is updated in place.
template <int K>
inline void lstm_cell(const vf* in, vf* c, vf* h, const float* w, const float* b) {
  for (int j0 = 0; j0 < kHidden; j0 += kUnitsPerPass) {
    vf z[kUnitsPerPass * 4];
    for (int r = 0; r < kUnitsPerPass * 4; ++r) z[r] = splat(b[4 * j0 + r]);
    const float* wj = w + 4 * j0 * K;
    for (int k = 0; k < K; ++k) {
      const vf x = in[k];
      for (int r = 0; r < kUnitsPerPass * 4; ++r) z[r] += wj[r * K + k] * x;
    }
    for (int u = 0; u < kUnitsPerPass; ++u) {
      const vf* g = z + 4 * u;
      const int j = j0 + u;
      const vf cell = sigmoid_(g[1]) * c[j] + sigmoid_(g[0]) * tanh_(g[2]);
      c[j] = cell;
      h[j] = sigmoid_(g[3]) * tanh_(cell);
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
inline void transpose16(__m512* r) {
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
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
#endif

// Rows of n <= kWidth coordinates -> feature-major tile[feature][lane]; missing lanes are zero.
template <typename S>
inline void load_tile(const S* state, int n, float (*tile)[kWidth]) {
#if defined(__AVX512F__)
  if (n == kWidth) {
    for (int block = 0; block < kState / 16; ++block) {
      __m512 r[16];
      for (int l = 0; l < 16; ++l) r[l] = load16(state + l * kState + 16 * block);
      transpose16(r);
      for (int k = 0; k < 16; ++k) _mm512_store_ps(tile[16 * block + k], r[k]);
    }
    return;
  }
#endif
  for (int l = 0; l < kWidth; ++l)
    for (int k = 0; k < kState; ++k) tile[k][l] = l < n ? load_value(state[l * kState + k]) : 0.0f;
}

template <typename S>
inline void store_tile(S* state, int n, const float (*tile)[kWidth]) {
#if defined(__AVX512F__)
  if (n == kWidth) {
    for (int block = 0; block < kState / 16; ++block) {
      __m512 r[16];
      for (int k = 0; k < 16; ++k) r[k] = _mm512_load_ps(tile[16 * block + k]);
      transpose16(r);
      for (int l = 0; l < 16; ++l) store16(state + l * kState + 16 * block, r[l]);
    }
    return;
  }
#endif
  for (int l = 0; l < n; ++l)
    for (int k = 0; k < kState; ++k) store_value(state[l * kState + k], tile[k][l]);
}

inline void vector_from(vf& out, const float* values) { std::memcpy(&out, values, sizeof(vf)); }
inline void vector_to(float* values, const vf& v) { std::memcpy(values, &v, sizeof(vf)); }

template <typename S>
void step_tile(const float* grad, S* state, float* update, int n, const Network& net, bool write) {
  alignas(64) float tile[kState][kWidth];
  load_tile(state, n, tile);
  // in[0..1]: gradient features, in[2..21]: h1, in[22..41]: h2, so that cell 1 reads in[0..21]
  // and, once h1 is replaced by its new value, cell 2 reads in[2..41].
  vf in[2 + 2 * kHidden], c1[kHidden], c2[kHidden], h_new[kHidden];
  for (int k = 0; k < kHidden; ++k) {
    vector_from(in[2 + k], tile[k]);
    vector_from(c1[k], tile[kHidden + k]);
    vector_from(in[2 + kHidden + k], tile[2 * kHidden + k]);
    vector_from(c2[k], tile[3 * kHidden + k]);
  }

  alignas(64) float lanes[kWidth];
  for (int l = 0; l < kWidth; ++l) lanes[l] = l < n ? net.sign * grad[l] : 0.0f;
  vf g;
  vector_from(g, lanes);
  const vi sign_bit = vi{} + int32_t(0x80000000u);
  const vf magnitude = as_float(as_int(g) & ~sign_bit);
  const vi large = magnitude >= net.threshold;
  const vf log_part = log_(select(large, magnitude, splat(net.threshold))) / net.p;
  const vf sign = select(g > 0.0f, splat(1.0f), select(g < 0.0f, splat(-1.0f), splat(0.0f)));
  in[0] = select(large, log_part, splat(-1.0f));
  in[1] = select(large, sign, g * net.exp_p);

  lstm_cell<kInput1>(in, c1, h_new, net.w1, net.b1);
  for (int k = 0; k < kHidden; ++k) in[2 + k] = h_new[k];
  lstm_cell<kInput2>(in + 2, c2, h_new, net.w2, net.b2);

  vf u = splat(net.bo);
  for (int k = 0; k < kHidden; ++k) u += net.wo[k] * h_new[k];
  vector_to(lanes, u * net.scale);
  for (int l = 0; l < n; ++l) update[l] = lanes[l];
  if (!write) return;

  for (int k = 0; k < kHidden; ++k) {
    vector_to(tile[k], in[2 + k]);
    vector_to(tile[kHidden + k], c1[k]);
    vector_to(tile[2 * kHidden + k], h_new[k]);
    vector_to(tile[3 * kHidden + k], c2[k]);
  }
  store_tile(state, n, tile);
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
  const int64_t sizes[] = {4 * kHidden * kInput1, 4 * kHidden, 4 * kHidden * kInput2, 4 * kHidden,
                           kHidden};
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


def _build():
    if sys.platform == "win32":
        # The source relies on GCC/Clang vector extensions, which MSVC lacks.
        logger.info("flatopt's native step kernel is not built on Windows; using torch operators")
        return None
    flags = ["-O3"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=native")
    name = f"flatopt_lstm_step_{_build_digest(flags)}"
    logger.info(
        "building flatopt's native step kernel %s (once per machine; may take a minute)", name
    )
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(name, cpp_sources=_SOURCE, extra_cflags=flags, verbose=False)
    # No compiler, no ninja, a failed build or load: each means the torch path.
    except Exception as exc:  # noqa: BLE001
        logger.info("flatopt's native step kernel is unavailable (%s); using torch operators", exc)
        return None


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
