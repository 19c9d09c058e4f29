// What each phase reads and writes per element, for the CUDA kernels (cuda.cu) and the
// host loops (host.cpp). An op is a small struct of pointers:
//
//   prepare()          reads the step scalars (eps, fold, gscale, found_inf, step) from
//                      memory; a CUDA thread calls it once, the host once per call
//   skipped()          after prepare(): true when found_inf is set (phase 3 only)
//   apply<V>(i)        processes elements i .. i+V-1 (V > 1 only on 16-byte aligned data)
//   apply_skipped<V>(i)  the same when skipped(): θ = backup, state untouched
//   accumulate<V>(i,a) the norm: adds the terms of elements i .. i+V-1 into lanes a[0..V)
//
// The arithmetic itself is in grf_math.h; the drivers (grid-stride kernels, OpenMP loops)
// decide which i each thread visits. Flags that decide which memory is touched (adaptive,
// the momentum mode) are template parameters and skipped() is tested once per loop, so the
// inner loops have no branches and the host compiler vectorizes them.
#pragma once

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "grf_api.h"
#include "grf_math.h"

#if defined(__AVX2__) && !defined(__CUDA_ARCH__)
#include <immintrin.h>
#define GRF_STREAM_STORES 1  // the host build's AVX2 compilation
#endif

namespace grf {

// V consecutive elements, loaded or stored with one 16-byte access when V·sizeof(T) == 16.
template <class T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

// Elements per 16-byte pack (4 floats, 8 halves, 2 doubles), used when every buffer of a
// call is 16-byte aligned; the drivers run V = 1 otherwise.
template <class T> constexpr int vec_width() { return 16 / int(sizeof(T)); }

// A raw address from Python as a typed pointer.
template <class T> T* as(ptr p) { return reinterpret_cast<T*>(p); }

// The alignment every buffer of a call shares, as the drivers use it: 32 or 16 bytes, else 1.
inline int alignment(std::initializer_list<uintptr_t> ptrs) {
  uintptr_t bits = 0;
  for (uintptr_t p : ptrs) bits |= p;
  return bits % 32 == 0 ? 32 : bits % 16 == 0 ? 16 : 1;
}

inline bool aligned16(std::initializer_list<uintptr_t> ptrs) { return alignment(ptrs) >= 16; }

template <int V, class T> GRF_HD Pack<T, V> ld(const T* p, int64_t i) {
  if constexpr (V == 1) {
    return Pack<T, 1>{{p[i]}};
  } else {
    return *reinterpret_cast<const Pack<T, V>*>(p + i);
  }
}

template <int V, class T> GRF_HD void st(T* p, int64_t i, const Pack<T, V>& x) {
  if constexpr (V == 1) {
    p[i] = x.v[0];
  } else {
    *reinterpret_cast<Pack<T, V>*>(p + i) = x;
  }
}

// A store to a buffer the phase does not read: on an AVX2 host a 32-byte pack goes out as a
// non-temporal store, which does not first read the line into the cache (the host build's
// perturb into the backup: that phase takes about 0.85× the time). Anywhere else, st. The
// host driver runs such ops in 32-byte packs on 32-byte aligned buffers and fences the
// stores at the end of each chunk (streams_v, host.cpp).
template <int V, class T> GRF_HD void st_stream(T* p, int64_t i, const Pack<T, V>& x) {
#ifdef GRF_STREAM_STORES
  if constexpr (sizeof(T) * V == 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p + i),
                        _mm256_load_si256(reinterpret_cast<const __m256i*>(x.v)));
    return;
  }
#endif
  st<V>(p, i, x);
}

// Whether an op writes a buffer with st_stream (its `static constexpr bool kStreams`).
template <class Op, class = void> struct streams : std::false_type {};
template <class Op>
struct streams<Op, std::void_t<decltype(Op::kStreams)>> : std::bool_constant<Op::kStreams> {};
template <class Op> constexpr bool streams_v = streams<Op>::value;

// Phases 1 and 2 are never skipped.
#define GRF_NEVER_SKIPPED                                       \
  GRF_HD bool skipped() const { return false; }                 \
  template <int V> GRF_HD void apply_skipped(int64_t) const {}

