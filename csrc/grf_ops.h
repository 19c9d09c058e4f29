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
//                          on a 16-byte aligned chunk)
//   accumulate<V>(i, a, s) the norms (kSums sums: 1, or 3 for interval=k's dots): adds the
//                          terms of elements i .. i+V-1 into lanes a[0..V) (sum k's lanes
//                          at a + k·s)
//   aligned16()            whether every pointer of the view is 16-byte aligned
//
// The arithmetic itself is in grf_math.h; the drivers (host.cpp's OpenMP loop over chunks,
// cuda.cu's grid-stride loop of blocks over chunks) decide which i each thread visits. What
// decides which memory a chunk touches is a template parameter of its view, chosen once per
// chunk, so the inner loops have no branches and the host compiler vectorizes them.
#pragma once

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

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

// Whether a chunk view has buffers it only writes with copies of others (its
// `static constexpr bool kStreams`; it then has stream_aligned(), copy_block(begin, end),
// which makes those copies of elements [begin, end) with copy_streamed, and apply_rest<V>,
// which does everything but them).
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
  static constexpr int kSums = 1;
  const T* g;
  const T* theta;  // read only when ADAPTIVE

  GRF_HD bool aligned16() const { return (addr(g) | (ADAPTIVE ? addr(theta) : 0)) % 16 == 0; }

  // the term of element i
  GRF_HD double term(int64_t i) const {
    return sq_term(to_c(ADAPTIVE ? theta[i] : g[i]), to_c(g[i]), ADAPTIVE);
  }

  template <int V> GRF_HD void accumulate(int64_t i, double* acc, int = 0) const {
    const Pack<T, V> gp = ld<V>(g, i);
    Pack<T, V> tp = gp;
    if constexpr (ADAPTIVE) tp = ld<V>(theta, i);
GRF_UNROLL
    for (int k = 0; k < V; ++k) acc[k] += sq_term(to_c(tp.v[k]), to_c(gp.v[k]), ADAPTIVE);
  }
};

// interval=k: [Σ g², Σ g·d, Σ d²] with d the direction, each term a product of doubles.
template <class T> struct DotsChunk {
  using value_type = T;
  static constexpr int kSums = 3;
  const T* g;
  const T* d;

  GRF_HD bool aligned16() const { return (addr(g) | addr(d)) % 16 == 0; }

  template <int V> GRF_HD void accumulate(int64_t i, double* acc, int stride) const {
    const Pack<T, V> gp = ld<V>(g, i), dp = ld<V>(d, i);
GRF_UNROLL
    for (int k = 0; k < V; ++k) {
      const double x = double(to_c(gp.v[k])), y = double(to_c(dp.v[k]));
      acc[k] += x * x;
      acc[stride + k] += x * y;
      acc[2 * stride + k] += y * y;
    }
  }
};

