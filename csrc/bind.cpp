// gr_fused._C: the pybind11 module. Each phase takes (device, stream, threads) first and
// runs on the host build when device < 0 (its AVX2 compilation where the CPU has it), else
// on that CUDA device (see grf_api.h); then a Table (built once per tensor table by the
// Python side) and the phase's own arguments.
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

grf::Table make_table(uintptr_t layout, uintptr_t ptrs, int64_t num_chunks, int64_t num_tensors,
                      int64_t chunk, uintptr_t backup, bool aligned, int dtype) {
  if (dtype < grf::kF32 || dtype > grf::kF64)
    throw std::invalid_argument("gr_fused._C: unknown dtype code " + std::to_string(dtype));
  if (num_chunks < 0 || num_tensors < 0 || chunk <= 0 || chunk % 16 != 0)
    throw std::invalid_argument("gr_fused._C.Table: counts must be >= 0 and chunk a positive "
                                "multiple of 16");
  if ((num_chunks > 0 || num_tensors > 0) && (layout == 0 || ptrs == 0))
    throw std::invalid_argument("gr_fused._C.Table: null layout or ptrs");
  if (num_chunks > 0 && (backup == 0 || backup % 64 != 0))
    throw std::invalid_argument("gr_fused._C.Table: the backup must be 64-byte aligned");
  return grf::Table{layout, ptrs, num_chunks, num_tensors, chunk, backup, aligned, dtype};
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
  m.doc() = "gr_fused's compiled kernels (csrc/): the phases of a GR step over tensor tables";
  py::class_<grf::Table>(m, "Table",
                         "A tensor table's addresses: (layout, ptrs, num_chunks, num_tensors, "
                         "chunk, backup, aligned, dtype); see gr_fused/backends/tensor_table.py")
      .def(py::init(&make_table))
      .def_readonly("layout", &grf::Table::layout)
      .def_readonly("ptrs", &grf::Table::ptrs)
      .def_readonly("num_chunks", &grf::Table::num_chunks)
      .def_readonly("num_tensors", &grf::Table::num_tensors)
      .def_readonly("chunk", &grf::Table::chunk)
      .def_readonly("backup", &grf::Table::backup)
      .def_readonly("aligned", &grf::Table::aligned)
      .def_readonly("dtype", &grf::Table::dtype);
  GRF_DEF(norm_partials,
          "(device, stream, threads, table, adaptive, partials): one double per chunk");
  GRF_DEF(sq_norm, "(device, stream, threads, table, adaptive, partials_scratch, out): "
                   "out (a double) = Σ g² (Σ (θ·g)² if adaptive)");
  GRF_DEF(dots_partials,
          "(device, stream, threads, table, dirs, partials): interval=k's [Σ g², Σ g·d, Σ d²] "
          "(d the direction row dirs) of each chunk, three doubles per chunk");
  GRF_DEF(dots, "(device, stream, threads, table, dirs, partials_scratch, out): out (three "
                "doubles) = [Σ g², Σ g·d, Σ d²]");
  GRF_DEF(perturb, "(device, stream, threads, table, eps, fold, adaptive, dirs_or_0): with "
                   "dirs, also direction ← g (before the fold)");
  GRF_DEF(reflect, "(device, stream, threads, table)");
  GRF_DEF(restore, "(device, stream, threads, table)");
  GRF_DEF(update_none, "(device, stream, threads, table, s0, found_inf, kind, dirs, s1, s2): "
                       "kind 0 (s0 = gscale), 1 (also caches the direction: s1 = a, s2 = c), "
                       "2 (interval=k reuse: s0 = u, s1 = v)");
  GRF_DEF(update_sgd,
          "(device, stream, threads, table, s0, found_inf, lr, lr_at, lr_dtype, momentum, "
          "dampening, weight_decay, nesterov, kind, dirs, s1, s2)");
  GRF_DEF(update_adamw,
          "(device, stream, threads, table, s0, found_inf, lr, lr_at, lr_dtype, beta1, "
          "beta2, eps, weight_decay, steps_advanced, kind, dirs, s1, s2)");
  GRF_DEF(ascent_finalize,
          "(device, stream, threads, compute_dtype, partials, count, scale_or_0, out, rho, "
          "gamma, alpha, normalize, fixed_alpha, central, eps_sign, combine_sign): "
          "out = {eps, fold, combine}");
  GRF_DEF(update_finalize,
          "(device, stream, threads, compute_dtype, partials, bounds, ascent, scale_or_0, out, "
          "count, last, scaler_flag_or_0, adam_ptrs_or_0, adam_tensors, clip, max_norm, "
          "signs, valid_or_0): out = {gscale per group..., found_inf}, the skip records and "
          "AdamW's step counts; with signs (interval=k, partials from dots_partials) also "
          "{a, c} per group after found_inf and *valid");
  GRF_DEF(reuse_finalize,
          "(device, stream, threads, compute_dtype, partials, bounds, signs, reuse_scales, "
          "scale_or_0, valid, out, count, last, scaler_flag_or_0, adam_ptrs_or_0, "
          "adam_tensors, clip, max_norm): out = {u, v per group..., found_inf}, the skip "
          "records and AdamW's step counts");
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
  m.attr("max_groups") = grf::kMaxGroups;
  py::dict kinds;
  kinds["plain"] = int(grf::kPlain);
  kinds["cache"] = int(grf::kCache);
  kinds["reuse"] = int(grf::kReuse);
  m.attr("update_kinds") = kinds;
  m.attr("source_hash") = GRF_SOURCE_HASH;
#ifdef GRF_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = GRF_CUDA_ARCHS;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
}
