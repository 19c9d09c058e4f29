// The host build: the phases of grf_api.h as OpenMP loops over the chunks of a tensor table,
// running the ops of grf_ops.h, so the CPU runs exactly the per-element math the CUDA
// kernels run.
//
// It is compiled twice on x86-64: into namespace grf::host for any x86-64 CPU, and with
// -mavx2 -mfma into grf::host_avx2 (GRF_HOST_NS); bind.cpp picks one at run time. Both are
// compiled with -ffp-contract=off, so every operation rounds once, as grf_math.h writes it,
// and the two give the same bits.
//
// The unit of work is the table's chunk (cext_backend.py's CpuBackend.chunk elements, or
// fewer at the end of a tensor), independent of the thread count. The norm sums each chunk
// in kParts × kLanes double lanes into one partial per chunk, then the lanes and the chunks
// in a fixed order: the same bits whatever the number of threads.
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

constexpr int64_t kMinPerThread = 1 << 18;  // a thread wakes for ≥ 256K elements of work
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

// How many of the `threads` allowed to use on `n` elements: waking a thread costs more than
// a small loop (and much more on a busy machine).
int team_size(int64_t n, int threads) {
  return int(std::max<int64_t>(1, std::min<int64_t>(threads, n / kMinPerThread)));
}

// One chunk of an element-wise op: packs of V elements, then single elements at its end.
// With V = 1 the compiler vectorizes the loop itself, which is faster here than packs.
template <int V, class Ch> void chunk_loop(const Ch& ch, int64_t len) {
  int64_t i = 0;
  for (; i + V <= len; i += V) ch.template apply<V>(i);
  for (; i < len; ++i) ch.template apply<1>(i);
}

// The buffers a phase only writes go out as non-temporal stores (AVX2), which do not read
// the destination's lines into the cache first, in blocks of kCopyBlock elements:
// * perturb's backup ← θ (and, saving an interval=k direction, direction ← g): the block's
//   copies (copy_streamed), then the rest of the op on the block, whose θ and g are still in
//   L1; so each is read from memory once;
// * the updates' θ (a function of the backup, G and the state): the block's new θ into an
//   L1 buffer by the usual loop, then that buffer out to θ when θ is 32-byte aligned.
// Only for tables of at least kStreamBytes: smaller ones stay in the caches between the
// phases, where plain stores win (a non-temporal store evicts the line).
constexpr int64_t kCopyBlock = 512;
constexpr int64_t kStreamBytes = int64_t(8) << 20;

template <class Ch> void run_chunk(const Ch& view, int64_t len, bool packs, bool stream) {
  const Ch ch = view;  // a private copy: the compiler need not reload it after stores
  using T = typename Ch::value_type;
  if (packs && ch.aligned16()) {  // the CUDA kernels' pack code (tests)
    chunk_loop<vec_width<T>()>(ch, len);
    return;
  }
#ifdef GRF_STREAM_STORES
  if constexpr (streams_v<Ch>) {
    if (stream && ch.stream_aligned()) {
      for (int64_t begin = 0; begin < len; begin += kCopyBlock) {
        const int64_t end = std::min(len, begin + kCopyBlock);
        ch.copy_block(begin, end);
        for (int64_t i = begin; i < end; ++i) ch.template apply_rest<1>(i);
      }
      _mm_sfence();  // this thread's streamed stores, in order before what follows
      return;
    }
  }
  if constexpr (theta_write_only_v<Ch>) {
    if (stream && addr(ch.theta) % 32 == 0) {
      alignas(64) T stage[kCopyBlock];
      for (int64_t begin = 0; begin < len; begin += kCopyBlock) {
        const int64_t n = std::min(len - begin, kCopyBlock);
        Ch block = ch.at(begin);
        T* const theta = block.theta;
        block.theta = stage;
        chunk_loop<1>(block, n);
        copy_streamed(theta, stage, sizeof(T) * n);
      }
      _mm_sfence();
      return;
    }
  }
#endif
  chunk_loop<1>(ch, len);
}

// Whether an op walks the chunks from the last to the first (`static constexpr bool
// kBackward`; perturb and the updates): each follows a norm over the same gradients, which
// walks them forward, so it starts where the norm's last chunks are still in the L2/L3
// caches (in a C++ loop, a pass over 40 MB right after one over the same memory took 0.82×
// the time backward and 1.0× forward, on a 32 MiB L3; the whole step about 0.96×).
template <class Op, class = void> struct walks_backward : std::false_type {};
template <class Op>
struct walks_backward<Op, std::void_t<decltype(Op::kBackward)>> : std::bool_constant<Op::kBackward> {};

