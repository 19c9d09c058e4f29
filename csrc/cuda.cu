// The CUDA build: the phases of grf_api.h as kernels over the chunks of a tensor table,
// running the ops of grf_ops.h.
//
// * A grid-stride loop of blocks over chunks: block b takes chunks b, b + grid, ...; the
//   grid is what fits on the device at once (cudaOccupancyMaxActiveBlocksPerMultiprocessor
//   of that kernel × SMs), or the number of chunks if smaller.
// * 16-byte vector loads/stores (4 floats, 8 halves, 2 doubles) with a scalar tail: on
//   every chunk when the table says all its addresses are 16-byte aligned, else on each
//   chunk whose own pointers are (checked per chunk).
// * Step scalars and a tensor learning rate are read by the kernels from device memory: no
//   host sync anywhere.
// * The norm is deterministic: each block sums a chunk in double (a fixed tree of warp
//   shuffles) into one partial per chunk (three for interval=k's dots), and one-block
//   finalize kernels add the partials in a fixed order and compute the step scalars there.
//   No atomics; the partials depend on the table only, not on the grid.
// * Every CUDA call and launch is checked; a failure throws std::runtime_error with the CUDA
//   error string, which pybind11 turns into a Python RuntimeError.
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <type_traits>
#include <atomic>
#include <stdexcept>
#include <string>

#include "grf_ops.h"

namespace grf {
namespace cuda {
namespace {

constexpr int kThreads = 256;          // element-wise and norm kernels
constexpr int kFinalizeThreads = 512;  // the one-block finalize kernels
constexpr int kMaxDevices = 64;

void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // clear it, so that the next launch check does not report it again
  throw std::runtime_error(std::string("gr_fused CUDA error in ") + what + ": " +
                           cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// Whether `device` has an active primary context, from the driver (libcuda, which the CUDA
// runtime has loaded by then); true when that cannot be told.
bool has_primary_context(int device) {
  using GetDevice = int (*)(int*, int);                   // cuDeviceGet
  using GetState = int (*)(int, unsigned int*, int*);     // cuDevicePrimaryCtxGetState
  struct Driver {
    GetDevice get_device = nullptr;
    GetState get_state = nullptr;
    Driver() {
      if (void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD)) {
        get_device = reinterpret_cast<GetDevice>(dlsym(lib, "cuDeviceGet"));
        get_state = reinterpret_cast<GetState>(dlsym(lib, "cuDevicePrimaryCtxGetState"));
      }
    }
  };
  static const Driver driver;  // looked up once (thread-safe)
  if (driver.get_device == nullptr || driver.get_state == nullptr) return true;
  int handle = 0, active = 0;
  unsigned int flags = 0;
  if (driver.get_device(&handle, device) != 0 || driver.get_state(handle, &flags, &active) != 0)
    return true;
  return active != 0;
}

// Launch on the tables' device, whatever the caller's current device is. The caller's device
// is set back only when this changed it, and only when that device has a context already
// (setting it would create one: memory on a GPU this process may never use), as torch's own
// device guard does.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      restore_ = has_primary_context(previous_);
    }
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool restore_ = false;
};

int device_slot(int device) {
  if (device < 0 || device >= kMaxDevices)
    throw std::invalid_argument("gr_fused._C: CUDA device index " + std::to_string(device) +
                                " out of range");
  return device;
}

int sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices];
  int n = cache[device_slot(device)].load();
  if (n == 0) {
    check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
          "cudaDeviceGetAttribute");
    cache[device].store(n);
  }
  return n;
}

// How many blocks of KERNEL (with `threads` threads) fit on `device` at once, per SM.
template <auto KERNEL> int blocks_per_sm(int device, int threads) {
  static std::atomic<int> cache[kMaxDevices];
  int n = cache[device_slot(device)].load();
  if (n == 0) {
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, KERNEL, threads, 0),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    n = std::max(n, 1);
    cache[device].store(n);
  }
  return n;
}

