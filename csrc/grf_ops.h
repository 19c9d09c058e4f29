// What each phase reads and writes, chunk by chunk of a tensor table, for the CUDA kernels
// (cuda.cu) and the host loops (host.cpp).
//
// A phase is an *op*: a small struct of the step scalars and hyperparameters of one call.
//
//   prepare()              reads the step scalars (eps, fold, gscale, found_inf, lr) from
//                          memory; a CUDA thread calls it once per launch, the host once per
//                          call
//   visit(table, span, f)  calls f(chunk) with the *chunk view* of one chunk: its typed
//                          pointers (offset to the chunk's first element) and what that
//                          chunk does (a skipped step or a frozen tensor: restore θ only; a
//                          momentum buffer created by this step: written, never read)
//
// and a chunk view has
//
//   apply<V>(i)            processes elements i .. i+V-1 of the chunk (V > 1: 16-byte packs
//                          on a 16-byte aligned chunk, or the host's 32-byte streamed packs)
//   accumulate<V>(i, a)    the norm: adds the terms of elements i .. i+V-1 into lanes a[0..V)
//   aligned16()            whether every pointer of the view is 16-byte aligned
//
// The arithmetic itself is in grf_math.h; the drivers (host.cpp's OpenMP loop over chunks,
// cuda.cu's grid-stride loop of blocks over chunks) decide which i each thread visits. What
// decides which memory a chunk touches is a template parameter of its view, chosen once per
// chunk, so the inner loops have no branches and the host compiler vectorizes them.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "grf_api.h"
#include "grf_math.h"

#if defined(__AVX2__) && !defined(__CUDACC__)
#include <immintrin.h>
#define GRF_STREAM_STORES 1  // the host build's AVX2 compilation
#endif

namespace grf {

// V consecutive elements, loaded or stored with one 16-byte access when V·sizeof(T) == 16.
template <class T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

// Elements per 16-byte pack (4 floats, 8 halves, 2 doubles).
template <class T> constexpr int vec_width() { return 16 / int(sizeof(T)); }

template <class T> GRF_HD uintptr_t addr(const T* p) { return reinterpret_cast<uintptr_t>(p); }

// V elements at p + i. On a GPU a pack is one 16-byte access (the chunk is 16-byte aligned:
// the drivers check); on the host a memcpy, which compiles to one unaligned vector access.
template <int V, class T> GRF_HD Pack<T, V> ld(const T* p, int64_t i) {
  Pack<T, V> x;
  if constexpr (V == 1) {
    x.v[0] = p[i];
  } else {
#ifdef __CUDA_ARCH__
    x = *reinterpret_cast<const Pack<T, V>*>(p + i);
#else
    memcpy(&x, p + i, sizeof(x));
#endif
  }
  return x;
}

template <int V, class T> GRF_HD void st(T* p, int64_t i, const Pack<T, V>& x) {
  if constexpr (V == 1) {
    p[i] = x.v[0];
  } else {
#ifdef __CUDA_ARCH__
    *reinterpret_cast<Pack<T, V>*>(p + i) = x;
#else
    memcpy(p + i, &x, sizeof(x));
#endif
  }
}

// The host build's copy into a buffer a phase only writes (perturb's backup ← θ): on an AVX2
// host, 32-byte non-temporal stores, which do not first read the destination's lines into
// the cache; `dst` must be 32-byte aligned (the backup's segments are 64-byte aligned and a
// chunk starts a multiple of 32 bytes into one). The caller fences (_mm_sfence) after.
inline void copy_streamed(void* dst, const void* src, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  int64_t k = 0;
#ifdef GRF_STREAM_STORES
  for (; k + 32 <= bytes; k += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + k),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k)));
#endif
  memcpy(d + k, s + k, size_t(bytes - k));
}