// backup = θ;  θ = θ + eps·w·g;  g = fold·g, phase 2; SAVE (interval=k, a refresh): also
// direction = g (before the fold).
template <class T, bool ADAPTIVE, bool SAVE> struct PerturbChunk {
  using value_type = T;
  using C = compute_t<T>;
  static constexpr bool kStreams = true;  // the backup (and direction) are only written, copies
  T* theta;
  T* g;
  T* backup;
  T* dir;  // SAVE only
  C eps, fold;

  GRF_HD bool aligned16() const {
    return (addr(theta) | addr(g) | addr(backup) | (SAVE ? addr(dir) : 0)) % 16 == 0;
  }
  bool stream_aligned() const { return (addr(backup) | (SAVE ? addr(dir) : 0)) % 32 == 0; }
  void copy_block(int64_t begin, int64_t end) const {
    copy_streamed(backup + begin, theta + begin, sizeof(T) * (end - begin));
    if constexpr (SAVE) copy_streamed(dir + begin, g + begin, sizeof(T) * (end - begin));
  }

  template <int V, bool COPIES> GRF_HD void run(int64_t i) const {
    const Pack<T, V> t = ld<V>(theta, i), gp = ld<V>(g, i);
    Pack<T, V> nt, ng;
GRF_UNROLL
    for (int k = 0; k < V; ++k) {
      C new_theta, new_g;
      perturb_elem(to_c(t.v[k]), to_c(gp.v[k]), eps, fold, ADAPTIVE, new_theta, new_g);
      nt.v[k] = from_c<T>(new_theta);
      ng.v[k] = from_c<T>(new_g);
    }
    if constexpr (COPIES) {
      st<V>(backup, i, t);
      if constexpr (SAVE) st<V>(dir, i, gp);
    }
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

// θ = backup, and an interval=k refresh's direction: zeros (ZERO: the step is skipped; the
// saved g1 may hold inf/NaN) or G·a + d·c (a frozen tensor).
template <class T, bool ZERO> struct RestoreDirChunk {
  using value_type = T;
  using C = compute_t<T>;
  static constexpr bool kThetaWriteOnly = true;
  T* theta;
  const T* backup;
  const T* G;  // null when ZERO
  T* d;
  C a, c;

  GRF_HD bool aligned16() const {
    return (addr(theta) | addr(backup) | addr(G) | addr(d)) % 16 == 0;
  }
  RestoreDirChunk at(int64_t k) const {
    return RestoreDirChunk{theta + k, backup + k, ZERO ? G : G + k, d + k, a, c};
  }
  template <int V> GRF_HD void apply(int64_t i) const {
    st<V>(theta, i, ld<V>(backup, i));
    Pack<T, V> dp;
    if constexpr (ZERO) {
GRF_UNROLL
      for (int k = 0; k < V; ++k) dp.v[k] = from_c<T>(C(0));
    } else {
      const Pack<T, V> gp = ld<V>(G, i);
      dp = ld<V>(d, i);
GRF_UNROLL
      for (int k = 0; k < V; ++k) dp.v[k] = from_c<T>(cache_direction(to_c(gp.v[k]), to_c(dp.v[k]), a, c));
    }
    st<V>(d, i, dp);
  }
};

// The gradient an update of kind KIND (grf_api.h's UpdateKind) applies, from G and the
// direction d: kPlain g = gscale·G (s0 = gscale); kCache the same, and d = a·G + c·d first
// (s1 = a, s2 = c); kReuse g = u·G + v·d (s0 = u, s1 = v).
template <class T, int KIND> struct GradSource {
  using C = compute_t<T>;
  const T* G;
  T* d;  // null for kPlain
  C s0, s1, s2;

  GRF_HD uintptr_t address_bits() const { return addr(G) | (KIND != kPlain ? addr(d) : 0); }
  GRF_HD GradSource at(int64_t k) const {
    return GradSource{G + k, KIND != kPlain ? d + k : d, s0, s1, s2};
  }
  // g of elements i .. i+V-1 in the compute type
  template <int V> GRF_HD void read(int64_t i, C (&g)[V]) const {
    const Pack<T, V> gp = ld<V>(G, i);
    if constexpr (KIND == kPlain) {
GRF_UNROLL
      for (int k = 0; k < V; ++k) g[k] = combined_grad(to_c(gp.v[k]), s0);
    } else if constexpr (KIND == kCache) {
      Pack<T, V> dp = ld<V>(d, i);
GRF_UNROLL
      for (int k = 0; k < V; ++k) {
        const C Gk = to_c(gp.v[k]);
        g[k] = combined_grad(Gk, s0);
        dp.v[k] = from_c<T>(cache_direction(Gk, to_c(dp.v[k]), s1, s2));
      }
      st<V>(d, i, dp);
    } else {
      const Pack<T, V> dp = ld<V>(d, i);
GRF_UNROLL
      for (int k = 0; k < V; ++k) g[k] = reuse_grad(to_c(gp.v[k]), to_c(dp.v[k]), s0, s1);
    }
  }
};

// The updates below write θ without reading it, a function of the backup (θ0), except
// between interval=k refreshes (kReuse), where θ0 is θ itself.
template <int KIND> constexpr bool writes_theta_only() { return KIND != kReuse; }

// θ = backup;  G = g (the GR wrapper's base optimizer steps afterwards); kReuse: G = g only.
template <class T, int KIND> struct NoneChunk {
  using value_type = T;
  using C = compute_t<T>;
  static constexpr bool kThetaWriteOnly = writes_theta_only<KIND>();
  T* theta;  // null for kReuse
  T* G;
  const T* backup;  // null for kReuse
  GradSource<T, KIND> src;  // src.G is G

  GRF_HD bool aligned16() const {
    return (addr(theta) | addr(G) | addr(backup) | src.address_bits()) % 16 == 0;
  }
  NoneChunk at(int64_t k) const { return NoneChunk{theta + k, G + k, backup + k, src.at(k)}; }

  template <int V> GRF_HD void apply(int64_t i) const {
    if constexpr (KIND != kReuse) st<V>(theta, i, ld<V>(backup, i));
    C g[V];
    src.template read<V>(i, g);
    Pack<T, V> gp;
GRF_UNROLL
    for (int k = 0; k < V; ++k) gp.v[k] = from_c<T>(g[k]);
    st<V>(G, i, gp);
  }
};

// torch.optim.SGD's update from θ0 with g. MODE: a MomentumMode.
template <class T, int MODE, int KIND> struct SgdChunk {
  using value_type = T;
  using C = compute_t<T>;
  static constexpr bool kThetaWriteOnly = writes_theta_only<KIND>();
  T* theta;
  const T* theta0;  // the backup, or θ (kReuse)
  T* buf;           // null when MODE is kNoMomentum
  GradSource<T, KIND> src;
  SgdHp<C> h;

  GRF_HD bool aligned16() const {
    return (addr(theta) | addr(theta0) | (MODE != kNoMomentum ? addr(buf) : 0) |
            src.address_bits()) % 16 == 0;
  }
  SgdChunk at(int64_t k) const {
    return SgdChunk{theta + k, theta0 + k, MODE != kNoMomentum ? buf + k : buf, src.at(k), h};
  }

  template <int V> GRF_HD void apply(int64_t i) const {
    C g[V];
    src.template read<V>(i, g);
    const Pack<T, V> b = ld<V>(theta0, i);
    Pack<T, V> mp = b, nt;
    if constexpr (MODE == kWithMomentum) mp = ld<V>(buf, i);
GRF_UNROLL
    for (int k = 0; k < V; ++k) {
      C m = to_c(mp.v[k]);
      nt.v[k] = from_c<T>(sgd_elem<MODE>(g[k], to_c(b.v[k]), m, h));
      mp.v[k] = from_c<T>(m);
    }
    st<V>(theta, i, nt);
    if constexpr (MODE != kNoMomentum) st<V>(buf, i, mp);
  }
};

// torch.optim.AdamW's update from θ0 with g and the bias corrections of the tensor's own
// (already advanced) step count.
template <class T, int KIND> struct AdamChunk {
  using value_type = T;
  using C = compute_t<T>;
  static constexpr bool kThetaWriteOnly = writes_theta_only<KIND>();
  T* theta;
  const T* theta0;  // the backup, or θ (kReuse)
  T* m;
  T* v;
  GradSource<T, KIND> src;
  AdamHp<C> h;
  AdamStep<C> bias;

  GRF_HD bool aligned16() const {
    return (addr(theta) | addr(theta0) | addr(m) | addr(v) | src.address_bits()) % 16 == 0;
  }
  AdamChunk at(int64_t k) const {
    return AdamChunk{theta + k, theta0 + k, m + k, v + k, src.at(k), h, bias};
  }

  template <int V> GRF_HD void apply(int64_t i) const {
    C g[V];
    src.template read<V>(i, g);
    const Pack<T, V> b = ld<V>(theta0, i);
    Pack<T, V> mp = ld<V>(m, i), vp = ld<V>(v, i), nt;
GRF_UNROLL
    for (int k = 0; k < V; ++k) {
      C mm = to_c(mp.v[k]), vv = to_c(vp.v[k]);
      nt.v[k] = from_c<T>(adamw_elem(g[k], to_c(b.v[k]), mm, vv, h, bias));
      mp.v[k] = from_c<T>(mm);
      vp.v[k] = from_c<T>(vv);
    }
    st<V>(theta, i, nt);
    st<V>(m, i, mp);
    st<V>(v, i, vp);
  }
};

// ---------------------------------------------------------------- ops
// The chunk's span of the direction row (`dirs`: one address per tensor).
template <class X> GRF_HD X* dir_at(const int64_t* dirs, const Span& s) {
  return global(reinterpret_cast<X*>(dirs[s.t]) + s.start);
}

template <class T, bool ADAPTIVE> struct NormOp {
  using value_type = T;
  GRF_HD void prepare() {}
  template <class F> GRF_HD void visit(const TableView& tb, const Span& s, F&& f) const {
    f(NormChunk<T, ADAPTIVE>{tb.row<const T>(kGrad, s),
                             ADAPTIVE ? tb.row<const T>(kParam, s) : nullptr});
  }
};

template <class T> struct DotsOp {
  using value_type = T;
  const int64_t* dirs;
  GRF_HD void prepare() {}
  template <class F> GRF_HD void visit(const TableView& tb, const Span& s, F&& f) const {
    f(DotsChunk<T>{tb.row<const T>(kGrad, s), dir_at<const T>(global(dirs), s)});
  }
};

template <class T, bool ADAPTIVE, bool SAVE> struct PerturbOp {
  using value_type = T;
  static constexpr bool kBackward = true;  // after a norm (host.cpp: walks_backward)
  using C = compute_t<T>;
  const C* eps_at;
  const C* fold_at;
  const int64_t* dirs;  // SAVE only
  C eps = C(0), fold = C(0);

  GRF_HD void prepare() { eps = *eps_at; fold = *fold_at; }
  template <class F> GRF_HD void visit(const TableView& tb, const Span& s, F&& f) const {
    T* dir = nullptr;
    if constexpr (SAVE) dir = dir_at<T>(global(dirs), s);
    f(PerturbChunk<T, ADAPTIVE, SAVE>{tb.row<T>(kParam, s), tb.row<T>(kGrad, s),
                                      tb.backup_at<T>(s), dir, eps, fold});
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

// Phase 3 reads its step scalars (s0, s1, s2: see UpdateKind) and found_inf; when found_inf
// is set, θ = backup and nothing else is written (kReuse: nothing at all; kCache: the
// direction is zeroed). A tensor flagged FROZEN is treated so too (kCache: its direction
// still gets G·a + d·c).
template <class T, int KIND> struct UpdateScalars {
  using C = compute_t<T>;
  const C* s0_at;
  const C* found_inf_at;
  const C* s1_at;
  const C* s2_at;
  const int64_t* dirs;
  C s0 = C(0), s1 = C(0), s2 = C(0);
  bool skip = false;

  GRF_HD void read() {
    s0 = *s0_at;
    if constexpr (KIND != kPlain) s1 = *s1_at;
    if constexpr (KIND == kCache) s2 = *s2_at;
    skip = *found_inf_at != C(0);
  }
  // true: this chunk's θ = backup and nothing else (kReuse: nothing)
  GRF_HD bool keeps(const TableView& tb, const Span& s) const {
    return skip || (tb.flags(s) & kFrozen);
  }
  // Hands f the chunk view of a chunk that keeps its values (a skipped step, a frozen
  // tensor); see above.
  template <class F> GRF_HD void keep(const TableView& tb, const Span& s, F&& f) const {
    if constexpr (KIND == kPlain) {
      f(RestoreChunk<T>{tb.row<T>(kParam, s), tb.backup_at<const T>(s)});
    } else if constexpr (KIND == kCache) {
      T* d = dir_at<T>(global(dirs), s);
      if (skip)
        f(RestoreDirChunk<T, true>{tb.row<T>(kParam, s), tb.backup_at<const T>(s), nullptr, d,
                                   C(0), C(0)});
      else
        f(RestoreDirChunk<T, false>{tb.row<T>(kParam, s), tb.backup_at<const T>(s),
                                    tb.row<const T>(kGrad, s), d, s1, s2});
    }
  }
  // the chunk's gradient source
  GRF_HD GradSource<T, KIND> source(const TableView& tb, const Span& s) const {
    T* d = nullptr;
    if constexpr (KIND != kPlain) d = dir_at<T>(global(dirs), s);
    return GradSource<T, KIND>{tb.row<const T>(kGrad, s), d, s0, s1, s2};
  }
  // where the chunk's update starts from: the backup, or θ itself (kReuse)
  GRF_HD const T* theta0(const TableView& tb, const Span& s) const {
    if constexpr (KIND == kReuse) return tb.row<const T>(kParam, s);
    return tb.backup_at<const T>(s);
  }
};

template <class T, int KIND> struct UpdateNoneOp {
  using value_type = T;
  static constexpr bool kBackward = true;  // after a norm (host.cpp: walks_backward)
  UpdateScalars<T, KIND> s;

  GRF_HD void prepare() { s.read(); }
  template <class F> GRF_HD void visit(const TableView& tb, const Span& sp, F&& f) const {
    if (s.keeps(tb, sp)) {
      s.keep(tb, sp, f);
      return;
    }
    if constexpr (KIND == kReuse)
      f(NoneChunk<T, KIND>{nullptr, tb.row<T>(kGrad, sp), nullptr, s.source(tb, sp)});
    else
      f(NoneChunk<T, KIND>{tb.row<T>(kParam, sp), tb.row<T>(kGrad, sp),
                           tb.backup_at<const T>(sp), s.source(tb, sp)});
  }
};

template <class T, int KIND> struct UpdateSgdOp {
  using value_type = T;
  static constexpr bool kBackward = true;  // after a norm (host.cpp: walks_backward)
  using C = compute_t<T>;
  UpdateScalars<T, KIND> s;
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
      s.keep(tb, sp, f);
      return;
    }
    T* theta = tb.row<T>(kParam, sp);
    const T* theta0 = s.theta0(tb, sp);
    const GradSource<T, KIND> src = s.source(tb, sp);
    if (momentum == 0) {
      f(SgdChunk<T, kNoMomentum, KIND>{theta, theta0, nullptr, src, h});
    } else if (tb.flags(sp) & kNewState) {  // created for this step: buf = g, never read
      f(SgdChunk<T, kFirstMomentum, KIND>{theta, theta0, tb.row<T>(kMomentum, sp), src, h});
    } else {
      f(SgdChunk<T, kWithMomentum, KIND>{theta, theta0, tb.row<T>(kMomentum, sp), src, h});
    }
  }
};

template <class T, int KIND> struct UpdateAdamwOp {
  using value_type = T;
  static constexpr bool kBackward = true;  // after a norm (host.cpp: walks_backward)
  using C = compute_t<T>;
  UpdateScalars<T, KIND> s;
  Lr lr;
  double beta1, beta2, eps, weight_decay;
  double rate = 0;
  AdamHp<C> h{};

  GRF_HD void prepare() {
    s.read();
    rate = lr_value(lr);
    h = make_adam_hp<C>(rate, beta1, beta2, eps, weight_decay);
  }
  template <class F> GRF_HD void visit(const TableView& tb, const Span& sp, F&& f) const {
    if (s.keeps(tb, sp)) {
      s.keep(tb, sp, f);
      return;
    }
    const float step = *global(reinterpret_cast<const float*>(tb.ptrs[kStep * tb.num_tensors + sp.t]));
    f(AdamChunk<T, KIND>{tb.row<T>(kParam, sp), s.theta0(tb, sp), tb.row<T>(kExpAvg, sp),
                         tb.row<T>(kExpAvgSq, sp), s.source(tb, sp), h,
                         adam_step<C>(double(step), rate, beta1, beta2)});
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

// Calls f(std::integral_constant<int, kind>{}) for an UpdateKind, checking what it needs.
template <class F> void dispatch_kind(int kind, ptr dirs, ptr s1, ptr s2, F&& f) {
  if (kind != kPlain && (dirs == 0 || s1 == 0 || (kind == kCache && s2 == 0)))
    throw std::invalid_argument("gr_fused._C: update kind " + std::to_string(kind) +
                                " needs the direction row and its scalars");
  switch (kind) {
    case kPlain: f(std::integral_constant<int, kPlain>{}); break;
    case kCache: f(std::integral_constant<int, kCache>{}); break;
    case kReuse: f(std::integral_constant<int, kReuse>{}); break;
    default:
      throw std::invalid_argument("gr_fused._C: unknown update kind " + std::to_string(kind));
  }
}

inline Lr make_lr(double value, ptr at, int dtype) {
  if (at != 0 && dtype != kF32 && dtype != kF64)
    throw std::invalid_argument("gr_fused._C: a tensor lr must be float32 or float64, not code " +
                                std::to_string(dtype));
  return Lr{value, at, dtype};
}

// The number of groups that a finalize's `bounds` describe (checked), and its per-group
// lists (each empty, or one value per group).
inline int check_groups(const std::vector<int64_t>& bounds, const char* what,
                        std::initializer_list<const std::vector<double>*> lists = {}) {
  const int64_t groups = int64_t(bounds.size()) - 1;
  if (groups < 1 || groups > kMaxGroups)
    throw std::invalid_argument(std::string("gr_fused._C.") + what + ": 1 to " +
                                std::to_string(kMaxGroups) + " groups, not " +
                                std::to_string(groups));
  for (int64_t g = 0; g < groups; ++g)
    if (bounds[g] > bounds[g + 1] || bounds[g] < 0)
      throw std::invalid_argument(std::string("gr_fused._C.") + what +
                                  ": bounds must not decrease");
  for (const std::vector<double>* list : lists)
    if (!list->empty() && int64_t(list->size()) != groups)
      throw std::invalid_argument(std::string("gr_fused._C.") + what +
                                  ": one sign (and reuse scale) per group");
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

inline const int64_t* dirs_of(ptr dirs) { return reinterpret_cast<const int64_t*>(dirs); }

template <class Run> void run_dots(Run&& run, int dtype, ptr dirs, ptr partials) {
  if (dirs == 0) throw std::invalid_argument("gr_fused._C.dots: no direction row");
  dispatch_dtype(dtype, [&](auto tag) {
    run.norm(DotsOp<decltype(tag)>{dirs_of(dirs)}, reinterpret_cast<double*>(partials));
  });
}

template <class Run>
void run_perturb(Run&& run, int dtype, ptr eps, ptr fold, bool adaptive, ptr dirs) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    dispatch_bool(adaptive, [&](auto a) {
      dispatch_bool(dirs != 0, [&](auto save) {
        run.foreach(PerturbOp<T, decltype(a)::value, decltype(save)::value>{
                        reinterpret_cast<const C*>(eps), reinterpret_cast<const C*>(fold),
                        dirs_of(dirs)},
                    "perturb");
      });
    });
  });
}

template <class Run> void run_reflect(Run&& run, int dtype) {
  dispatch_dtype(dtype, [&](auto tag) { run.foreach(ReflectOp<decltype(tag)>{}, "reflect"); });
}

template <class Run> void run_restore(Run&& run, int dtype) {
  dispatch_dtype(dtype, [&](auto tag) { run.foreach(RestoreOp<decltype(tag)>{}, "restore"); });
}

// The scalars of an update (see UpdateKind).
struct UpdateArgs {
  ptr s0, found_inf;
  int kind;
  ptr dirs, s1, s2;
};

template <class T, int KIND> UpdateScalars<T, KIND> update_scalars_at(const UpdateArgs& a) {
  using C = compute_t<T>;
  return UpdateScalars<T, KIND>{reinterpret_cast<const C*>(a.s0),
                                reinterpret_cast<const C*>(a.found_inf),
                                reinterpret_cast<const C*>(a.s1),
                                reinterpret_cast<const C*>(a.s2), dirs_of(a.dirs)};
}

template <class Run> void run_update_none(Run&& run, int dtype, const UpdateArgs& a) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_kind(a.kind, a.dirs, a.s1, a.s2, [&](auto kind) {
      constexpr int K = decltype(kind)::value;
      run.foreach(UpdateNoneOp<T, K>{update_scalars_at<T, K>(a)}, "update_none");
    });
  });
}

template <class Run>
void run_update_sgd(Run&& run, int dtype, const UpdateArgs& a, Lr lr, double momentum,
                    double dampening, double weight_decay, bool nesterov) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_kind(a.kind, a.dirs, a.s1, a.s2, [&](auto kind) {
      constexpr int K = decltype(kind)::value;
      run.foreach(UpdateSgdOp<T, K>{update_scalars_at<T, K>(a), lr, momentum, dampening,
                                    weight_decay, nesterov},
                  "update_sgd");
    });
  });
}

// The element-wise pass only: each tensor's step count must be advanced before it.
template <class Run>
void run_update_adamw(Run&& run, int dtype, const UpdateArgs& a, Lr lr, double beta1,
                      double beta2, double eps, double weight_decay) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_kind(a.kind, a.dirs, a.s1, a.s2, [&](auto kind) {
      constexpr int K = decltype(kind)::value;
      run.foreach(UpdateAdamwOp<T, K>{update_scalars_at<T, K>(a), lr, beta1, beta2, eps,
                                      weight_decay},
                  "update_adamw");
    });
  });
}

}  // namespace grf