// The grid of a grid-stride loop over `chunks` chunks: one full wave of KERNEL, at most.
template <auto KERNEL> unsigned grid_for(int device, int64_t chunks) {
  const int64_t wave = int64_t(blocks_per_sm<KERNEL>(device, kThreads)) * sm_count(device);
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(chunks, wave)));
}

cudaStream_t stream_of(const Where& w) { return reinterpret_cast<cudaStream_t>(w.stream); }

// ---------------------------------------------------------------- element-wise phases
// One chunk by the whole block: packs of V (when CHECK is off, or the chunk's pointers are
// 16-byte aligned), then single elements.
template <int V, bool CHECK, class Ch> __device__ void block_chunk(const Ch& ch, int64_t len) {
  int64_t i0 = 0;
  if (V > 1 && (!CHECK || ch.aligned16())) {
    const int64_t packs = len / V;
    for (int64_t j = threadIdx.x; j < packs; j += blockDim.x) ch.template apply<V>(j * V);
    i0 = packs * V;
  }
  for (int64_t i = i0 + threadIdx.x; i < len; i += blockDim.x) ch.template apply<1>(i);
}

template <class Op, int V, bool CHECK> __global__ void __launch_bounds__(kThreads)
foreach_kernel(Op op, TableView tb) {
  op.prepare();
  for (int64_t c = blockIdx.x; c < tb.num_chunks; c += gridDim.x) {
    const Span s = tb.span(c);
    op.visit(tb, s, [&](const auto& ch) { block_chunk<V, CHECK>(ch, s.len); });
  }
}

// ---------------------------------------------------------------- the norm
// Sum over the block in a fixed order; the result is valid in thread 0. Ends with the block
// synchronized, so it can be called again at once.
template <int THREADS> __device__ double block_sum(double x) {
  __shared__ double warp_sums[THREADS / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
GRF_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < THREADS / 32 ? warp_sums[lane] : 0.0;
GRF_UNROLL
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  }
  __syncthreads();
  return x;
}

// The chunk's Ch::kSums sums (1, or 3 for interval=k's dots) by the whole block, into
// out[0..kSums) (valid in thread 0).
template <int V, bool CHECK, class Ch> __device__ void block_chunk_sums(const Ch& ch,
                                                                       int64_t len,
                                                                       double* out) {
  constexpr int S = Ch::kSums;
  double lanes[S][V] = {};
  int64_t i0 = 0;
  if (V > 1 && (!CHECK || ch.aligned16())) {
    const int64_t packs = len / V;
#pragma unroll 4
    for (int64_t j = threadIdx.x; j < packs; j += blockDim.x)  // (loads in flight: no stores)
      ch.template accumulate<V>(j * V, &lanes[0][0], V);
    i0 = packs * V;
  }
  for (int64_t i = i0 + threadIdx.x; i < len; i += blockDim.x)
    ch.template accumulate<1>(i, &lanes[0][0], V);
GRF_UNROLL
  for (int s = 0; s < S; ++s) {
    double x = 0;
GRF_UNROLL
    for (int k = 0; k < V; ++k) x += lanes[s][k];
    out[s] = block_sum<kThreads>(x);
  }
}

template <class Op, int V, bool CHECK> __global__ void __launch_bounds__(kThreads)
norm_kernel(Op op, TableView tb, double* partials) {
  for (int64_t c = blockIdx.x; c < tb.num_chunks; c += gridDim.x) {
    const Span s = tb.span(c);
    op.visit(tb, s, [&](const auto& ch) {
      constexpr int S = std::decay_t<decltype(ch)>::kSums;
      double x[S];
      block_chunk_sums<V, CHECK>(ch, s.len, x);
      if (threadIdx.x == 0) {
GRF_UNROLL
        for (int k = 0; k < S; ++k) partials[S * c + k] = x[k];
      }
    });
  }
}

