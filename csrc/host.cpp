// The host build: the phases of grf_api.h as OpenMP loops over the ops of grf_ops.h, so the
// CPU runs exactly the per-element math the CUDA kernels run.
//
// It is compiled twice on x86-64: into namespace grf::host for any x86-64 CPU, and with
// -mavx2 -mfma into grf::host_avx2 (GRF_HOST_NS); bind.cpp picks one at run time. Both are
// compiled with -ffp-contract=off, so every operation rounds once, as grf_math.h writes it,
// and the two give the same bits.
//
// Work is cut into fixed chunks of kChunk elements, independent of the thread count; the
// norm sums each chunk in kParts × kLanes double lanes, then the lanes and the chunks in a
// fixed order. So the norm is the same bit for bit whatever the number of threads.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "grf_ops.h"

#ifndef GRF_HOST_NS
#define GRF_HOST_NS host
#endif

namespace grf {
namespace GRF_HOST_NS {
namespace {

constexpr int64_t kChunk = 1 << 15;
constexpr int64_t kMinChunksPerThread = 8;  // a thread gets ≥ 256K elements, or stays idle
constexpr int kLanes = 16;

// The norm sums a chunk as kParts equal parts, each in its own kLanes double lanes. With
// AVX2 (16 registers hold the 4 × kLanes lanes) it reads the parts at once, for the types
// whose pass memory bounds; otherwise part after part (with SSE2 the lanes would spill, and
// fp16's software conversion bounds its pass). Each lane adds the same elements in the same
// order either way, so both give the same bits.
constexpr int kParts = 4;
template <class T> constexpr bool parts_at_once() {
#ifdef __AVX2__
  return !std::is_same<T, half_t>::value;
#else
  return false;
#endif
}

int64_t chunks_of(int64_t n) { return (n + kChunk - 1) / kChunk; }

// How many of the `threads` allowed to use on `chunks` chunks: waking a thread costs more
// than a small loop (and much more on a busy machine).
int team_size(int64_t chunks, int threads) {
  return int(std::max<int64_t>(1, std::min<int64_t>(threads, chunks / kMinChunksPerThread)));
}

// Runs op over [0, n): packs of V elements (V > 1: the CUDA kernels' 16-byte accesses, when
// Where::host_packs; a chunk starts at a multiple of V), then single elements at the end of
// a chunk. With V = 1 the compiler vectorizes the loop itself, which is faster here.
template <int V, class Op> void for_each_v(const Op& op, int64_t n, int threads) {
  const bool skipped = op.skipped();
  const int64_t chunks = chunks_of(n);
  const int team = team_size(chunks, threads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const Op local = op;  // a private copy: the compiler need not reload it after stores
    const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    int64_t i = begin;
    if (skipped) {
      for (; i + V <= end; i += V) local.template apply_skipped<V>(i);
      for (; i < end; ++i) local.template apply_skipped<1>(i);
    } else {
      for (; i + V <= end; i += V) local.template apply<V>(i);
      for (; i < end; ++i) local.template apply<1>(i);
    }
#ifdef GRF_STREAM_STORES
    if constexpr (streams_v<Op>) _mm_sfence();  // this thread's streamed stores, in order
#endif
  }
}

template <class Op> void for_each(Op op, int64_t n, const Where& w, int align) {
  op.prepare();
#ifdef GRF_STREAM_STORES
  // An op with a write-only buffer, in 32-byte packs (st_stream) where the buffers allow:
  // fp32 and fp64 (GCC vectorizes their packs; fp16/bf16 packs convert lane by lane).
  using T = typename Op::value_type;
  if constexpr (streams_v<Op> && (std::is_same<T, float>::value || std::is_same<T, double>::value)) {
    if (align >= 32) return for_each_v<32 / int(sizeof(T))>(op, n, w.threads);
  }
#endif
  if (align >= 16 && w.host_packs)
    for_each_v<vec_width<typename Op::value_type>()>(op, n, w.threads);
  else
    for_each_v<1>(op, n, w.threads);
}

// Σ over [0, n), chunk by chunk, in kParts × kLanes lanes (see kParts): element j of a chunk
// lands in lane (j / part, j % kLanes), those past the parts in the lanes of part 0, whether
// it is read in packs of V or alone and whether the parts are read at once or in turn. So the
// sum has the same bits for any V, either build and any thread count. Reading the parts at
// once puts more loads in flight than one read stream per core does: with 4 parts the fp32
// norm takes about 0.7× the time here.
template <int V, class Op> double sum_squares_v(const Op& op, int64_t n, int threads) {
  static_assert(kLanes % V == 0, "a pack must not straddle two rounds of lanes");
  const int64_t chunks = chunks_of(n);
  const int team = team_size(chunks, threads);
  std::vector<double> partial(chunks);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const Op local = op;
    const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    const int64_t part = (end - begin) / (kParts * kLanes) * kLanes;  // a multiple of kLanes
    double acc[kParts][kLanes] = {};
    if constexpr (parts_at_once<typename Op::value_type>()) {
      const int64_t stop = begin + part;
      for (int64_t i = begin; i < stop; i += kLanes)  // (an unroll pragma on s: 1.6× slower)
        for (int s = 0; s < kParts; ++s)
          for (int k = 0; k < kLanes; k += V) local.template accumulate<V>(i + s * part + k, &acc[s][k]);
    } else {
      for (int s = 0; s < kParts; ++s)
        for (int64_t i = begin + s * part; i < begin + (s + 1) * part; i += kLanes)
          for (int k = 0; k < kLanes; k += V) local.template accumulate<V>(i + k, &acc[s][k]);
    }
    for (int64_t i = begin + kParts * part; i < end; ++i)
      local.template accumulate<1>(i, &acc[0][i % kLanes]);
    double sum = 0;
    for (int s = 0; s < kParts; ++s)
      for (int k = 0; k < kLanes; ++k) sum += acc[s][k];
    partial[c] = sum;
  }
  double total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c];
  return total;
}

template <class Op> double sum_squares(const Op& op, int64_t n, const Where& w, bool aligned) {
  if (aligned && w.host_packs)
    return sum_squares_v<vec_width<typename Op::value_type>()>(op, n, w.threads);
  return sum_squares_v<1>(op, n, w.threads);
}

// Σ g² (Σ (θ·g)² when theta != 0) over a buffer of T, in double.
template <class T> double sum_sq(const Where& w, int64_t n, ptr g, ptr theta) {
  double sum = 0;
  dispatch_bool(theta != 0, [&](auto adaptive) {
    SqNormOp<T, decltype(adaptive)::value> op{as<const T>(g), as<const T>(theta)};
    sum = sum_squares(op, n, w, aligned16({g, theta}));
  });
  return sum;
}

// The host driver of grf_ops.h's run_* phases: the OpenMP loop.
struct HostRun {
  const Where& w;
  template <class Op> void operator()(const Op& op, int64_t n, int align, const char*) const {
    for_each(op, n, w, align);
  }
};

// partials[begin:end] added in index order.
double sum_range(const double* partials, int64_t begin, int64_t end) {
  double sum = 0;
  for (int64_t i = begin; i < end; ++i) sum += partials[i];
  return sum;
}

}  // namespace