// Whether a chunk view has a buffer it only writes with a copy of another (its
// `static constexpr bool kStreams`; it then has stream_aligned(), copy_dst(), copy_src() and
// apply_rest<V>, which does everything but that copy).
template <class Ch, class = void> struct streams : std::false_type {};
template <class Ch>
struct streams<Ch, std::void_t<decltype(Ch::kStreams)>> : std::bool_constant<Ch::kStreams> {};
template <class Ch> constexpr bool streams_v = streams<Ch>::value;

// Whether a chunk view writes θ without reading it (the updates: `static constexpr bool
// kThetaWriteOnly`; it then has at(k), the view of its elements from k on).
template <class Ch, class = void> struct theta_write_only : std::false_type {};
template <class Ch>
struct theta_write_only<Ch, std::void_t<decltype(Ch::kThetaWriteOnly)>>
    : std::bool_constant<Ch::kThetaWriteOnly> {};
template <class Ch> constexpr bool theta_write_only_v = theta_write_only<Ch>::value;

// ---------------------------------------------------------------- the table
// An address read from a table is global memory: said so to nvcc, which otherwise makes
// generic loads and stores (LD/ST) of it instead of global ones (LDG/STG).
template <class X> GRF_HD X* global(X* p) {
#ifdef __CUDA_ARCH__
  __builtin_assume(__isGlobal(p));
#endif
  return p;
}

// Where chunk c is: tensor t, elements [start, start + len) of it, and t's backup offset.
struct Span {
  int64_t t, start, len, backup_offset;
};

// A Table (grf_api.h) as the kernels read it.
struct TableView {
  const int64_t* layout;
  const int64_t* ptrs;
  int64_t num_chunks, num_tensors, chunk;
  uintptr_t backup;

  GRF_HD Span span(int64_t c) const {
    const int64_t C = num_chunks, T = num_tensors;
    const int64_t t = layout[c];
    const int64_t start = (c - layout[C + t]) * chunk;
    const int64_t rest = layout[C + T + t] - start;
    return Span{t, start, rest < chunk ? rest : chunk, layout[C + 2 * T + t]};
  }
  // row r of the chunk's tensor, at the chunk's first element
  template <class X> GRF_HD X* row(int r, const Span& s) const {
    return global(reinterpret_cast<X*>(ptrs[r * num_tensors + s.t]) + s.start);
  }
  GRF_HD int64_t flags(const Span& s) const { return ptrs[kFlags * num_tensors + s.t]; }
  template <class X> GRF_HD X* backup_at(const Span& s) const {
    return global(reinterpret_cast<X*>(backup) + s.backup_offset + s.start);
  }
  // Σ numel over the tensors (the host decides its team size from it)
  int64_t numel() const {
    int64_t n = 0;
    for (int64_t t = 0; t < num_tensors; ++t) n += layout[num_chunks + num_tensors + t];
    return n;
  }
};

inline TableView view_of(const Table& t) {
  return TableView{reinterpret_cast<const int64_t*>(t.layout),
                   reinterpret_cast<const int64_t*>(t.ptrs), t.num_chunks, t.num_tensors,
                   t.chunk, t.backup};
}

// ---------------------------------------------------------------- chunk views
// Σ g² (adaptive: Σ (θ·g)²), phase 1, in double lanes.
template <class T, bool ADAPTIVE> struct NormChunk {
  using value_type = T;
  const T* g;
  const T* theta;  // read only when ADAPTIVE

  GRF_HD bool aligned16() const { return (addr(g) | (ADAPTIVE ? addr(theta) : 0)) % 16 == 0; }

  // the term of element i
  GRF_HD double term(int64_t i) const {
    return sq_term(to_c(ADAPTIVE ? theta[i] : g[i]), to_c(g[i]), ADAPTIVE);
  }

  template <int V> GRF_HD void accumulate(int64_t i, double* acc) const {
    const Pack<T, V> gp = ld<V>(g, i);
    Pack<T, V> tp = gp;
    if constexpr (ADAPTIVE) tp = ld<V>(theta, i);
GRF_UNROLL
    for (int k = 0; k < V; ++k) acc[k] += sq_term(to_c(tp.v[k]), to_c(gp.v[k]), ADAPTIVE);
  }
};