// partials[0], partials[stride], ... (count of them) added in a fixed order by one block;
// valid in thread 0.
__device__ double sum_partials(const double* partials, int64_t count, int stride = 1) {
  const int64_t step = blockDim.x;
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t i = threadIdx.x;
  for (; i + 3 * step < count; i += 4 * step) {
    a0 += partials[stride * i];
    a1 += partials[stride * (i + step)];
    a2 += partials[stride * (i + 2 * step)];
    a3 += partials[stride * (i + 3 * step)];
  }
  for (; i < count; i += step) a0 += partials[stride * i];
  return block_sum<kFinalizeThreads>((a0 + a1) + (a2 + a3));
}

// out[0..S) = the S interleaved sums of partials (S per chunk, count chunks).
template <int S> __global__ void __launch_bounds__(kFinalizeThreads)
sum_kernel(const double* partials, int64_t count, double* out) {
  for (int k = 0; k < S; ++k) {
    const double x = sum_partials(partials + k, count, S);
    if (threadIdx.x == 0) out[k] = x;
  }
}

// One group's ascent row (grf_math.h) from the sum of all partials.
template <class C> __global__ void __launch_bounds__(kFinalizeThreads)
ascent_finalize_kernel(const double* partials, int64_t count, const float* scale, C* out,
                       AscentHp h) {
  const double x = sum_partials(partials, count);
  if (threadIdx.x == 0) ascent_scalars_of(x, scale, h, out);
}

// The group ranges of a finalize and its per-group numbers, passed by value.
struct GroupBounds {
  int64_t at[kMaxGroups + 1];
  int groups;
};
struct GroupValues {
  double v[kMaxGroups];
};

GroupValues group_values(const std::vector<double>& values) {
  GroupValues out{};
  for (size_t g = 0; g < values.size() && g < size_t(kMaxGroups); ++g) out.v[g] = values[g];
  return out;
}

// Each group's S sums (S = 1: ‖G‖²; S = 3: the dots) from its range of partials, into
// sums[g][0..S) in shared memory (then the block is synchronized).
__device__ void group_sums(const double* partials, const GroupBounds& b, int S,
                           double (*sums)[3]) {
  for (int g = 0; g < b.groups; ++g)
    for (int k = 0; k < S; ++k) {
      const double x = sum_partials(partials + S * b.at[g] + k, b.at[g + 1] - b.at[g], S);
      if (threadIdx.x == 0) sums[g][k] = x;
    }
  __syncthreads();
}

// Every group's ‖G‖² from its range of partials, then gscale, found_inf, the skip records
// and the step counts of one AdamW table (adam_ptrs, or null). `direction` (an interval=k
// refresh): the partials are the dots [Σ G², Σ G·g1, Σ g1²], and each group's direction
// coefficients follow found_inf in `out`, (1 − found_inf)·ok goes to *valid.
template <class C> __global__ void __launch_bounds__(kFinalizeThreads)
update_finalize_kernel(const double* partials, GroupBounds b, const C* ascent,
                       const float* scale, C* out, int64_t* skip_count, bool* last,
                       float* scaler_flag, const int64_t* adam_ptrs, int64_t adam_tensors,
                       bool clip, double max_norm, bool direction, GroupValues signs,
                       C* valid) {
  __shared__ double sums[kMaxGroups][3];
  __shared__ bool skipped;
  group_sums(partials, b, direction ? 3 : 1, sums);
  if (threadIdx.x == 0) {
    double sq[kMaxGroups];
    for (int g = 0; g < b.groups; ++g) sq[g] = sums[g][0];
    update_scalars_of(sq, ascent, b.groups, scale, clip, max_norm, out);
    const C found = out[b.groups];
    if (direction) {
      const C ok = direction_scalars_of(sums, ascent, signs.v, b.groups, scale,
                                        out + b.groups + 1);
      *valid = ok * (C(1) - found);
    }
    record_skip(found, skip_count, last, scaler_flag);
    skipped = found != C(0);
  }
  __syncthreads();
  for (int64_t t = threadIdx.x; t < adam_tensors; t += blockDim.x)
    advance_step(adam_ptrs, adam_tensors, t, skipped);
}

