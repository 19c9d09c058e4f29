// The per-element math of a GR step, written once for the CUDA kernels (cuda.cu) and the
// host loops (host.cpp). It follows the reference phases (tests/reference_phases.py, the
// torch backend's math written out op by op) operation by operation, so that every rounding
// happens where the reference rounds. Where torch
// fuses a multiply and an add (add(..., alpha=s) and addcmul run as one FMA in ATen's
// vectorized CPU kernels and on GPUs) these call grf_fma; nothing else is fused (the host is
// compiled with -ffp-contract=off, nvcc with --fmad=false), so the host build and the CUDA
// kernels give the same bits.
//
//   perturb   backup = θ;  θ = θ + eps·w·g (w = θ² if adaptive else 1);  g = fold·g
//   reflect   θ = 2·backup − θ;  g = −g
//   sgd       g = gscale·G (+ wd·backup);  buf = g on the first step else μ·buf + (1−damp)·g;
//             d = g + μ·buf (nesterov) or buf;  θ = backup − lr·d
//   adamw     step += 1;  θ = backup·(1 − lr·wd);  m = m + (1−β1)·(g − m);
//             v = β2·v + (1−β2)·g²;  θ = θ − (lr/(1−β1^step))·m/(√v/√(1−β2^step) + eps),
//             lr/(1−β1^step) and √(1−β2^step) in double from the step count, each rounded
//             once (as torch.optim.AdamW computes them)
//   none      θ = backup;  G = g
// interval=k (grf_api.h's UpdateKind): a refresh's update first caches the direction
// d = G·a + d·c (d held g1); between refreshes g = G·u + d·v and the base update starts from
// θ itself instead of the backup.
//
// Storage types are float, double and two 16-bit types (half_t, bf16_t); the math runs in
// float (double for double), and each result is rounded once, to nearest even, on store.
// This header needs no CUDA header: g++ compiles it for the host build.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "grf_api.h"

#ifdef __CUDACC__
#define GRF_HD __host__ __device__ __forceinline__
#define GRF_UNROLL _Pragma("unroll")
#else
#define GRF_HD inline __attribute__((always_inline))
#define GRF_UNROLL _Pragma("GCC unroll 16")
#endif

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace grf {

// ---------------------------------------------------------------- storage types
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

template <class T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };
template <class T> using compute_t = typename Compute<T>::type;

GRF_HD uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
GRF_HD float bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// IEEE half <-> float on the host (the device uses the hardware conversions).
GRF_HD float half_bits_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));      // inf / NaN
  if (exp == 0) {                                                              // zero / subnormal
    float mag = float(man) * 5.9604644775390625e-8f;                           // man · 2^-24, exact
    return sign ? -mag : mag;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));                // rebias 15 -> 127
}

GRF_HD uint16_t float_to_half_bits(float f) {  // round to nearest, ties to even
  uint32_t x = float_bits(f);
  uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;                 // NaN stays NaN (quiet)
  if (ax >= 0x477ff000u) return sign | 0x7c00u;                // ≥ 65520 (or inf) -> inf
  if (ax >= 0x38800000u)                                       // normal half: ≥ 2^-14
    return sign | uint16_t((ax + 0xfffu + ((ax >> 13) & 1u) - (112u << 23)) >> 13);
  uint32_t exp = ax >> 23;                                     // subnormal half or zero
  if (exp < 102) return sign;                                  // ≤ 2^-25: rounds to ±0
  uint32_t man = (ax & 0x7fffffu) | 0x800000u, shift = 126 - exp;   // shift in [14, 24]
  uint32_t q = man >> shift, rest = man & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rest > half || (rest == half && (q & 1u))) ++q;
  return sign | uint16_t(q);
}

GRF_HD float bf16_bits_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

GRF_HD uint16_t float_to_bf16_bits(float f) {  // round to nearest, ties to even
  uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet NaN
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

GRF_HD float to_c(float v) { return v; }
GRF_HD double to_c(double v) { return v; }
GRF_HD float to_c(half_t v) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(v.bits));
#else
  return half_bits_to_float(v.bits);