// Σ g² (adaptive: Σ (θ·g)²), phase 1, summed in double: it stays within 1e-6 of the exact
// sum for any size, and the compiler still vectorizes it (memory is the bottleneck).
template <class T, bool ADAPTIVE> struct SqNormOp {
  using value_type = T;
  const T* g;
  const T* theta;  // read only when ADAPTIVE

  GRF_HD void prepare() {}

  template <int V> GRF_HD void accumulate(int64_t i, double* acc) const {
    Pack<T, V> gp = ld<V>(g, i);
    Pack<T, V> tp = gp;
    if constexpr (ADAPTIVE) tp = ld<V>(theta, i);
GRF_UNROLL
    for (int k = 0; k < V; ++k)
      acc[k] += sq_term(double(to_c(tp.v[k])), double(to_c(gp.v[k])), ADAPTIVE);
  }
};

// backup = θ;  θ = θ + eps·w·g;  g = fold·g, phase 2.
// INTO: θ + eps·w·g goes to `backup` instead and θ stays. The caller then swaps the two
// buffers (their storages' memory), which leaves the same state with one store per element
// less.
template <class T, bool ADAPTIVE, bool INTO> struct PerturbOp {
  using value_type = T;
  using C = compute_t<T>;
  static constexpr bool kStreams = INTO;  // θ' into the backup, which it does not read
  T* theta;
  T* g;
  T* backup;
  const C* eps_ptr;
  const C* fold_ptr;
  C eps, fold;

  GRF_HD void prepare() { eps = *eps_ptr; fold = *fold_ptr; }
  GRF_NEVER_SKIPPED

  template <int V> GRF_HD void apply(int64_t i) const {
    Pack<T, V> t = ld<V>(theta, i), gp = ld<V>(g, i), nt, ng;
GRF_UNROLL
    for (int k = 0; k < V; ++k) {
      C new_theta, new_g;
      perturb_elem(to_c(t.v[k]), to_c(gp.v[k]), eps, fold, ADAPTIVE, new_theta, new_g);
      nt.v[k] = from_c<T>(new_theta);
      ng.v[k] = from_c<T>(new_g);
    }
    if constexpr (INTO) {
      st_stream<V>(backup, i, nt);
    } else {
      st<V>(backup, i, t);
      st<V>(theta, i, nt);
    }
    st<V>(g, i, ng);
  }
};

// θ = 2·backup − θ;  g = −g (central difference).
template <class T> struct ReflectOp {
  using value_type = T;
  using C = compute_t<T>;
  T* theta;
  T* g;
  const T* backup;

  GRF_HD void prepare() {}
  GRF_NEVER_SKIPPED

  template <int V> GRF_HD void apply(int64_t i) const {
    Pack<T, V> t = ld<V>(theta, i), gp = ld<V>(g, i), b = ld<V>(backup, i);
GRF_UNROLL
    for (int k = 0; k < V; ++k) {
      t.v[k] = from_c<T>(reflect_theta(to_c(t.v[k]), to_c(b.v[k])));
      gp.v[k] = from_c<T>(-to_c(gp.v[k]));
    }
    st<V>(theta, i, t);
    st<V>(g, i, gp);
  }
};

// Phase 3 reads gscale and found_inf; when found_inf is set, θ = backup and nothing else
// is written (a momentum buffer created by this step is written as zeros).
template <class T> struct UpdateScalars {
  using C = compute_t<T>;
  const C* gscale_ptr;
  const C* found_inf_ptr;
  C gscale;
  bool skip;

  GRF_HD void read() { gscale = *gscale_ptr; skip = *found_inf_ptr != C(0); }
};

#define GRF_SKIPPED_WHEN_FOUND_INF \
  GRF_HD bool skipped() const { return s.skip; }

// θ = backup;  G = gscale·G (the GR wrapper's base optimizer steps afterwards).
template <class T> struct UpdateNoneOp {
  using value_type = T;
  using C = compute_t<T>;
  T* theta;
  T* G;
  const T* backup;
  UpdateScalars<T> s;

  GRF_HD void prepare() { s.read(); }
  GRF_SKIPPED_WHEN_FOUND_INF

  template <int V> GRF_HD void apply_skipped(int64_t i) const { st<V>(theta, i, ld<V>(backup, i)); }

  template <int V> GRF_HD void apply(int64_t i) const {
    st<V>(theta, i, ld<V>(backup, i));
    Pack<T, V> gp = ld<V>(G, i);
GRF_UNROLL
    for (int k = 0; k < V; ++k) gp.v[k] = from_c<T>(combined_grad(to_c(gp.v[k]), s.gscale));
    st<V>(G, i, gp);
  }
};