// backup = θ;  θ = θ + eps·w·g;  g = fold·g, phase 2.
template <class T, bool ADAPTIVE> struct PerturbChunk {
  using value_type = T;
  using C = compute_t<T>;
  static constexpr bool kStreams = true;  // the backup is only written, with a copy of θ
  T* theta;
  T* g;
  T* backup;
  C eps, fold;

  GRF_HD bool aligned16() const { return (addr(theta) | addr(g) | addr(backup)) % 16 == 0; }
  bool stream_aligned() const { return addr(backup) % 32 == 0; }
  T* copy_dst() const { return backup; }
  const T* copy_src() const { return theta; }

  template <int V, bool BACKUP> GRF_HD void run(int64_t i) const {
    const Pack<T, V> t = ld<V>(theta, i), gp = ld<V>(g, i);
    Pack<T, V> nt, ng;
GRF_UNROLL
    for (int k = 0; k < V; ++k) {
      C new_theta, new_g;
      perturb_elem(to_c(t.v[k]), to_c(gp.v[k]), eps, fold, ADAPTIVE, new_theta, new_g);
      nt.v[k] = from_c<T>(new_theta);
      ng.v[k] = from_c<T>(new_g);
    }
    if constexpr (BACKUP) st<V>(backup, i, t);
    st<V>(theta, i, nt);
    st<V>(g, i, ng);
  }
  template <int V> GRF_HD void apply(int64_t i) const { run<V, true>(i); }
  template <int V> GRF_HD void apply_rest(int64_t i) const { run<V, false>(i); }
};

// θ = 2·backup − θ;  g = −g (central difference).
template <class T> struct ReflectChunk {
  using value_type = T;
  using C = compute_t<T>;
  T* theta;
  T* g;
  const T* backup;

  GRF_HD bool aligned16() const { return (addr(theta) | addr(g) | addr(backup)) % 16 == 0; }

  template <int V> GRF_HD void apply(int64_t i) const {
    Pack<T, V> t = ld<V>(theta, i), gp = ld<V>(g, i);
    const Pack<T, V> b = ld<V>(backup, i);
GRF_UNROLL
    for (int k = 0; k < V; ++k) {
      t.v[k] = from_c<T>(reflect_theta(to_c(t.v[k]), to_c(b.v[k])));
      gp.v[k] = from_c<T>(-to_c(gp.v[k]));
    }
    st<V>(theta, i, t);
    st<V>(g, i, gp);
  }
};

// θ = backup: restore, and phase 3 of a skipped step or a frozen tensor.
template <class T> struct RestoreChunk {
  using value_type = T;
  static constexpr bool kThetaWriteOnly = true;
  T* theta;
  const T* backup;

  GRF_HD bool aligned16() const { return (addr(theta) | addr(backup)) % 16 == 0; }
  RestoreChunk at(int64_t k) const { return RestoreChunk{theta + k, backup + k}; }
  template <int V> GRF_HD void apply(int64_t i) const { st<V>(theta, i, ld<V>(backup, i)); }
};

// θ = backup;  G = gscale·G (the GR wrapper's base optimizer steps afterwards).
template <class T> struct NoneChunk {
  using value_type = T;
  using C = compute_t<T>;
  static constexpr bool kThetaWriteOnly = true;
  T* theta;
  T* G;
  const T* backup;
  C gscale;

  GRF_HD bool aligned16() const { return (addr(theta) | addr(G) | addr(backup)) % 16 == 0; }
  NoneChunk at(int64_t k) const { return NoneChunk{theta + k, G + k, backup + k, gscale}; }

  template <int V> GRF_HD void apply(int64_t i) const {
    st<V>(theta, i, ld<V>(backup, i));
    Pack<T, V> gp = ld<V>(G, i);
GRF_UNROLL
    for (int k = 0; k < V; ++k) gp.v[k] = from_c<T>(combined_grad(to_c(gp.v[k]), gscale));
    st<V>(G, i, gp);
  }
};

