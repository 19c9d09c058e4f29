// The CUDA build: the phases of grf_api.h as grid-stride kernels over the ops of grf_ops.h.
//
// * 16-byte vector loads/stores (4 floats, 8 halves, 2 doubles) when every buffer of the
//   call is 16-byte aligned, with a scalar tail; scalar accesses otherwise.
// * Step scalars are read by the kernels from device memory: no host sync anywhere.
// * The norm is deterministic: each thread sums in double, each block writes a partial sum
//   (a fixed tree of warp shuffles), a one-block kernel adds the partials in a fixed order.
//   No atomics. The number of blocks depends only on n and the alignment.
// * Every CUDA call and launch is checked; a failure throws std::runtime_error with the CUDA
//   error string, which pybind11 turns into a Python RuntimeError.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

#include "grf_ops.h"

namespace grf {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;

void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // clear it, so that the next launch check does not report it again
  throw std::runtime_error(std::string("gr_fused CUDA error in ") + what + ": " +
                           cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// Launch on the buffers' device, whatever the caller's current device is.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    current_ = device;
  }
  ~DeviceGuard() {
    if (previous_ != current_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0, current_ = 0;
};

int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device >= 64) device = 63;  // only a launch-size hint
  int n = cache[device].load();
  if (n == 0) {
    check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
          "cudaDeviceGetAttribute");
    cache[device].store(n);
  }
  return n;
}

cudaStream_t stream_of(const Where& w) { return reinterpret_cast<cudaStream_t>(w.stream); }

template <int V> struct Width { static constexpr int value = V; };

// ---------------------------------------------------------------- element-wise phases
// f(i, Width<V>{}) for the packs of V elements, then f(i, Width<1>{}) for the tail.
template <int V, class F> __device__ void grid_stride(int64_t n, F f) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / V;
  for (int64_t j = tid; j < nvec; j += stride) f(j * V, Width<V>{});
  for (int64_t i = nvec * V + tid; i < n; i += stride) f(i, Width<1>{});
}

template <class Op, int V> __global__ void __launch_bounds__(kThreads)
foreach_kernel(Op op, int64_t n) {
  op.prepare();
  if (op.skipped()) {
    grid_stride<V>(n, [&](int64_t i, auto w) { op.template apply_skipped<decltype(w)::value>(i); });
  } else {
    grid_stride<V>(n, [&](int64_t i, auto w) { op.template apply<decltype(w)::value>(i); });
  }
}

template <class Op>
void launch_foreach(const Where& w, const Op& op, int64_t n, bool aligned, const char* what) {
  if (n <= 0) return;
  using T = typename Op::value_type;
  constexpr int V = vec_width<T>();
  DeviceGuard guard(w.device);
  const int64_t per_block = int64_t(kThreads) * (aligned ? V : 1);
  const int64_t blocks = std::min<int64_t>((n + per_block - 1) / per_block,
                                           int64_t(sm_count(w.device)) * kBlocksPerSm);
  if (aligned)
    foreach_kernel<Op, V><<<unsigned(blocks), kThreads, 0, stream_of(w)>>>(op, n);
  else
    foreach_kernel<Op, 1><<<unsigned(blocks), kThreads, 0, stream_of(w)>>>(op, n);
  check(cudaGetLastError(), what);
}

// ---------------------------------------------------------------- the norm
// Sum over the block in a fixed order; the result is valid in thread 0.
template <class A> __device__ A block_sum(A x) {
  __shared__ A warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
GRF_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kThreads / 32 ? warp_sums[lane] : A(0);
GRF_UNROLL
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  }
  return x;
}

template <class Op, int V> __global__ void __launch_bounds__(kThreads)
sq_norm_partial(Op op, int64_t n, double* partials) {
  double acc[V] = {};
  grid_stride<V>(n, [&](int64_t i, auto w) { op.template accumulate<decltype(w)::value>(i, acc); });
  double x = 0;
GRF_UNROLL
  for (int k = 0; k < V; ++k) x += acc[k];
  x = block_sum(x);
  if (threadIdx.x == 0) partials[blockIdx.x] = x;
}