// interval=k between refreshes: each group's dots, reuse_scalars, the skip records and the
// step counts of one AdamW table.
template <class C> __global__ void __launch_bounds__(kFinalizeThreads)
reuse_finalize_kernel(const double* partials, GroupBounds b, GroupValues signs,
                      GroupValues reuse_scales, const float* scale, const C* valid, C* out,
                      int64_t* skip_count, bool* last, float* scaler_flag,
                      const int64_t* adam_ptrs, int64_t adam_tensors, bool clip,
                      double max_norm) {
  __shared__ double sums[kMaxGroups][3];
  __shared__ bool skipped;
  group_sums(partials, b, 3, sums);
  if (threadIdx.x == 0) {
    reuse_scalars_of(sums, b.groups, signs.v, reuse_scales.v, scale, *valid, clip, max_norm,
                     out);
    const C found = out[2 * b.groups];
    record_skip(found, skip_count, last, scaler_flag);
    skipped = found != C(0);
  }
  __syncthreads();
  for (int64_t t = threadIdx.x; t < adam_tensors; t += blockDim.x)
    advance_step(adam_ptrs, adam_tensors, t, skipped);
}

// AdamW's step count of every tensor of a table, before its update pass.
template <class C> __global__ void __launch_bounds__(kThreads)
advance_steps_kernel(const int64_t* ptrs, int64_t tensors, const C* found_inf) {
  const bool skipped = *found_inf != C(0);
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < tensors;
       t += int64_t(gridDim.x) * blockDim.x)
    advance_step(ptrs, tensors, t, skipped);
}

// ---------------------------------------------------------------- launches
// The CUDA driver of grf_ops.h's run_* phases: one grid-stride launch over the table.
struct CudaRun {
  const Where& w;
  const Table& table;

  template <class Op> void foreach(const Op& op, const char* what) const {
    if (table.num_chunks <= 0) return;
    constexpr int V = vec_width<typename Op::value_type>();
    DeviceGuard guard(w.device);
    const TableView tb = view_of(table);
    if (table.aligned) {
      constexpr auto kernel = foreach_kernel<Op, V, false>;
      kernel<<<grid_for<kernel>(w.device, tb.num_chunks), kThreads, 0, stream_of(w)>>>(op, tb);
    } else {
      constexpr auto kernel = foreach_kernel<Op, V, true>;
      kernel<<<grid_for<kernel>(w.device, tb.num_chunks), kThreads, 0, stream_of(w)>>>(op, tb);
    }
    check(cudaGetLastError(), what);
  }

  template <class Op> void norm(const Op& op, double* partials) const {
    if (table.num_chunks <= 0) return;
    constexpr int V = vec_width<typename Op::value_type>();
    DeviceGuard guard(w.device);
    const TableView tb = view_of(table);
    if (table.aligned) {
      constexpr auto kernel = norm_kernel<Op, V, false>;
      kernel<<<grid_for<kernel>(w.device, tb.num_chunks), kThreads, 0, stream_of(w)>>>(
          op, tb, partials);
    } else {
      constexpr auto kernel = norm_kernel<Op, V, true>;
      kernel<<<grid_for<kernel>(w.device, tb.num_chunks), kThreads, 0, stream_of(w)>>>(
          op, tb, partials);
    }
    check(cudaGetLastError(), "norm (partial sums)");
  }
};

template <class C> void launch_advance_steps(const Where& w, const Table& t, ptr found_inf) {
  if (t.num_tensors <= 0) return;
  DeviceGuard guard(w.device);
  const unsigned blocks = unsigned(std::min<int64_t>((t.num_tensors + kThreads - 1) / kThreads,
                                                     sm_count(w.device)));
  advance_steps_kernel<C><<<blocks, kThreads, 0, stream_of(w)>>>(
      reinterpret_cast<const int64_t*>(t.ptrs), t.num_tensors,
      reinterpret_cast<const C*>(found_inf));
  check(cudaGetLastError(), "update_adamw (step counts)");
}

}  // namespace