// θ = backup, then torch.optim.SGD's update with g = gscale·G. MODE: a MomentumMode.
template <class T, int MODE> struct SgdChunk {
  using value_type = T;
  using C = compute_t<T>;
  static constexpr bool kThetaWriteOnly = true;
  T* theta;
  const T* G;
  const T* backup;
  T* buf;  // null when MODE is kNoMomentum
  C gscale;
  SgdHp<C> h;

  GRF_HD bool aligned16() const {
    return (addr(theta) | addr(G) | addr(backup) | (MODE != kNoMomentum ? addr(buf) : 0)) % 16 == 0;
  }
  SgdChunk at(int64_t k) const {
    return SgdChunk{theta + k, G + k, backup + k, MODE != kNoMomentum ? buf + k : buf, gscale, h};
  }

  template <int V> GRF_HD void apply(int64_t i) const {
    const Pack<T, V> b = ld<V>(backup, i), gp = ld<V>(G, i);
    Pack<T, V> mp = b, nt;
    if constexpr (MODE == kWithMomentum) mp = ld<V>(buf, i);
GRF_UNROLL
    for (int k = 0; k < V; ++k) {
      C m = to_c(mp.v[k]);
      nt.v[k] = from_c<T>(sgd_elem<MODE>(to_c(gp.v[k]), gscale, to_c(b.v[k]), m, h));
      mp.v[k] = from_c<T>(m);
    }
    st<V>(theta, i, nt);
    if constexpr (MODE != kNoMomentum) st<V>(buf, i, mp);
  }
};

// θ = backup, then torch.optim.AdamW's update with g = gscale·G and the bias corrections of
// the tensor's own (already advanced) step count.
template <class T> struct AdamChunk {
  using value_type = T;
  using C = compute_t<T>;
  static constexpr bool kThetaWriteOnly = true;
  T* theta;
  const T* G;
  const T* backup;
  T* m;
  T* v;
  C gscale;
  AdamHp<C> h;
  AdamStep<C> bias;

  GRF_HD bool aligned16() const {
    return (addr(theta) | addr(G) | addr(backup) | addr(m) | addr(v)) % 16 == 0;
  }
  AdamChunk at(int64_t k) const {
    return AdamChunk{theta + k, G + k, backup + k, m + k, v + k, gscale, h, bias};
  }

  template <int V> GRF_HD void apply(int64_t i) const {
    const Pack<T, V> b = ld<V>(backup, i), gp = ld<V>(G, i);
    Pack<T, V> mp = ld<V>(m, i), vp = ld<V>(v, i), nt;
GRF_UNROLL
    for (int k = 0; k < V; ++k) {
      C mm = to_c(mp.v[k]), vv = to_c(vp.v[k]);
      nt.v[k] = from_c<T>(adamw_elem(to_c(gp.v[k]), gscale, to_c(b.v[k]), mm, vv, h, bias));
      mp.v[k] = from_c<T>(mm);
      vp.v[k] = from_c<T>(vv);
    }
    st<V>(theta, i, nt);
    st<V>(m, i, mp);
    st<V>(v, i, vp);
  }
};

// ---------------------------------------------------------------- ops
template <class T, bool ADAPTIVE> struct NormOp {
  using value_type = T;
  GRF_HD void prepare() {}
  template <class F> GRF_HD void visit(const TableView& tb, const Span& s, F&& f) const {
    f(NormChunk<T, ADAPTIVE>{tb.row<const T>(kGrad, s),
                             ADAPTIVE ? tb.row<const T>(kParam, s) : nullptr});
  }
};

template <class T, bool ADAPTIVE> struct PerturbOp {
  using value_type = T;
  static constexpr bool kBackward = true;  // after a norm (host.cpp: walks_backward)
  using C = compute_t<T>;
  const C* eps_at;
  const C* fold_at;
  C eps = C(0), fold = C(0);

  GRF_HD void prepare() { eps = *eps_at; fold = *fold_at; }
  template <class F> GRF_HD void visit(const TableView& tb, const Span& s, F&& f) const {
    f(PerturbChunk<T, ADAPTIVE>{tb.row<T>(kParam, s), tb.row<T>(kGrad, s), tb.backup_at<T>(s),
                                eps, fold});
  }
};