// Runs op over every chunk of the table.
template <class Op> void foreach_chunk(Op op, const Table& table, const Where& w) {
  if (table.num_chunks <= 0) return;
  op.prepare();
  const TableView tb = view_of(table);
  const int64_t numel = tb.numel();
  const int team = team_size(numel, w.threads);
  const bool packs = w.host_packs;
  const bool stream = numel * int64_t(sizeof(typename Op::value_type)) >= kStreamBytes;
#pragma omp parallel for num_threads(team) schedule(dynamic, 1) if (team > 1)
  for (int64_t k = 0; k < tb.num_chunks; ++k) {
    const Span s = tb.span(walks_backward<Op>::value ? tb.num_chunks - 1 - k : k);
    op.visit(tb, s, [&](const auto& ch) { run_chunk(ch, s.len, packs, stream); });
  }
}

// Σ over one chunk in kParts × kLanes lanes (see kParts): element j lands in lane
// (j / part, j % kLanes), those past the parts in the lanes of part 0, whether it is read in
// packs of V or alone and whether the parts are read at once or in turn. So the sum has the
// same bits for any V and either build. Reading the parts at once puts more loads in flight
// than one read stream per core does: with 4 parts the fp32 norm takes about 0.7× the time.
template <int V, class Ch> double chunk_sum_v(const Ch& ch, int64_t len) {
  static_assert(kLanes % V == 0, "a pack must not straddle two rounds of lanes");
  using T = typename Ch::value_type;
  const int64_t part = len / (kParts * kLanes) * kLanes;  // a multiple of kLanes
  if (part == 0) {  // a short chunk: only part 0's lanes get terms (the others add +0: same bits)
    double lanes[kLanes] = {};
    for (int64_t i = 0; i < len; ++i) lanes[i % kLanes] += ch.term(i);
    double sum = 0;
    for (int k = 0; k < kLanes; ++k) sum += lanes[k];
    return sum;
  }
  double acc[kParts][kLanes] = {};
  if constexpr (V == 1) {  // the element's term straight into its lane: GCC vectorizes over k
    if constexpr (parts_at_once<T>()) {
      for (int64_t i = 0; i < part; i += kLanes)
        for (int s = 0; s < kParts; ++s)
          for (int k = 0; k < kLanes; ++k) acc[s][k] += ch.term(i + s * part + k);
    } else {
      for (int s = 0; s < kParts; ++s)
        for (int64_t i = s * part; i < (s + 1) * part; i += kLanes)
          for (int k = 0; k < kLanes; ++k) acc[s][k] += ch.term(i + k);
    }
  } else {  // the CUDA kernels' packs (tests)
    for (int s = 0; s < kParts; ++s)
      for (int64_t i = s * part; i < (s + 1) * part; i += kLanes)
        for (int k = 0; k < kLanes; k += V) ch.template accumulate<V>(i + k, &acc[s][k]);
  }
  for (int64_t i = kParts * part; i < len; ++i) acc[0][i % kLanes] += ch.term(i);
  double sum = 0;
  for (int s = 0; s < kParts; ++s)
    for (int k = 0; k < kLanes; ++k) sum += acc[s][k];
  return sum;
}

template <class Ch> double chunk_sum(const Ch& view, int64_t len, bool packs) {
  const Ch ch = view;
  if (packs && ch.aligned16()) return chunk_sum_v<vec_width<typename Ch::value_type>()>(ch, len);
  return chunk_sum_v<1>(ch, len);
}

// The kSums (3) sums of interval=k's dots over one chunk into out[0..kSums): element j in
// lane j % kLanes of each sum, whether read in packs of V or alone (the same bits).
template <int V, class Ch> void chunk_sums_v(const Ch& ch, int64_t len, double* out) {
  static_assert(kLanes % V == 0, "a pack must not straddle two rounds of lanes");
  constexpr int S = Ch::kSums;
  double acc[S][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int k = 0; k < kLanes; k += V) ch.template accumulate<V>(i + k, &acc[0][k], kLanes);
  for (; i < len; ++i) ch.template accumulate<1>(i, &acc[0][i % kLanes], kLanes);
  for (int s = 0; s < S; ++s) {
    double sum = 0;
    for (int k = 0; k < kLanes; ++k) sum += acc[s][k];
    out[s] = sum;
  }
}

// The kSums partial sums of one chunk into out[0..kSums).
template <class Ch> void chunk_sums(const Ch& view, int64_t len, bool packs, double* out) {
  const Ch ch = view;
  if constexpr (Ch::kSums == 1) {
    out[0] = chunk_sum(ch, len, packs);
  } else if (packs && ch.aligned16()) {
    chunk_sums_v<vec_width<typename Ch::value_type>()>(ch, len, out);
  } else {
    chunk_sums_v<1>(ch, len, out);
  }
}