// The partial sums added in a fixed order by one block; valid in thread 0.
__device__ double sum_partials(const double* partials, int64_t count) {
  double x = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) x += partials[i];
  return block_sum(x);
}

template <class C> __global__ void __launch_bounds__(kThreads)
sq_norm_finalize(const double* partials, int count, C* out) {
  const double x = sum_partials(partials, count);
  if (threadIdx.x == 0) *out = C(x);
}

// One group's ascent scalars (grf_math.h) from the sum of all partials.
template <class C> __global__ void __launch_bounds__(kThreads)
ascent_finalize_kernel(const double* partials, int64_t count, const float* scale, C* out,
                       AscentHp h) {
  const double x = sum_partials(partials, count);
  if (threadIdx.x == 0) ascent_scalars_of(x, scale, h, out);
}

// The group ranges of update_finalize, passed by value.
struct GroupBounds {
  int64_t at[kMaxGroups + 1];
  int groups;
};

// Every group's ‖G‖² from its range of partials, then gscale, found_inf and the skip records.
template <class C> __global__ void __launch_bounds__(kThreads)
update_finalize_kernel(const double* partials, GroupBounds b, const C* ascent,
                       const float* scale, C* out, int64_t* skip_count, bool* last,
                       float* scaler_flag, float* adam_step, bool clip, double max_norm) {
  __shared__ C sq[kMaxGroups];
  for (int g = 0; g < b.groups; ++g) {
    const double x = sum_partials(partials + b.at[g], b.at[g + 1] - b.at[g]);
    if (threadIdx.x == 0) sq[g] = C(x);
    __syncthreads();  // block_sum's scratch is reused by the next group
  }
  if (threadIdx.x == 0) {
    update_scalars_of(sq, ascent, b.groups, scale, clip, max_norm, out);
    record_skip(out[b.groups], skip_count, last, scaler_flag, adam_step);
  }
}

// The first stage of the norm: one partial sum per block into `partials`; returns the
// number of blocks.
template <class T> int launch_partials(const Where& w, int64_t n, ptr g, ptr theta,
                                       ptr partials) {
  constexpr int V = vec_width<T>();
  const bool aligned = aligned16({g, theta});
  const int64_t per_block = int64_t(kThreads) * (aligned ? V : 1);
  const int blocks = int(std::max<int64_t>(
      1, std::min<int64_t>((n + per_block - 1) / per_block, kMaxNormBlocks)));
  dispatch_bool(theta != 0, [&](auto adaptive) {
    using Op = SqNormOp<T, decltype(adaptive)::value>;
    Op op{as<const T>(g), as<const T>(theta)};
    if (aligned)
      sq_norm_partial<Op, V><<<blocks, kThreads, 0, stream_of(w)>>>(op, n, as<double>(partials));
    else
      sq_norm_partial<Op, 1><<<blocks, kThreads, 0, stream_of(w)>>>(op, n, as<double>(partials));
  });
  check(cudaGetLastError(), "sq_norm (partial sums)");
  return blocks;
}

// The CUDA driver of grf_ops.h's run_* phases: one grid-stride launch.
struct CudaRun {
  const Where& w;
  template <class Op>
  void operator()(const Op& op, int64_t n, int align, const char* what) const {
    launch_foreach(w, op, n, align >= 16, what);
  }
};

// AdamW's step count moves only when the step is taken.
template <class C> __global__ void advance_step(float* step, const C* found_inf) {
  if (*found_inf == C(0)) *step += 1.0f;
}

}  // namespace

void sq_norm(const Where& w, int dtype, int64_t n, ptr g, ptr theta, ptr partials, ptr out) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    DeviceGuard guard(w.device);
    const int blocks = launch_partials<T>(w, n, g, theta, partials);
    sq_norm_finalize<C><<<1, kThreads, 0, stream_of(w)>>>(as<const double>(partials), blocks,
                                                          as<C>(out));
    check(cudaGetLastError(), "sq_norm (finalize)");
  });
}

int64_t norm_partials(const Where& w, int dtype, int64_t n, ptr g, ptr theta, ptr partials) {
  int64_t blocks = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    DeviceGuard guard(w.device);
    blocks = launch_partials<decltype(tag)>(w, n, g, theta, partials);
  });
  return blocks;
}

