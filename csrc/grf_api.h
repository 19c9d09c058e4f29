// The phases of a GR step over one flat buffer, as the Python side calls them
// (gr_fused/backends/cext_backend.py through the pybind11 module gr_fused._C, bind.cpp).
//
// Every pointer is a raw address (torch's tensor.data_ptr()), so no torch header or ABI is
// involved and one build works with any torch version. Buffers hold `n` elements of the
// storage type named by `dtype`; step scalars (eps, fold, gscale, found_inf) are 0-dim
// tensors of the compute type (float, or double for double buffers) in the same memory as
// the buffers, read there by the kernels: no call synchronizes with the host.
#pragma once

#include <stdint.h>

#include <vector>

namespace grf {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// device < 0: the host build, `threads` OpenMP threads. device ≥ 0: that CUDA device,
// launched on the cudaStream_t `stream` (torch.cuda.current_stream().cuda_stream).
// host_packs: the host build runs the CUDA kernels' 16-byte pack code on aligned buffers
// (same results; slower on a CPU than its one-element loops, so only tests turn it on).
struct Where {
  int device;
  uintptr_t stream;
  int threads;
  bool host_packs;
};

using ptr = uintptr_t;

// The CUDA norm writes one partial sum (double) per block into `partials` (room for this
// many).
constexpr int kMaxNormBlocks = 1024;

// update_finalize takes at most this many param groups (more take the torch-op path).
constexpr int kMaxGroups = 16;

#define GRF_DECLARE_PHASES                                                                  \
  /* out = Σ g² (Σ (θ·g)² when theta != 0), deterministic; partials: CUDA scratch of doubles */       \
  void sq_norm(const Where& w, int dtype, int64_t n, ptr g, ptr theta, ptr partials,        \
               ptr out);                                                                    \
  /* into: θ' goes to backup and θ stays (the caller then swaps the two buffers)         */ \
  void perturb(const Where& w, int dtype, int64_t n, ptr theta, ptr g, ptr backup, ptr eps, \
               ptr fold, bool adaptive, bool into);                                         \
  void reflect(const Where& w, int dtype, int64_t n, ptr theta, ptr g, ptr backup);         \
  void restore(const Where& w, int dtype, int64_t n, ptr theta, ptr backup);                \
  void update_none(const Where& w, int dtype, int64_t n, ptr theta, ptr G, ptr backup,      \
                   ptr gscale, ptr found_inf);                                              \
  /* buf == 0: no momentum; first: buf is created by this step (written, never read) */    \
  void update_sgd(const Where& w, int dtype, int64_t n, ptr theta, ptr G, ptr backup,       \
                  ptr buf, bool first, ptr gscale, ptr found_inf, double lr,                \
                  double momentum, double dampening, double weight_decay, bool nesterov);   \
  /* step: float32 step count; advanced by 1 here unless found_inf or step_advanced */    \
  void update_adamw(const Where& w, int dtype, int64_t n, ptr theta, ptr G, ptr backup,     \
                    ptr m, ptr v, ptr step, ptr gscale, ptr found_inf, double lr,           \
                    double beta1, double beta2, double eps, double weight_decay,            \
                    bool step_advanced);                                                    \
  /* stage one of the norm of g (θ·g when theta != 0) into partials (doubles: one per     */ \
  /* CUDA block, at most kMaxNormBlocks; the host build writes one); returns how many      */ \
  int64_t norm_partials(const Where& w, int dtype, int64_t n, ptr g, ptr theta,            \
                        ptr partials);                                                     \
  /* one group's ascent scalars from Σ partials[0:count]: out = {eps, fold, combine} of    */ \
  /* compute type ctype (kF32 or kF64); scale: the AMP scale (float32) or 0                */ \
  void ascent_finalize(const Where& w, int ctype, ptr partials, int64_t count, ptr scale,   \
                       ptr out, double rho, double gamma, double alpha, bool normalize,     \
                       bool fixed_alpha, bool central);                                     \
  /* the update scalars of G = bounds.size() − 1 ≤ kMaxGroups groups, group g's ‖G‖² being  */ \
  /* Σ partials[bounds[g]:bounds[g+1]]; ascent: G rows {eps, fold, combine}; out[g] =       */ \
  /* gscale, out[G] = found_inf; and the skip records: count (int64), last (bool),          */ \
  /* scaler_flag (float32, or 0), adam_step (float32, or 0)                                 */ \
  void update_finalize(const Where& w, int ctype, ptr partials,                            \
                       const std::vector<int64_t>& bounds, ptr ascent, ptr scale, ptr out,  \
                       ptr count, ptr last, ptr scaler_flag, ptr adam_step, bool clip,      \
                       double max_norm);

namespace host { GRF_DECLARE_PHASES }       // host.cpp, for any CPU of its architecture
namespace host_avx2 { GRF_DECLARE_PHASES }  // host.cpp again, with AVX2 + FMA (x86-64 only)
namespace cuda { GRF_DECLARE_PHASES }  // cuda.cu (only in builds with CUDA)

}  // namespace grf