// The partial sums of every chunk into partials[0:num_chunks] (kSums of them per chunk:
// partials[kSums·c + k]).
template <class Op> void norm_chunks(const Op& op, const Table& table, const Where& w,
                                     double* partials) {
  if (table.num_chunks <= 0) return;
  const TableView tb = view_of(table);
  const int team = team_size(tb.numel(), w.threads);
  const bool packs = w.host_packs;
#pragma omp parallel for num_threads(team) schedule(dynamic, 1) if (team > 1)
  for (int64_t c = 0; c < tb.num_chunks; ++c) {
    const Span s = tb.span(c);
    op.visit(tb, s, [&](const auto& ch) {
      constexpr int S = std::decay_t<decltype(ch)>::kSums;
      chunk_sums(ch, s.len, packs, partials + S * c);
    });
  }
}

// The host driver of grf_ops.h's run_* phases.
struct HostRun {
  const Where& w;
  const Table& table;
  template <class Op> void foreach(const Op& op, const char*) const {
    foreach_chunk(op, table, w);
  }
  template <class Op> void norm(const Op& op, double* partials) const {
    norm_chunks(op, table, w, partials);
  }
};

// partials[begin:end] added in index order (every `stride`-th: partials[stride·i]).
double sum_range(const double* partials, int64_t begin, int64_t end, int stride = 1) {
  double sum = 0;
  for (int64_t i = begin; i < end; ++i) sum += partials[stride * i];
  return sum;
}

// The three sums of each group's range of dots partials.
void group_sums3(const double* partials, const std::vector<int64_t>& bounds, int groups,
                 double (*sums)[3]) {
  for (int g = 0; g < groups; ++g)
    for (int k = 0; k < 3; ++k) sums[g][k] = sum_range(partials + k, bounds[g], bounds[g + 1], 3);
}

// AdamW's step counts of one table (adam_ptrs: its address rows, or 0), unless skipped.
void advance_steps(ptr adam_ptrs, int64_t adam_tensors, bool skipped) {
  for (int64_t i = 0; adam_ptrs != 0 && i < adam_tensors; ++i)
    advance_step(reinterpret_cast<const int64_t*>(adam_ptrs), adam_tensors, i, skipped);
}

template <class C> bool found_inf_at(ptr found_inf) {
  return *reinterpret_cast<const C*>(found_inf) != C(0);
}

}  // namespace

void norm_partials(const Where& w, const Table& t, bool adaptive, ptr partials) {
  run_norm(HostRun{w, t}, t.dtype, adaptive, partials);
}

void sq_norm(const Where& w, const Table& t, bool adaptive, ptr, ptr out) {
  std::vector<double> partials(size_t(std::max<int64_t>(t.num_chunks, 1)));
  run_norm(HostRun{w, t}, t.dtype, adaptive, reinterpret_cast<ptr>(partials.data()));
  *reinterpret_cast<double*>(out) = sum_range(partials.data(), 0, t.num_chunks);
}

void dots_partials(const Where& w, const Table& t, ptr dirs, ptr partials) {
  run_dots(HostRun{w, t}, t.dtype, dirs, partials);
}

void dots(const Where& w, const Table& t, ptr dirs, ptr, ptr out) {
  std::vector<double> partials(size_t(3 * std::max<int64_t>(t.num_chunks, 1)));
  run_dots(HostRun{w, t}, t.dtype, dirs, reinterpret_cast<ptr>(partials.data()));
  double* result = reinterpret_cast<double*>(out);
  for (int k = 0; k < 3; ++k) result[k] = sum_range(partials.data() + k, 0, t.num_chunks, 3);
}

void perturb(const Where& w, const Table& t, ptr eps, ptr fold, bool adaptive, ptr dirs) {
  run_perturb(HostRun{w, t}, t.dtype, eps, fold, adaptive, dirs);
}

void reflect(const Where& w, const Table& t) { run_reflect(HostRun{w, t}, t.dtype); }

void restore(const Where& w, const Table& t) { run_restore(HostRun{w, t}, t.dtype); }

void update_none(const Where& w, const Table& t, ptr s0, ptr found_inf, int kind, ptr dirs,
                 ptr s1, ptr s2) {
  run_update_none(HostRun{w, t}, t.dtype, UpdateArgs{s0, found_inf, kind, dirs, s1, s2});
}

void update_sgd(const Where& w, const Table& t, ptr s0, ptr found_inf, double lr,
                ptr lr_at, int lr_dtype, double momentum, double dampening,
                double weight_decay, bool nesterov, int kind, ptr dirs, ptr s1, ptr s2) {
  run_update_sgd(HostRun{w, t}, t.dtype, UpdateArgs{s0, found_inf, kind, dirs, s1, s2},
                 make_lr(lr, lr_at, lr_dtype), momentum, dampening, weight_decay, nesterov);
}