void sq_norm(const Where& w, int dtype, int64_t n, ptr g, ptr theta, ptr, ptr out) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    *as<compute_t<T>>(out) = compute_t<T>(sum_sq<T>(w, n, g, theta));
  });
}

int64_t norm_partials(const Where& w, int dtype, int64_t n, ptr g, ptr theta, ptr partials) {
  dispatch_dtype(dtype, [&](auto tag) {
    *as<double>(partials) = sum_sq<decltype(tag)>(w, n, g, theta);
  });
  return 1;
}

void ascent_finalize(const Where&, int ctype, ptr partials, int64_t count, ptr scale, ptr out,
                     double rho, double gamma, double alpha, bool normalize, bool fixed_alpha,
                     bool central) {
  dispatch_compute(ctype, [&](auto tag) {
    ascent_scalars_of(sum_range(as<const double>(partials), 0, count), as<const float>(scale),
                      AscentHp{rho, gamma, alpha, normalize, fixed_alpha, central},
                      as<decltype(tag)>(out));
  });
}

void update_finalize(const Where&, int ctype, ptr partials, const std::vector<int64_t>& bounds,
                     ptr ascent, ptr scale, ptr out, ptr count, ptr last, ptr scaler_flag,
                     ptr adam_step, bool clip, double max_norm) {
  const int groups = check_groups(bounds);
  dispatch_compute(ctype, [&](auto tag) {
    using C = decltype(tag);
    C sq[kMaxGroups];
    for (int g = 0; g < groups; ++g)
      sq[g] = C(sum_range(as<const double>(partials), bounds[g], bounds[g + 1]));
    C* result = as<C>(out);
    update_scalars_of(sq, as<const C>(ascent), groups, as<const float>(scale), clip, max_norm,
                      result);
    record_skip(result[groups], as<int64_t>(count), as<bool>(last), as<float>(scaler_flag),
                as<float>(adam_step));
  });
}

void perturb(const Where& w, int dtype, int64_t n, ptr theta, ptr g, ptr backup, ptr eps,
             ptr fold, bool adaptive, bool into) {
  run_perturb(HostRun{w}, dtype, n, theta, g, backup, eps, fold, adaptive, into);
}

void reflect(const Where& w, int dtype, int64_t n, ptr theta, ptr g, ptr backup) {
  run_reflect(HostRun{w}, dtype, n, theta, g, backup);
}

void restore(const Where& w, int dtype, int64_t n, ptr theta, ptr backup) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* dst = as<T>(theta);
    const T* src = as<const T>(backup);
    const int64_t chunks = chunks_of(n);
    const int team = team_size(chunks, w.threads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      std::memcpy(dst + begin, src + begin, sizeof(T) * (end - begin));
    }
  });
}

void update_none(const Where& w, int dtype, int64_t n, ptr theta, ptr G, ptr backup,
                 ptr gscale, ptr found_inf) {
  run_update_none(HostRun{w}, dtype, n, theta, G, backup, gscale, found_inf);
}

void update_sgd(const Where& w, int dtype, int64_t n, ptr theta, ptr G, ptr backup, ptr buf,
                bool first, ptr gscale, ptr found_inf, double lr, double momentum,
                double dampening, double weight_decay, bool nesterov) {
  run_update_sgd(HostRun{w}, dtype, n, theta, G, backup, buf, first, gscale, found_inf, lr,
                 momentum, dampening, weight_decay, nesterov);
}

void update_adamw(const Where& w, int dtype, int64_t n, ptr theta, ptr G, ptr backup, ptr m,
                  ptr v, ptr step, ptr gscale, ptr found_inf, double lr, double beta1,
                  double beta2, double eps, double weight_decay, bool step_advanced) {
  run_update_adamw(HostRun{w}, dtype, n, theta, G, backup, m, v, step, gscale, found_inf, lr,
                   beta1, beta2, eps, weight_decay, step_advanced);
  if (step_advanced) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using C = compute_t<decltype(tag)>;
    if (*as<const C>(found_inf) == C(0)) *as<float>(step) += 1.0f;
  });
}

}  // namespace GRF_HOST_NS
}  // namespace grf