#endif
}
GRF_HD float to_c(bf16_t v) {
#ifdef __CUDA_ARCH__
  return __bfloat162float(__ushort_as_bfloat16(v.bits));
#else
  return bf16_bits_to_float(v.bits);
#endif
}

template <class T> GRF_HD T from_c(compute_t<T> v) { return T(v); }
template <> GRF_HD half_t from_c<half_t>(float v) {
#ifdef __CUDA_ARCH__
  return half_t{__half_as_ushort(__float2half_rn(v))};
#else
  return half_t{float_to_half_bits(v)};
#endif
}
template <> GRF_HD bf16_t from_c<bf16_t>(float v) {
#ifdef __CUDA_ARCH__
  return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(v))};
#else
  return bf16_t{float_to_bf16_bits(v)};
#endif
}

GRF_HD float grf_sqrt(float x) { return sqrtf(x); }
GRF_HD double grf_sqrt(double x) { return sqrt(x); }
GRF_HD float grf_fma(float a, float b, float c) { return fmaf(a, b, c); }
GRF_HD double grf_fma(double a, double b, double c) { return fma(a, b, c); }

// ---------------------------------------------------------------- phase 1: the norm
// Σ g² (Σ (θ·g)² when adaptive): the term of one element. θ·g is a product in the compute
// type (as torch's _foreach_mul), its square and the sum are in double, so no finite fp32
// gradient overflows; an inf or NaN element makes the sum non-finite, which is how the step
// finds found_inf without another pass.
template <class C> GRF_HD double sq_term(C theta, C g, bool adaptive) {
  const double x = adaptive ? double(theta * g) : double(g);
  return x * x;
}

// ---------------------------------------------------------------- phase 2
template <class C> GRF_HD void perturb_elem(C theta, C g, C eps, C fold, bool adaptive,
                                            C& theta_out, C& g_out) {
  C step = g * eps;
  if (adaptive) step = step * (theta * theta);
  theta_out = theta + step;
  g_out = g * fold;
}

template <class C> GRF_HD C reflect_theta(C theta, C backup) { return backup * C(2) - theta; }

// ---------------------------------------------------------------- phase 3
// The combined, unscaled, clipped gradient g = gscale·G (AMP's 1/S and the clip factor are
// folded into gscale by gr_fused/_scalars.py; inf/NaN was found by the norm of G).
template <class C> GRF_HD C combined_grad(C G, C gscale) { return G * gscale; }

// interval=k, a refresh: the direction to cache, G·a + g1·c (d holds g1 saved by perturb).
template <class C> GRF_HD C cache_direction(C G, C d, C a, C c) { return G * a + d * c; }

// interval=k between refreshes: g = G·u + v̂·v (G holds g1, d the cached direction v̂).
template <class C> GRF_HD C reuse_grad(C G, C d, C u, C v) { return G * u + d * v; }

// A learning rate as torch.optim reads it: a Python float, or the value of a 0-dim tensor
// (read here, in the kernel: no host sync), as a double.
GRF_HD double lr_value(const Lr& lr) {
  if (lr.at == 0) return lr.value;
  if (lr.dtype == kF64) return *reinterpret_cast<const double*>(lr.at);
  return double(*reinterpret_cast<const float*>(lr.at));
}

// Hyperparameters arrive as Python floats (double); torch rounds each scalar operand to
// the tensor's compute dtype before it multiplies, and so do these.
enum MomentumMode { kNoMomentum = 0, kFirstMomentum = 1, kWithMomentum = 2 };

template <class C> struct SgdHp {
  C neg_lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov;
};

template <class C> GRF_HD SgdHp<C> make_sgd_hp(double lr, double momentum, double dampening,
                                               double weight_decay, bool nesterov) {
  return SgdHp<C>{C(-lr), C(momentum), C(1.0 - dampening), C(weight_decay), nesterov};
}

