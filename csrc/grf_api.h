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
  /* backup ← θ;  θ ← θ + eps·w·g;  g ← fold·g                                             */ \
  void perturb(const Where& w, const Table& t, ptr eps, ptr fold, bool adaptive);           \
  void reflect(const Where& w, const Table& t);                                             \
  void restore(const Where& w, const Table& t);                                             \
  void update_none(const Where& w, const Table& t, ptr gscale, ptr found_inf);              \
  void update_sgd(const Where& w, const Table& t, ptr gscale, ptr found_inf, double lr,     \
                  ptr lr_at, int lr_dtype, double momentum, double dampening,               \
                  double weight_decay, bool nesterov);                                      \
  /* steps_advanced: update_finalize already advanced every tensor's step count          */ \
  void update_adamw(const Where& w, const Table& t, ptr gscale, ptr found_inf, double lr,   \
                    ptr lr_at, int lr_dtype, double beta1, double beta2, double eps,        \
                    double weight_decay, bool steps_advanced);                              \
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
  void update_finalize(const Where& w, int ctype, ptr partials,                            \
                       const std::vector<int64_t>& bounds, ptr ascent, ptr scale, ptr out,  \
                       ptr count, ptr last, ptr scaler_flag, ptr adam_ptrs,                 \
                       int64_t adam_tensors, bool clip, double max_norm);

namespace host { GRF_DECLARE_PHASES }       // host.cpp, for any CPU of its architecture
namespace host_avx2 { GRF_DECLARE_PHASES }  // host.cpp again, with AVX2 + FMA (x86-64 only)
namespace cuda { GRF_DECLARE_PHASES }       // cuda.cu (only in builds with CUDA)

}  // namespace grf