void ascent_finalize(const Where& w, int ctype, ptr partials, int64_t count, ptr scale, ptr out,
                     double rho, double gamma, double alpha, bool normalize, bool fixed_alpha,
                     bool central) {
  dispatch_compute(ctype, [&](auto tag) {
    using C = decltype(tag);
    DeviceGuard guard(w.device);
    ascent_finalize_kernel<C><<<1, kThreads, 0, stream_of(w)>>>(
        as<const double>(partials), count, as<const float>(scale), as<C>(out),
        AscentHp{rho, gamma, alpha, normalize, fixed_alpha, central});
    check(cudaGetLastError(), "ascent_finalize");
  });
}

void update_finalize(const Where& w, int ctype, ptr partials, const std::vector<int64_t>& bounds,
                     ptr ascent, ptr scale, ptr out, ptr count, ptr last, ptr scaler_flag,
                     ptr adam_step, bool clip, double max_norm) {
  GroupBounds b{};
  b.groups = check_groups(bounds);
  for (int g = 0; g <= b.groups; ++g) b.at[g] = bounds[g];
  dispatch_compute(ctype, [&](auto tag) {
    using C = decltype(tag);
    DeviceGuard guard(w.device);
    update_finalize_kernel<C><<<1, kThreads, 0, stream_of(w)>>>(
        as<const double>(partials), b, as<const C>(ascent), as<const float>(scale), as<C>(out),
        as<int64_t>(count), as<bool>(last), as<float>(scaler_flag), as<float>(adam_step), clip,
        max_norm);
    check(cudaGetLastError(), "update_finalize");
  });
}

void perturb(const Where& w, int dtype, int64_t n, ptr theta, ptr g, ptr backup, ptr eps,
             ptr fold, bool adaptive, bool into) {
  run_perturb(CudaRun{w}, dtype, n, theta, g, backup, eps, fold, adaptive, into);
}

void reflect(const Where& w, int dtype, int64_t n, ptr theta, ptr g, ptr backup) {
  run_reflect(CudaRun{w}, dtype, n, theta, g, backup);
}

void restore(const Where& w, int dtype, int64_t n, ptr theta, ptr backup) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (n <= 0) return;
    DeviceGuard guard(w.device);
    check(cudaMemcpyAsync(as<T>(theta), as<const T>(backup), sizeof(T) * n,
                          cudaMemcpyDeviceToDevice, stream_of(w)),
          "restore (cudaMemcpyAsync)");
  });
}

void update_none(const Where& w, int dtype, int64_t n, ptr theta, ptr G, ptr backup,
                 ptr gscale, ptr found_inf) {
  run_update_none(CudaRun{w}, dtype, n, theta, G, backup, gscale, found_inf);
}

void update_sgd(const Where& w, int dtype, int64_t n, ptr theta, ptr G, ptr backup, ptr buf,
                bool first, ptr gscale, ptr found_inf, double lr, double momentum,
                double dampening, double weight_decay, bool nesterov) {
  run_update_sgd(CudaRun{w}, dtype, n, theta, G, backup, buf, first, gscale, found_inf, lr,
                 momentum, dampening, weight_decay, nesterov);
}

void update_adamw(const Where& w, int dtype, int64_t n, ptr theta, ptr G, ptr backup, ptr m,
                  ptr v, ptr step, ptr gscale, ptr found_inf, double lr, double beta1,
                  double beta2, double eps, double weight_decay, bool step_advanced) {
  run_update_adamw(CudaRun{w}, dtype, n, theta, G, backup, m, v, step, gscale, found_inf, lr,
                   beta1, beta2, eps, weight_decay, step_advanced);
  if (step_advanced) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using C = compute_t<decltype(tag)>;
    DeviceGuard guard(w.device);
    advance_step<C><<<1, 1, 0, stream_of(w)>>>(as<float>(step), as<const C>(found_inf));
    check(cudaGetLastError(), "update_adamw (step count)");
  });
}

}  // namespace cuda
}  // namespace grf