// Returns the new θ from the combined gradient g and the θ it starts from (the backup, or θ
// itself between interval=k refreshes). MODE (a MomentumMode): buf is read only with
// kWithMomentum and written unless kNoMomentum (kFirstMomentum: the step that creates the
// buffer, buf = g).
template <int MODE, class C>
GRF_HD C sgd_elem(C g, C theta0, C& buf, const SgdHp<C>& h) {
  if (h.weight_decay != C(0)) g = grf_fma(theta0, h.weight_decay, g);  // g.add(θ, alpha=wd)
  C d = g;
  if (MODE != kNoMomentum) {
    // buf.mul(μ).add_(g, alpha=1−damp), and g.add(buf, alpha=μ) for nesterov
    buf = MODE == kFirstMomentum ? g : grf_fma(g, h.one_minus_dampening, buf * h.momentum);
    d = h.nesterov ? grf_fma(buf, h.momentum, g) : buf;
  }
  return grf_fma(d, h.neg_lr, theta0);  // θ.add(d, alpha=−lr)
}

template <class C> struct AdamHp {
  C beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay;  // decay = 1 − lr·wd
};

template <class C> GRF_HD AdamHp<C> make_adam_hp(double lr, double beta1, double beta2,
                                                 double eps, double weight_decay) {
  return AdamHp<C>{C(beta1), C(beta2), C(1.0 - beta1), C(1.0 - beta2), C(eps),
                   C(1.0 - lr * weight_decay)};
}

// The bias corrections of the step count `step` (already incremented) as torch.optim.AdamW
// computes them (its single-tensor and foreach code with Python numbers, its fused kernels
// in double): β^step, 1 − β^step, lr/(1 − β1^step) and √(1 − β2^step) in double, each result
// rounded once to C. (libm's pow is correctly rounded; CUDA's double pow is within 2 ulps of
// double, so the rounded results agree but where a value falls within 2⁻⁵⁰ of a rounding
// boundary of C.)
template <class C> struct AdamStep { C step_size, bc2_sqrt; };

template <class C> GRF_HD AdamStep<C> adam_step(double step, double lr, double beta1,
                                                double beta2) {
  const double bc1 = 1.0 - pow(beta1, step);
  const double bc2 = 1.0 - pow(beta2, step);
  return AdamStep<C>{C(lr / bc1), C(sqrt(bc2))};
}

// Returns the new θ from the combined gradient g and the θ it starts from; updates m and v.
template <class C> GRF_HD C adamw_elem(C g, C theta0, C& m, C& v, const AdamHp<C>& h,
                                       const AdamStep<C>& s) {
  C theta = theta0 * h.decay;
  m = grf_fma(g - m, h.one_minus_beta1, m);               // m.add(g − m, alpha=1−β1)
  v = grf_fma(h.one_minus_beta2 * g, g, v * h.beta2);     // (v·β2).addcmul(g, g, 1−β2)
  C denom = grf_sqrt(v) / s.bc2_sqrt + h.eps;
  return theta - (s.step_size * m) / denom;
}

// ---------------------------------------------------------------- step scalars
// gr_fused/_scalars.py, from the norms' double sums. The host build and the CUDA norm's
// one-block finalize kernels compute them where the sums are formed, so a step runs no
// separate scalar ops (a one-group GR step on the CUDA kernels is 6 launches). Each
// operation rounds where torch's does: a Python number divided by a tensor, c / x, is x⁻¹·c.
constexpr double kNormEps = 1e-12;  // _scalars.NORM_EPS
constexpr double kClipEps = 1e-6;   // _scalars.CLIP_EPS

// 1/S as torch computes it (a float32 reciprocal), in the compute type; 1 without AMP.
template <class C> GRF_HD C inverse_scale(const float* scale) {
  return scale != nullptr ? C(1.0f / *scale) : C(1);
}

// false for inf and NaN (no fast-math anywhere, so x − x is not folded to 0)
GRF_HD bool is_finite(double x) { return x - x == 0.0; }