// θ = backup, then torch.optim.SGD's update with g = gscale·G.
template <class T, int MODE> struct UpdateSgdOp {  // MODE: a MomentumMode
  using value_type = T;
  using C = compute_t<T>;
  T* theta;
  const T* G;
  const T* backup;
  T* buf;  // null when MODE is kNoMomentum
  UpdateScalars<T> s;
  SgdHp<C> h;

  GRF_HD void prepare() { s.read(); }
  GRF_SKIPPED_WHEN_FOUND_INF

  template <int V> GRF_HD void apply_skipped(int64_t i) const {
    st<V>(theta, i, ld<V>(backup, i));
    if constexpr (MODE == kFirstMomentum) {  // the buffer this step creates: zeros
      Pack<T, V> zero;
GRF_UNROLL
      for (int k = 0; k < V; ++k) zero.v[k] = from_c<T>(C(0));
      st<V>(buf, i, zero);
    }
  }

  template <int V> GRF_HD void apply(int64_t i) const {
    Pack<T, V> b = ld<V>(backup, i), gp = ld<V>(G, i), mp = b, nt;
    if constexpr (MODE == kMomentum) mp = ld<V>(buf, i);
GRF_UNROLL
    for (int k = 0; k < V; ++k) {
      C m = to_c(mp.v[k]);
      nt.v[k] = from_c<T>(sgd_elem<MODE>(to_c(gp.v[k]), s.gscale, to_c(b.v[k]), m, h));
      mp.v[k] = from_c<T>(m);
    }
    st<V>(theta, i, nt);
    if constexpr (MODE != kNoMomentum) st<V>(buf, i, mp);
  }
};

// θ = backup, then torch.optim.AdamW's update with g = gscale·G. The stored step count is
// advanced either before the pass (update_finalize; step_offset 0) or by the driver after it
// (step_offset 1: every element reads the old count here and adds one).
template <class T> struct UpdateAdamwOp {
  using value_type = T;
  using C = compute_t<T>;
  T* theta;
  const T* G;
  const T* backup;
  T* m;
  T* v;
  const float* step_ptr;  // torch keeps AdamW's step as a float32 tensor
  UpdateScalars<T> s;
  AdamHp<C> h;
  float step_offset;
  AdamStep<C> bias;

  GRF_HD void prepare() {
    s.read();
    bias = adam_step(C(*step_ptr + step_offset), h);
  }
  GRF_SKIPPED_WHEN_FOUND_INF

  template <int V> GRF_HD void apply_skipped(int64_t i) const { st<V>(theta, i, ld<V>(backup, i)); }

  template <int V> GRF_HD void apply(int64_t i) const {
    Pack<T, V> b = ld<V>(backup, i);
    Pack<T, V> gp = ld<V>(G, i), mp = ld<V>(m, i), vp = ld<V>(v, i), nt;
GRF_UNROLL
    for (int k = 0; k < V; ++k) {
      C mm = to_c(mp.v[k]), vv = to_c(vp.v[k]);
      nt.v[k] = from_c<T>(adamw_elem(to_c(gp.v[k]), s.gscale, to_c(b.v[k]), mm, vv, h, bias));
      mp.v[k] = from_c<T>(mm);
      vp.v[k] = from_c<T>(vv);
    }
    st<V>(theta, i, nt);
    st<V>(m, i, mp);
    st<V>(v, i, vp);
  }
};

// Calls f(T{}) with the storage type named by a dtype code (see grf_api.h).
template <class F> void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32: f(float{}); break;
    case kF16: f(half_t{}); break;
    case kBF16: f(bf16_t{}); break;
    case kF64: f(double{}); break;
    default:
      throw std::invalid_argument("gr_fused._C: unknown dtype code " + std::to_string(dtype));
  }
}

// Calls f(C{}) with the compute type named by a dtype code (kF32: float, kF64: double).
template <class F> void dispatch_compute(int ctype, F&& f) {
  switch (ctype) {
    case kF32: f(float{}); break;
    case kF64: f(double{}); break;
    default:
      throw std::invalid_argument("gr_fused._C: not a compute dtype code " + std::to_string(ctype));
  }
}

