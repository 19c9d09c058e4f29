// The phases of a GR step over a tensor table, as the Python side calls them
// (gr_fused/backends/cext_backend.py through the pybind11 module gr_fused._C, bind.cpp).
//
// A table (gr_fused/backends/tensor_table.py) describes the tensors of one bucket: the
// user's own parameters, gradients and optimizer state, wherever they are in memory, and the
// flat backup of θ that the optimizer owns. It is two int64 arrays in the tensors' memory:
//
//   layout[c]            tensor index of chunk c                           c < num_chunks
//   layout[C + t]        first chunk of tensor t                           t < num_tensors
//   layout[C + T + t]    numel of tensor t
//   layout[C + 2T + t]   offset of tensor t in the backup (elements; 64-byte aligned)
//   ptrs[r·T + t]        row r of tensor t: 0 θ, 1 g, 2 flags (bits, not an address), then
//                        the state rows: sgd 3 momentum buffer (0 without momentum);
//                        adamw 3 exp_avg, 4 exp_avg_sq, 5 step (a float32 scalar)
//
// interval=k adds one more row, apart from the table (`dirs`: T int64 addresses in the
// tables' memory, built by cext_backend.py): each tensor's cached direction (the state
// "gr_direction", the param's dtype and layout). A call that takes `dirs` = 0 has none.
//
// Chunk c covers elements [s, min(s + chunk, numel)) of tensor t = layout[c], with
// s = (c − first chunk of t)·chunk. Every address is a raw address (tensor.data_ptr()), so
// no torch header or ABI is involved and one build works with any torch version. Step
// scalars (eps, fold, gscale, found_inf) are 0-dim tensors of the compute type (float, or
// double for double tables) in the tables' memory, read there: no call syncs with the host.
#pragma once

#include <stdint.h>

#include <vector>