void norm_partials(const Where& w, const Table& t, bool adaptive, ptr partials) {
  run_norm(CudaRun{w, t}, t.dtype, adaptive, partials);
}

void sq_norm(const Where& w, const Table& t, bool adaptive, ptr partials, ptr out) {
  run_norm(CudaRun{w, t}, t.dtype, adaptive, partials);
  DeviceGuard guard(w.device);
  sum_kernel<1><<<1, kFinalizeThreads, 0, stream_of(w)>>>(
      reinterpret_cast<const double*>(partials), t.num_chunks, reinterpret_cast<double*>(out));
  check(cudaGetLastError(), "sq_norm (finalize)");
}

void dots_partials(const Where& w, const Table& t, ptr dirs, ptr partials) {
  run_dots(CudaRun{w, t}, t.dtype, dirs, partials);
}

void dots(const Where& w, const Table& t, ptr dirs, ptr partials, ptr out) {
  run_dots(CudaRun{w, t}, t.dtype, dirs, partials);
  DeviceGuard guard(w.device);
  sum_kernel<3><<<1, kFinalizeThreads, 0, stream_of(w)>>>(
      reinterpret_cast<const double*>(partials), t.num_chunks, reinterpret_cast<double*>(out));
  check(cudaGetLastError(), "dots (finalize)");
}

void perturb(const Where& w, const Table& t, ptr eps, ptr fold, bool adaptive, ptr dirs) {
  run_perturb(CudaRun{w, t}, t.dtype, eps, fold, adaptive, dirs);
}

void reflect(const Where& w, const Table& t) { run_reflect(CudaRun{w, t}, t.dtype); }

void restore(const Where& w, const Table& t) { run_restore(CudaRun{w, t}, t.dtype); }

void update_none(const Where& w, const Table& t, ptr s0, ptr found_inf, int kind, ptr dirs,
                 ptr s1, ptr s2) {
  run_update_none(CudaRun{w, t}, t.dtype, UpdateArgs{s0, found_inf, kind, dirs, s1, s2});
}

void update_sgd(const Where& w, const Table& t, ptr s0, ptr found_inf, double lr,
                ptr lr_at, int lr_dtype, double momentum, double dampening,
                double weight_decay, bool nesterov, int kind, ptr dirs, ptr s1, ptr s2) {
  run_update_sgd(CudaRun{w, t}, t.dtype, UpdateArgs{s0, found_inf, kind, dirs, s1, s2},
                 make_lr(lr, lr_at, lr_dtype), momentum, dampening, weight_decay, nesterov);
}

void update_adamw(const Where& w, const Table& t, ptr s0, ptr found_inf, double lr,
                  ptr lr_at, int lr_dtype, double beta1, double beta2, double eps,
                  double weight_decay, bool steps_advanced, int kind, ptr dirs, ptr s1,
                  ptr s2) {
  const Lr rate = make_lr(lr, lr_at, lr_dtype);
  const UpdateArgs args{s0, found_inf, kind, dirs, s1, s2};
  dispatch_dtype(t.dtype, [&](auto tag) {
    using C = compute_t<decltype(tag)>;
    if (!steps_advanced) launch_advance_steps<C>(w, t, found_inf);  // the pass reads the new one
  });
  run_update_adamw(CudaRun{w, t}, t.dtype, args, rate, beta1, beta2, eps, weight_decay);
}