// _scalars.ascent_scalars and the driver's signs: out = {eps·eps_sign, fold,
// combine·combine_sign} from Σg1² (`sq`, a double); `scale` is the AMP scale S or null. The
// norm is the double square root rounded once to C.
template <class C> GRF_HD void ascent_scalars_of(double sq, const float* scale,
                                                 const AscentHp& h, C* out) {
  const C inv = inverse_scale<C>(scale);
  C norm = C(sqrt(sq));
  if (scale != nullptr) norm = norm * inv;
  const C eps = h.normalize ? (C(1) / (norm + C(kNormEps))) * C(h.rho) : C(h.rho);
  const C a = h.fixed_alpha ? C(h.alpha) : (C(1) / eps) * C(h.gamma);
  const C scaled_eps = scale != nullptr ? eps * inv : eps;
  out[0] = scaled_eps * C(h.eps_sign);
  out[1] = h.central ? (C(1) / a) * C(2) : (C(1) - a) / a;
  out[2] = (h.central ? a * C(-0.5) : a) * C(h.combine_sign);
}

// _scalars.update_scalars over `groups` param groups: sq[g] is group g's ‖G‖² (double),
// ascent holds each group's row {eps, fold, combine}. out[g] = gscale of group g,
// out[groups] = found_inf (the double Σ_g ‖G_g‖² is not finite); clipping
// (clip_grad_norm_ over all groups) scales every gscale by one factor from
// ‖g‖² = Σ_g double(gscale_g)²·‖G_g‖², summed in double and its root rounded once to C.
template <class C> GRF_HD void update_scalars_of(const double* sq, const C* ascent, int groups,
                                                 const float* scale, bool clip,
                                                 double max_norm, C* out) {
  const C inv = inverse_scale<C>(scale);
  double total = 0, clip_total = 0;
  for (int g = 0; g < groups; ++g) {
    const C gscale = scale != nullptr ? ascent[3 * g + 2] * inv : ascent[3 * g + 2];
    const double w = double(gscale);
    total += sq[g];
    clip_total += w * w * sq[g];
    out[g] = gscale;
  }
  if (clip) {  // min(max_norm / (‖g‖ + 1e-6), 1); NaN stays NaN
    const C norm = C(sqrt(clip_total));
    C coef = (C(1) / (norm + C(kClipEps))) * C(max_norm);
    coef = coef > C(1) ? C(1) : coef;
    for (int g = 0; g < groups; ++g) out[g] = out[g] * coef;
  }
  out[groups] = is_finite(total) ? C(0) : C(1);
}

// interval=k, at a refresh: _scalars.direction_scalars over `groups` param groups. sums[g] =
// {Σ G², Σ G·g1, Σ g1²} of group g (double; g1 as perturb saved it), ascent its row {eps,
// fold, combine}, signs[g] its combine sign, `scale` the AMP scale S or null. In the frame
// of the update g = A·G, g1 = B·(saved g1) with A = combine/S, B = sign/S (double); v = g −
// β·g1, β = P/Q, P = Σ A·B·ΣGg1, Q = Σ B²·Σg1², ‖v‖² = Σ A²·ΣG² − 2β·A·B·ΣGg1 + β²·B²·Σg1².
// coefs[2g], coefs[2g + 1] = (a, c) = (A, −β·B)/‖v‖ rounded to C; returns whether there is a
// direction (‖v‖² finite and > 2^-23·‖g‖²: 1, else 0 and the coefficients 0). Every operation in
// _scalars.py's order.
template <class C> GRF_HD C direction_scalars_of(const double (*sums)[3], const C* ascent,
                                                 const double* signs, int groups,
                                                 const float* scale, C* coefs) {
  const double sc = scale != nullptr ? double(1.0f / *scale) : 1.0;
  double A[kMaxGroups], B[kMaxGroups], P = 0, Q = 0;
  for (int g = 0; g < groups; ++g) {
    A[g] = double(ascent[3 * g + 2]) * sc;
    B[g] = signs[g] * sc;
    P += A[g] * B[g] * sums[g][1];
    Q += B[g] * B[g] * sums[g][2];
  }
  const double beta = Q > 0 ? P / Q : 0.0;
  double v2 = 0, g2 = 0;
  for (int g = 0; g < groups; ++g) {
    v2 += A[g] * A[g] * sums[g][0] - 2 * beta * A[g] * B[g] * sums[g][1] +
          beta * beta * B[g] * B[g] * sums[g][2];
    g2 += A[g] * A[g] * sums[g][0];
  }
  // below kDirectionTol·‖g‖², ‖v‖² is rounding, not a direction (_scalars.DIRECTION_TOL)
  const double kDirectionTol = 1.1920928955078125e-07;  // 2^-23
  const bool ok = is_finite(v2) && v2 > kDirectionTol * g2;
  const double inv_norm = ok ? 1.0 / sqrt(v2 < 1e-300 ? 1e-300 : v2) : 0.0;  // rsqrt
  for (int g = 0; g < groups; ++g) {
    coefs[2 * g] = C(A[g] * inv_norm);
    coefs[2 * g + 1] = C(-beta * B[g] * inv_norm);
  }
  return ok ? C(1) : C(0);
}