namespace grf {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// Rows of ptrs (see above).
enum Row : int { kParam = 0, kGrad = 1, kFlags = 2, kMomentum = 3, kExpAvg = 3,
                 kExpAvgSq = 4, kStep = 5 };
enum Flag : int64_t { kNewState = 1, kFrozen = 2 };

// What an update reads its gradient and its starting θ from, and the step scalars s0, s1, s2
// (addresses of compute-type scalars) it takes:
//   kPlain   g = gscale·G, θ from the backup                           s0 = gscale
//   kCache   the same, and first direction ← a·G + c·direction          s0 = gscale, s1 = a, s2 = c
//            (interval=k, a refresh; not where the step is skipped or the tensor frozen)
//   kReuse   g = u·G + v·direction, θ in place (there is no backup)    s0 = u, s1 = v
//            (interval=k between refreshes; a skipped step writes nothing)
enum UpdateKind : int { kPlain = 0, kCache = 1, kReuse = 2 };

// device < 0: the host build, `threads` OpenMP threads. device ≥ 0: that CUDA device,
// launched on the cudaStream_t `stream` (torch.cuda.current_stream().cuda_stream).
// host_packs: the host build runs the CUDA kernels' 16-byte pack code on aligned chunks
// (same results; slower on a CPU than its one-element loops, so only tests turn it on).
struct Where {
  int device;
  uintptr_t stream;
  int threads;
  bool host_packs;
};

using ptr = uintptr_t;

// One table, as gr_fused._C.Table holds it (built once per table by the Python side).
struct Table {
  ptr layout;
  ptr ptrs;
  int64_t num_chunks;
  int64_t num_tensors;
  int64_t chunk;
  ptr backup;
  bool aligned;  // every address in ptrs 16-byte aligned (the backup always is)
  int dtype;     // a DType
};

// A learning rate: a Python number (`value`), or a 0-dim tensor in the table's memory read
// by the kernel (`at` != 0, float32 or float64 as `dtype` says), never by the host. The
// calls take it as three arguments (lr, lr_at, lr_dtype).
struct Lr {
  double value;
  ptr at;
  int dtype;
};

// The GR hyperparameters of one param group for its ascent row.
struct AscentHp {
  double rho, gamma, alpha, eps_sign, combine_sign;
  bool normalize, fixed_alpha, central;
};

// update_finalize takes at most this many param groups (more take the torch-op path).
constexpr int kMaxGroups = 16;

#define GRF_DECLARE_PHASES                                                                  \
  /* stage one of the norm: Σ g² (adaptive: Σ (θ·g)²) of each chunk into partials[c]     */ \
  /* (doubles, num_chunks of them)                                                         */ \
  void norm_partials(const Where& w, const Table& t, bool adaptive, ptr partials);          \
  /* the whole norm into *out (a double); partials: CUDA scratch of num_chunks doubles    */ \
  void sq_norm(const Where& w, const Table& t, bool adaptive, ptr partials, ptr out);       \
  /* interval=k: [Σ g², Σ g·d, Σ d²] (d the direction, each term in double) of each chunk  */ \
  /* into partials[3c .. 3c+2]                                                             */ \
  void dots_partials(const Where& w, const Table& t, ptr dirs, ptr partials);               \
  /* the three sums into out[0..3) (doubles); partials: CUDA scratch of 3·num_chunks       */ \
  void dots(const Where& w, const Table& t, ptr dirs, ptr partials, ptr out);               \
  /* backup ← θ;  θ ← θ + eps·w·g;  g ← fold·g; with dirs (interval=k, a refresh) also     */ \
  /* direction ← g (before the fold)                                                       */ \
  void perturb(const Where& w, const Table& t, ptr eps, ptr fold, bool adaptive, ptr dirs); \
  void reflect(const Where& w, const Table& t);                                             \
  void restore(const Where& w, const Table& t);                                             \
  /* the updates: s0, s1, s2 and dirs as `kind` (an UpdateKind) says                       */ \
  void update_none(const Where& w, const Table& t, ptr s0, ptr found_inf, int kind,         \
                   ptr dirs, ptr s1, ptr s2);                                               \
  void update_sgd(const Where& w, const Table& t, ptr s0, ptr found_inf, double lr,         \
                  ptr lr_at, int lr_dtype, double momentum, double dampening,               \
                  double weight_decay, bool nesterov, int kind, ptr dirs, ptr s1, ptr s2);  \
  /* steps_advanced: a finalize already advanced every tensor's step count                 */ \
  void update_adamw(const Where& w, const Table& t, ptr s0, ptr found_inf, double lr,       \
                    ptr lr_at, int lr_dtype, double beta1, double beta2, double eps,        \
                    double weight_decay, bool steps_advanced, int kind, ptr dirs, ptr s1,   \
                    ptr s2);                                                                \
  /* one group's row {eps·eps_sign, fold, combine·combine_sign} (compute type ctype)      */ \
  /* from Σ partials[0:count]; scale: the AMP scale (float32) or 0                         */ \
  void ascent_finalize(const Where& w, int ctype, ptr partials, int64_t count, ptr scale,   \
                       ptr out, double rho, double gamma, double alpha, bool normalize,     \
                       bool fixed_alpha, bool central, double eps_sign,                     \
                       double combine_sign);                                                \
  /* the update scalars of G = bounds.size() − 1 ≤ kMaxGroups groups, group g's ‖G‖² being */ \
  /* Σ partials[bounds[g]:bounds[g+1]]; ascent: G rows {eps, fold, combine}; out[g] =       */ \
  /* gscale, out[G] = found_inf; the skip records: count (int64), last (bool), scaler_flag  */ \
  /* (float32, or 0); and the step of every tensor of one AdamW table (its ptrs and        */ \
  /* number of tensors, or 0)                                                               */ \
  /* With `signs` (interval=k, a refresh: each group's combine sign), partials holds the   */ \
  /* three sums [Σ G², Σ G·g1, Σ g1²] per chunk (dots_partials), out[G + 1 + 2g] and        */ \
  /* out[G + 2 + 2g] get group g's direction coefficients (a, c) and *valid                 */ \
  /* (1 − found_inf)·(there is a direction): _scalars.direction_scalars                     */ \
  void update_finalize(const Where& w, int ctype, ptr partials,                            \
                       const std::vector<int64_t>& bounds, ptr ascent, ptr scale, ptr out,  \
                       ptr count, ptr last, ptr scaler_flag, ptr adam_ptrs,                 \
                       int64_t adam_tensors, bool clip, double max_norm,                    \
                       const std::vector<double>& signs, ptr valid);                        \
  /* interval=k between refreshes: _scalars.reuse_scalars of bounds.size() − 1 groups from  */ \
  /* the three sums [Σ g1², Σ g1·v̂, Σ v̂²] per chunk (dots_partials) and *valid (the        */ \
  /* compute type): out[2g], out[2g + 1] = group g's (u, v), out[2G] = found_inf; the skip  */ \
  /* records and one AdamW table's step counts as update_finalize                           */ \
  void reuse_finalize(const Where& w, int ctype, ptr partials,                             \
                      const std::vector<int64_t>& bounds, const std::vector<double>& signs, \
                      const std::vector<double>& reuse_scales, ptr scale, ptr valid,        \
                      ptr out, ptr count, ptr last, ptr scaler_flag, ptr adam_ptrs,         \
                      int64_t adam_tensors, bool clip, double max_norm);

namespace host { GRF_DECLARE_PHASES }       // host.cpp, for any CPU of its architecture
namespace host_avx2 { GRF_DECLARE_PHASES }  // host.cpp again, with AVX2 + FMA (x86-64 only)
namespace cuda { GRF_DECLARE_PHASES }       // cuda.cu (only in builds with CUDA)

}  // namespace grf
