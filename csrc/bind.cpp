// gr_fused._C: the pybind11 module. Each phase takes (device, stream, threads) first and
// runs on the host build when device < 0 (its AVX2 compilation where the CPU has it), else
// on that CUDA device (see grf_api.h).
// C++ exceptions become Python exceptions (std::runtime_error -> RuntimeError, carrying the
// CUDA error string; std::invalid_argument -> ValueError). The GIL is released meanwhile.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "grf_api.h"

#ifndef GRF_SOURCE_HASH
#define GRF_SOURCE_HASH "unknown"
#endif
#ifndef GRF_CUDA_ARCHS
#define GRF_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {

// Which compilation of host.cpp runs: "avx2" where the CPU has AVX2 and FMA, else "baseline".
#ifdef GRF_WITH_HOST_AVX2
bool use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
bool use_avx2 = false;
#endif

std::string host_isa(const std::string& name) {
  if (name == "baseline") {
    use_avx2 = false;
  } else if (name == "avx2") {
#ifdef GRF_WITH_HOST_AVX2
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")))
      throw std::invalid_argument("this CPU lacks AVX2/FMA");
    use_avx2 = true;
#else
    throw std::invalid_argument("gr_fused._C was built without the AVX2 host code");
#endif
  } else if (!name.empty()) {
    throw std::invalid_argument("host_isa: expected 'baseline' or 'avx2', got '" + name + "'");
  }
  return use_avx2 ? "avx2" : "baseline";
}

bool host_packs = false;

template <class R, class... A>
auto route(R (*host_fn)(const grf::Where&, A...), R (*avx2_fn)(const grf::Where&, A...),
           R (*cuda_fn)(const grf::Where&, A...)) {
  return [=](int device, uintptr_t stream, int threads, A... args) {
    grf::Where w{device, stream, threads, host_packs};
    if (device < 0) return (use_avx2 && avx2_fn ? avx2_fn : host_fn)(w, args...);
    if (cuda_fn == nullptr)
      throw std::runtime_error("gr_fused._C was built without CUDA (nvcc was not found at "
                               "build time); rebuild with GR_FUSED_BUILD_CUDA=1");
    return cuda_fn(w, args...);
  };
}

}  // namespace

#define GRF_NONE(name) decltype(&grf::host::name)(nullptr)
#ifdef GRF_WITH_HOST_AVX2
#define GRF_AVX2(name) &grf::host_avx2::name
#else
#define GRF_AVX2(name) GRF_NONE(name)
#endif
#ifdef GRF_WITH_CUDA
#define GRF_CUDA(name) &grf::cuda::name
#else
#define GRF_CUDA(name) GRF_NONE(name)
#endif
#define GRF_ROUTE(name) route(&grf::host::name, GRF_AVX2(name), GRF_CUDA(name))

#define GRF_DEF(name, doc) \
  m.def(#name, GRF_ROUTE(name), doc, py::call_guard<py::gil_scoped_release>())

PYBIND11_MODULE(_C, m) {
  m.doc() = "gr_fused's compiled kernels (csrc/): the phases of a GR step over flat buffers";
  GRF_DEF(sq_norm, "(device, stream, threads, dtype, n, g, theta_or_0, partials, out)");
  GRF_DEF(perturb,
          "(device, stream, threads, dtype, n, theta, g, backup, eps, fold, adaptive, into)");
  GRF_DEF(reflect, "(device, stream, threads, dtype, n, theta, g, backup)");
  GRF_DEF(restore, "(device, stream, threads, dtype, n, theta, backup)");
  GRF_DEF(update_none,
          "(device, stream, threads, dtype, n, theta, G, backup, gscale, found_inf)");
  GRF_DEF(update_sgd,
          "(device, stream, threads, dtype, n, theta, G, backup, buf_or_0, first, gscale, "
          "found_inf, lr, momentum, dampening, weight_decay, nesterov)");
  GRF_DEF(update_adamw,
          "(device, stream, threads, dtype, n, theta, G, backup, m, v, step, gscale, "
          "found_inf, lr, beta1, beta2, eps, weight_decay, step_advanced)");
  GRF_DEF(norm_partials,
          "(device, stream, threads, dtype, n, g, theta_or_0, partials) -> how many partial "
          "sums of the norm were written to partials");
  GRF_DEF(ascent_finalize,
          "(device, stream, threads, compute_dtype, partials, count, scale_or_0, out, rho, "
          "gamma, alpha, normalize, fixed_alpha, central): out = {eps, fold, combine}");
  GRF_DEF(update_finalize,
          "(device, stream, threads, compute_dtype, partials, bounds, ascent, scale_or_0, out, "
          "count, last, scaler_flag_or_0, adam_step_or_0, clip, max_norm): out = {gscale per "
          "group..., found_inf} and the skip records");
  m.def("host_isa", &host_isa, py::arg("name") = "",
        "The host code in use ('avx2' or 'baseline'); pass a name to switch (for tests).");
  m.def("set_host_packs", [](bool on) { host_packs = on; },
        "Run the CUDA kernels' 16-byte pack code in the host build (for tests).");
  py::dict codes;
  codes["float32"] = int(grf::kF32);
  codes["float16"] = int(grf::kF16);
  codes["bfloat16"] = int(grf::kBF16);
  codes["float64"] = int(grf::kF64);
  m.attr("dtype_codes") = codes;
  m.attr("max_norm_blocks") = grf::kMaxNormBlocks;
  m.attr("max_groups") = grf::kMaxGroups;
  m.attr("source_hash") = GRF_SOURCE_HASH;
#ifdef GRF_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = GRF_CUDA_ARCHS;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
}