// The number of groups that update_finalize's `bounds` describe (checked).
inline int check_groups(const std::vector<int64_t>& bounds) {
  const int64_t groups = int64_t(bounds.size()) - 1;
  if (groups < 1 || groups > kMaxGroups)
    throw std::invalid_argument("gr_fused._C.update_finalize: 1 to " +
                                std::to_string(kMaxGroups) + " groups, not " +
                                std::to_string(groups));
  for (int64_t g = 0; g < groups; ++g)
    if (bounds[g] > bounds[g + 1] || bounds[g] < 0)
      throw std::invalid_argument("gr_fused._C.update_finalize: bounds must not decrease");
  return int(groups);
}

// Calls f(std::integral_constant<bool, b>{}).
template <class F> void dispatch_bool(bool b, F&& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

// Calls f(std::integral_constant<int, mode>{}) with the MomentumMode of an update_sgd call.
template <class F> void dispatch_momentum(uintptr_t buf, bool first, F&& f) {
  if (buf == 0) f(std::integral_constant<int, kNoMomentum>{});
  else if (first) f(std::integral_constant<int, kFirstMomentum>{});
  else f(std::integral_constant<int, kMomentum>{});
}

// ---------------------------------------------------------------- the element-wise phases
// Each phase of grf_api.h as its op, built here once for both drivers: `run(op, n, align,
// what)` is the host build's OpenMP loop (host.cpp) or the CUDA launch (cuda.cu); `align` is
// the buffers' common alignment (see alignment).
template <class Run>
void run_perturb(Run&& run, int dtype, int64_t n, ptr theta, ptr g, ptr backup, ptr eps,
                 ptr fold, bool adaptive, bool into) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    dispatch_bool(adaptive, [&](auto a) {
      dispatch_bool(into, [&](auto i) {
        run(PerturbOp<T, decltype(a)::value, decltype(i)::value>{
                as<T>(theta), as<T>(g), as<T>(backup), as<const C>(eps), as<const C>(fold)},
            n, alignment({theta, g, backup}), "perturb");
      });
    });
  });
}

template <class Run>
void run_reflect(Run&& run, int dtype, int64_t n, ptr theta, ptr g, ptr backup) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    run(ReflectOp<T>{as<T>(theta), as<T>(g), as<const T>(backup)}, n,
        alignment({theta, g, backup}), "reflect");
  });
}

template <class Run>
void run_update_none(Run&& run, int dtype, int64_t n, ptr theta, ptr G, ptr backup,
                     ptr gscale, ptr found_inf) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    run(UpdateNoneOp<T>{as<T>(theta), as<T>(G), as<const T>(backup),
                        {as<const C>(gscale), as<const C>(found_inf)}},
        n, alignment({theta, G, backup}), "update_none");
  });
}

template <class Run>
void run_update_sgd(Run&& run, int dtype, int64_t n, ptr theta, ptr G, ptr backup, ptr buf,
                    bool first, ptr gscale, ptr found_inf, double lr, double momentum,
                    double dampening, double weight_decay, bool nesterov) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    dispatch_momentum(buf, first, [&](auto mode) {
      run(UpdateSgdOp<T, decltype(mode)::value>{
              as<T>(theta), as<const T>(G), as<const T>(backup), as<T>(buf),
              {as<const C>(gscale), as<const C>(found_inf)},
              make_sgd_hp<C>(lr, momentum, dampening, weight_decay, nesterov)},
          n, alignment({theta, G, backup, buf}), "update_sgd");
    });
  });
}

// The element-wise pass only: the driver advances the step count after it unless
// step_advanced (update_finalize did, before it).
template <class Run>
void run_update_adamw(Run&& run, int dtype, int64_t n, ptr theta, ptr G, ptr backup, ptr m,
                      ptr v, ptr step, ptr gscale, ptr found_inf, double lr, double beta1,
                      double beta2, double eps, double weight_decay, bool step_advanced) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    run(UpdateAdamwOp<T>{as<T>(theta), as<const T>(G), as<const T>(backup), as<T>(m), as<T>(v),
                         as<const float>(step), {as<const C>(gscale), as<const C>(found_inf)},
                         make_adam_hp<C>(lr, beta1, beta2, eps, weight_decay),
                         step_advanced ? 0.0f : 1.0f},
        n, alignment({theta, G, backup, m, v}), "update_adamw");
  });
}

}  // namespace grf