void update_adamw(const Where& w, const Table& t, ptr s0, ptr found_inf, double lr,
                  ptr lr_at, int lr_dtype, double beta1, double beta2, double eps,
                  double weight_decay, bool steps_advanced, int kind, ptr dirs, ptr s1,
                  ptr s2) {
  const Lr rate = make_lr(lr, lr_at, lr_dtype);
  const UpdateArgs args{s0, found_inf, kind, dirs, s1, s2};
  if (!steps_advanced) {  // each tensor's step count first: the pass reads the new one
    dispatch_dtype(t.dtype, [&](auto tag) {
      advance_steps(t.ptrs, t.num_tensors, found_inf_at<compute_t<decltype(tag)>>(found_inf));
    });
  }
  run_update_adamw(HostRun{w, t}, t.dtype, args, rate, beta1, beta2, eps, weight_decay);
}

void ascent_finalize(const Where&, int ctype, ptr partials, int64_t count, ptr scale, ptr out,
                     double rho, double gamma, double alpha, bool normalize, bool fixed_alpha,
                     bool central, double eps_sign, double combine_sign) {
  const AscentHp hp{rho, gamma, alpha, eps_sign, combine_sign, normalize, fixed_alpha, central};
  dispatch_compute(ctype, [&](auto tag) {
    ascent_scalars_of(sum_range(reinterpret_cast<const double*>(partials), 0, count),
                      reinterpret_cast<const float*>(scale), hp,
                      reinterpret_cast<decltype(tag)*>(out));
  });
}

void update_finalize(const Where&, int ctype, ptr partials, const std::vector<int64_t>& bounds,
                     ptr ascent, ptr scale, ptr out, ptr count, ptr last, ptr scaler_flag,
                     ptr adam_ptrs, int64_t adam_tensors, bool clip, double max_norm,
                     const std::vector<double>& signs, ptr valid) {
  const int groups = check_groups(bounds, "update_finalize", {&signs});
  const bool direction = !signs.empty();
  if (direction && valid == 0)
    throw std::invalid_argument("gr_fused._C.update_finalize: signs without valid");
  const double* parts = reinterpret_cast<const double*>(partials);
  dispatch_compute(ctype, [&](auto tag) {
    using C = decltype(tag);
    double sq[kMaxGroups], sums[kMaxGroups][3];
    if (direction) group_sums3(parts, bounds, groups, sums);
    for (int g = 0; g < groups; ++g)
      sq[g] = direction ? sums[g][0] : sum_range(parts, bounds[g], bounds[g + 1]);
    C* result = reinterpret_cast<C*>(out);
    const float* s = reinterpret_cast<const float*>(scale);
    const C* rows = reinterpret_cast<const C*>(ascent);
    update_scalars_of(sq, rows, groups, s, clip, max_norm, result);
    const C found = result[groups];
    if (direction) {
      const C ok = direction_scalars_of(sums, rows, signs.data(), groups, s, result + groups + 1);
      *reinterpret_cast<C*>(valid) = ok * (C(1) - found);
    }
    record_skip(found, reinterpret_cast<int64_t*>(count), reinterpret_cast<bool*>(last),
                reinterpret_cast<float*>(scaler_flag));
    advance_steps(adam_ptrs, adam_tensors, found != C(0));
  });
}

void reuse_finalize(const Where&, int ctype, ptr partials, const std::vector<int64_t>& bounds,
                    const std::vector<double>& signs, const std::vector<double>& reuse_scales,
                    ptr scale, ptr valid, ptr out, ptr count, ptr last, ptr scaler_flag,
                    ptr adam_ptrs, int64_t adam_tensors, bool clip, double max_norm) {
  const int groups = check_groups(bounds, "reuse_finalize", {&signs, &reuse_scales});
  if (int64_t(signs.size()) != groups || int64_t(reuse_scales.size()) != groups)
    throw std::invalid_argument("gr_fused._C.reuse_finalize: one sign and reuse scale per group");
  dispatch_compute(ctype, [&](auto tag) {
    using C = decltype(tag);
    double sums[kMaxGroups][3];
    group_sums3(reinterpret_cast<const double*>(partials), bounds, groups, sums);
    C* result = reinterpret_cast<C*>(out);
    reuse_scalars_of(sums, groups, signs.data(), reuse_scales.data(),
                     reinterpret_cast<const float*>(scale), *reinterpret_cast<const C*>(valid),
                     clip, max_norm, result);
    const C found = result[2 * groups];
    record_skip(found, reinterpret_cast<int64_t*>(count), reinterpret_cast<bool*>(last),
                reinterpret_cast<float*>(scaler_flag));
    advance_steps(adam_ptrs, adam_tensors, found != C(0));
  });
}

}  // namespace GRF_HOST_NS
}  // namespace grf