// interval=k between refreshes: _scalars.reuse_scalars over `groups` param groups. sums[g] =
// {Σ g1², Σ g1·v̂, Σ v̂²} (g1 scaled by S like the grads), signs[g] and reuse_scales[g] the
// group's combine sign and reuse_scale, `valid` 1 when a direction is cached. u = sign/S,
// v = reuse_scale·‖g1‖·valid with ‖g1‖ the global unscaled norm (double); clipping scales
// both by one factor from ‖g‖² = Σ u²·Σg1² + 2u·v·Σg1v̂ + v²·Σv̂². out[2g], out[2g + 1] =
// (u, v) rounded to C; out[2·groups] = found_inf (Σ g1² not finite).
template <class C> GRF_HD void reuse_scalars_of(const double (*sums)[3], int groups,
                                                const double* signs, const double* reuse_scales,
                                                const float* scale, C valid, bool clip,
                                                double max_norm, C* out) {
  const double sc = scale != nullptr ? double(1.0f / *scale) : 1.0;
  double total = 0;
  for (int g = 0; g < groups; ++g) total += sums[g][0];
  const double norm = sqrt(total) * sc;
  double u[kMaxGroups], v[kMaxGroups];
  for (int g = 0; g < groups; ++g) {
    u[g] = signs[g] * sc;
    v[g] = reuse_scales[g] * norm * double(valid);
  }
  if (clip) {  // min(max_norm / (‖g‖ + 1e-6), 1) in C; NaN stays NaN
    double g_sq = 0;
    for (int g = 0; g < groups; ++g)
      g_sq += u[g] * u[g] * sums[g][0] + 2 * u[g] * v[g] * sums[g][1] +
              v[g] * v[g] * sums[g][2];
    const C norm_g = C(sqrt(g_sq));
    C coef = (C(1) / (norm_g + C(kClipEps))) * C(max_norm);
    coef = coef > C(1) ? C(1) : coef;
    for (int g = 0; g < groups; ++g) {
      u[g] = u[g] * double(coef);
      v[g] = v[g] * double(coef);
    }
  }
  for (int g = 0; g < groups; ++g) {
    out[2 * g] = C(u[g]);
    out[2 * g + 1] = C(v[g]);
  }
  out[2 * groups] = is_finite(total) ? C(0) : C(1);
}

// The optimizer's skip records (SkipRecord in gr_fused/backends/base.py): the count grows by
// found_inf, `last` is set to it and the GradScaler's flag (or null) is raised to it.
template <class C> GRF_HD void record_skip(C found_inf, int64_t* count, bool* last,
                                           float* scaler_flag) {
  const bool skipped = found_inf != C(0);
  *count += skipped ? 1 : 0;
  *last = skipped;
  if (scaler_flag != nullptr && skipped && *scaler_flag < 1.0f) *scaler_flag = 1.0f;  // max
}

// AdamW's per-tensor step counts: each advances by one unless the step is skipped or the
// tensor is frozen (`ptrs`: a table's address rows, `tensors` of them).
GRF_HD void advance_step(const int64_t* ptrs, int64_t tensors, int64_t t, bool skipped) {
  if (skipped || (ptrs[kFlags * tensors + t] & kFrozen)) return;
  float* step = reinterpret_cast<float*>(ptrs[kStep * tensors + t]);
#ifdef __CUDA_ARCH__
  __builtin_assume(__isGlobal(step));  // a tensor's address: global memory (LDG/STG)
#endif
  *step += 1.0f;
}

}  // namespace grf