template <class T> struct ReflectOp {
  using value_type = T;
  GRF_HD void prepare() {}
  template <class F> GRF_HD void visit(const TableView& tb, const Span& s, F&& f) const {
    f(ReflectChunk<T>{tb.row<T>(kParam, s), tb.row<T>(kGrad, s), tb.backup_at<const T>(s)});
  }
};

template <class T> struct RestoreOp {
  using value_type = T;
  GRF_HD void prepare() {}
  template <class F> GRF_HD void visit(const TableView& tb, const Span& s, F&& f) const {
    f(RestoreChunk<T>{tb.row<T>(kParam, s), tb.backup_at<const T>(s)});
  }
};

// Phase 3 reads gscale and found_inf; when found_inf is set, θ = backup and nothing else is
// written. A tensor flagged FROZEN is only restored.
template <class T> struct UpdateScalars {
  using C = compute_t<T>;
  const C* gscale_at;
  const C* found_inf_at;
  C gscale = C(0);
  bool skip = false;

  GRF_HD void read() { gscale = *gscale_at; skip = *found_inf_at != C(0); }
  // true: this chunk's θ = backup and nothing else
  GRF_HD bool keeps(const TableView& tb, const Span& s) const {
    return skip || (tb.flags(s) & kFrozen);
  }
};

template <class T> struct UpdateNoneOp {
  using value_type = T;
  static constexpr bool kBackward = true;  // after a norm (host.cpp: walks_backward)
  UpdateScalars<T> s;

  GRF_HD void prepare() { s.read(); }
  template <class F> GRF_HD void visit(const TableView& tb, const Span& sp, F&& f) const {
    if (s.keeps(tb, sp))
      f(RestoreChunk<T>{tb.row<T>(kParam, sp), tb.backup_at<const T>(sp)});
    else
      f(NoneChunk<T>{tb.row<T>(kParam, sp), tb.row<T>(kGrad, sp), tb.backup_at<const T>(sp),
                     s.gscale});
  }
};

template <class T> struct UpdateSgdOp {
  using value_type = T;
  static constexpr bool kBackward = true;  // after a norm (host.cpp: walks_backward)
  using C = compute_t<T>;
  UpdateScalars<T> s;
  Lr lr;
  double momentum, dampening, weight_decay;
  bool nesterov;
  SgdHp<C> h{};

  GRF_HD void prepare() {
    s.read();
    h = make_sgd_hp<C>(lr_value(lr), momentum, dampening, weight_decay, nesterov);
  }
  template <class F> GRF_HD void visit(const TableView& tb, const Span& sp, F&& f) const {
    if (s.keeps(tb, sp)) {
      f(RestoreChunk<T>{tb.row<T>(kParam, sp), tb.backup_at<const T>(sp)});
      return;
    }
    T* theta = tb.row<T>(kParam, sp);
    const T* G = tb.row<const T>(kGrad, sp);
    const T* backup = tb.backup_at<const T>(sp);
    if (momentum == 0) {
      f(SgdChunk<T, kNoMomentum>{theta, G, backup, nullptr, s.gscale, h});
    } else if (tb.flags(sp) & kNewState) {  // created for this step: buf = g, never read
      f(SgdChunk<T, kFirstMomentum>{theta, G, backup, tb.row<T>(kMomentum, sp), s.gscale, h});
    } else {
      f(SgdChunk<T, kWithMomentum>{theta, G, backup, tb.row<T>(kMomentum, sp), s.gscale, h});
    }
  }
};