void ascent_finalize(const Where& w, int ctype, ptr partials, int64_t count, ptr scale, ptr out,
                     double rho, double gamma, double alpha, bool normalize, bool fixed_alpha,
                     bool central, double eps_sign, double combine_sign) {
  const AscentHp hp{rho, gamma, alpha, eps_sign, combine_sign, normalize, fixed_alpha, central};
  dispatch_compute(ctype, [&](auto tag) {
    using C = decltype(tag);
    DeviceGuard guard(w.device);
    ascent_finalize_kernel<C><<<1, kFinalizeThreads, 0, stream_of(w)>>>(
        reinterpret_cast<const double*>(partials), count, reinterpret_cast<const float*>(scale),
        reinterpret_cast<C*>(out), hp);
    check(cudaGetLastError(), "ascent_finalize");
  });
}

namespace {
GroupBounds group_bounds(const std::vector<int64_t>& bounds, int groups) {
  GroupBounds b{};
  b.groups = groups;
  for (int g = 0; g <= groups; ++g) b.at[g] = bounds[g];
  return b;
}
}  // namespace

void update_finalize(const Where& w, int ctype, ptr partials, const std::vector<int64_t>& bounds,
                     ptr ascent, ptr scale, ptr out, ptr count, ptr last, ptr scaler_flag,
                     ptr adam_ptrs, int64_t adam_tensors, bool clip, double max_norm,
                     const std::vector<double>& signs, ptr valid) {
  const GroupBounds b = group_bounds(bounds, check_groups(bounds, "update_finalize", {&signs}));
  const bool direction = !signs.empty();
  if (direction && valid == 0)
    throw std::invalid_argument("gr_fused._C.update_finalize: signs without valid");
  dispatch_compute(ctype, [&](auto tag) {
    using C = decltype(tag);
    DeviceGuard guard(w.device);
    update_finalize_kernel<C><<<1, kFinalizeThreads, 0, stream_of(w)>>>(
        reinterpret_cast<const double*>(partials), b, reinterpret_cast<const C*>(ascent),
        reinterpret_cast<const float*>(scale), reinterpret_cast<C*>(out),
        reinterpret_cast<int64_t*>(count), reinterpret_cast<bool*>(last),
        reinterpret_cast<float*>(scaler_flag), reinterpret_cast<const int64_t*>(adam_ptrs),
        adam_ptrs != 0 ? adam_tensors : 0, clip, max_norm, direction, group_values(signs),
        reinterpret_cast<C*>(valid));
    check(cudaGetLastError(), "update_finalize");
  });
}

void reuse_finalize(const Where& w, int ctype, ptr partials, const std::vector<int64_t>& bounds,
                    const std::vector<double>& signs, const std::vector<double>& reuse_scales,
                    ptr scale, ptr valid, ptr out, ptr count, ptr last, ptr scaler_flag,
                    ptr adam_ptrs, int64_t adam_tensors, bool clip, double max_norm) {
  const int groups = check_groups(bounds, "reuse_finalize", {&signs, &reuse_scales});
  if (int64_t(signs.size()) != groups || int64_t(reuse_scales.size()) != groups)
    throw std::invalid_argument("gr_fused._C.reuse_finalize: one sign and reuse scale per group");
  const GroupBounds b = group_bounds(bounds, groups);
  dispatch_compute(ctype, [&](auto tag) {
    using C = decltype(tag);
    DeviceGuard guard(w.device);
    reuse_finalize_kernel<C><<<1, kFinalizeThreads, 0, stream_of(w)>>>(
        reinterpret_cast<const double*>(partials), b, group_values(signs),
        group_values(reuse_scales), reinterpret_cast<const float*>(scale),
        reinterpret_cast<const C*>(valid), reinterpret_cast<C*>(out),
        reinterpret_cast<int64_t*>(count), reinterpret_cast<bool*>(last),
        reinterpret_cast<float*>(scaler_flag), reinterpret_cast<const int64_t*>(adam_ptrs),
        adam_ptrs != 0 ? adam_tensors : 0, clip, max_norm);
    check(cudaGetLastError(), "reuse_finalize");
  });
}

}  // namespace cuda
}  // namespace grf