template <class T> struct UpdateAdamwOp {
  using value_type = T;
  static constexpr bool kBackward = true;  // after a norm (host.cpp: walks_backward)
  using C = compute_t<T>;
  UpdateScalars<T> s;
  Lr lr;
  double beta1, beta2, eps, weight_decay;
  AdamHp<C> h{};

  GRF_HD void prepare() {
    s.read();
    h = make_adam_hp<C>(lr_value(lr), beta1, beta2, eps, weight_decay);
  }
  template <class F> GRF_HD void visit(const TableView& tb, const Span& sp, F&& f) const {
    if (s.keeps(tb, sp)) {
      f(RestoreChunk<T>{tb.row<T>(kParam, sp), tb.backup_at<const T>(sp)});
      return;
    }
    const float step = *global(reinterpret_cast<const float*>(tb.ptrs[kStep * tb.num_tensors + sp.t]));
    f(AdamChunk<T>{tb.row<T>(kParam, sp), tb.row<const T>(kGrad, sp), tb.backup_at<const T>(sp),
                   tb.row<T>(kExpAvg, sp), tb.row<T>(kExpAvgSq, sp), s.gscale, h,
                   adam_step(C(step), h)});
  }
};

// ---------------------------------------------------------------- dispatch
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

template <class F> void dispatch_bool(bool b, F&& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

inline Lr make_lr(double value, ptr at, int dtype) {
  if (at != 0 && dtype != kF32 && dtype != kF64)
    throw std::invalid_argument("gr_fused._C: a tensor lr must be float32 or float64, not code " +
                                std::to_string(dtype));
  return Lr{value, at, dtype};
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

// ---------------------------------------------------------------- the phases
// Each phase of grf_api.h as its op, built here once for both drivers: `run.foreach(op,
// what)` and `run.norm(op, partials)` are the host build's OpenMP loops (host.cpp) or the
// CUDA launches (cuda.cu), over the table `run` holds.
template <class Run> void run_norm(Run&& run, int dtype, bool adaptive, ptr partials) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_bool(adaptive, [&](auto a) {
      run.norm(NormOp<T, decltype(a)::value>{}, reinterpret_cast<double*>(partials));
    });
  });
}

template <class Run> void run_perturb(Run&& run, int dtype, ptr eps, ptr fold, bool adaptive) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    dispatch_bool(adaptive, [&](auto a) {
      run.foreach(PerturbOp<T, decltype(a)::value>{reinterpret_cast<const C*>(eps),
                                                   reinterpret_cast<const C*>(fold)},
                  "perturb");
    });
  });
}

template <class Run> void run_reflect(Run&& run, int dtype) {
  dispatch_dtype(dtype, [&](auto tag) { run.foreach(ReflectOp<decltype(tag)>{}, "reflect"); });
}

template <class Run> void run_restore(Run&& run, int dtype) {
  dispatch_dtype(dtype, [&](auto tag) { run.foreach(RestoreOp<decltype(tag)>{}, "restore"); });
}

template <class T> UpdateScalars<T> update_scalars_at(ptr gscale, ptr found_inf) {
  using C = compute_t<T>;
  return UpdateScalars<T>{reinterpret_cast<const C*>(gscale),
                          reinterpret_cast<const C*>(found_inf)};
}

template <class Run> void run_update_none(Run&& run, int dtype, ptr gscale, ptr found_inf) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    run.foreach(UpdateNoneOp<T>{update_scalars_at<T>(gscale, found_inf)}, "update_none");
  });
}

template <class Run>
void run_update_sgd(Run&& run, int dtype, ptr gscale, ptr found_inf, Lr lr, double momentum,
                    double dampening, double weight_decay, bool nesterov) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    run.foreach(UpdateSgdOp<T>{update_scalars_at<T>(gscale, found_inf), lr, momentum,
                               dampening, weight_decay, nesterov},
                "update_sgd");
  });
}

// The element-wise pass only: each tensor's step count must be advanced before it.
template <class Run>
void run_update_adamw(Run&& run, int dtype, ptr gscale, ptr found_inf, Lr lr, double beta1,
                      double beta2, double eps, double weight_decay) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    run.foreach(UpdateAdamwOp<T>{update_scalars_at<T>(gscale, found_inf), lr, beta1, beta2,
                                 eps, weight_decay},
                "update_adamw");
  });
}

}  // namespace grf
