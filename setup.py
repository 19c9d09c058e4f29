"""Install gr_fused. A plain install needs only torch; the compiled extension ``gr_fused._C``
(csrc/) is built when a compiler is present (see the csrc section below)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------ csrc
# gr_fused._C: the host build (C++/OpenMP) and, when nvcc is found, the CUDA kernels. The
# recipe is csrc/build.py (ninja), shared with the build on first use in gr_fused/_ext.py.
#   GR_FUSED_BUILD_CUDA=1   build the CUDA part too; any build failure is an error
#   GR_FUSED_BUILD_CUDA=0   host build only
#   unset                   CUDA part when nvcc is found and the installed torch has CUDA
#                           (kernels a CPU-only torch cannot run are not worth ~75 s); on
#                           failure, the host build alone; on failure again, a pure-Python
#                           install with a warning


def installed_torch_cuda():
    """The CUDA version of the torch this package is installed next to ("12.8"), "" for a
    CPU-only torch, None when it cannot be told. pip builds in an isolated environment
    without torch, so the interpreter is asked again without that isolation."""
    try:
        import torch
        return torch.version.cuda or ""
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.version.cuda or '')"],
                             env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cuda_attempts(flag: str, nvcc_found: bool, torch_cuda) -> list:
    """Which builds to try, in order (True: host + CUDA, False: host only), for
    GR_FUSED_BUILD_CUDA=``flag`` ("1" is handled before: CUDA or fail)."""
    if flag == "0" or not nvcc_found or not torch_cuda:
        return [False]
    return [True, False]


def _csrc_build():
    spec = importlib.util.spec_from_file_location("gr_fused_csrc_build", HERE / "csrc" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildCsrc(build_ext):
    def build_extensions(self):
        self.extensions[:] = [ext for ext in self.extensions if self._build(ext)]

    def _build(self, ext) -> bool:
        flag = os.environ.get("GR_FUSED_BUILD_CUDA", "").strip()
        recipe = _csrc_build()
        output = Path(self.get_ext_fullpath(ext.name))
        tmp = Path(self.build_temp) / "csrc"
        if flag == "1":
            recipe.build(output, tmp, cuda=True, verbose=True)  # failure fails the install
            return True
        nvcc = recipe.find_nvcc() is not None
        attempts = cuda_attempts(flag, nvcc, installed_torch_cuda() if nvcc and flag != "0" else None)
        if nvcc and attempts == [False] and flag != "0":
            sys.stderr.write("gr_fused: nvcc found, but the installed torch has no CUDA: building "
                             "the host kernels only (GR_FUSED_BUILD_CUDA=1 builds the CUDA ones)\n")
        for cuda in attempts:
            try:
                recipe.build(output, tmp, cuda=cuda, verbose=True)
                return True
            except Exception as exc:
                sys.stderr.write(f"gr_fused: building gr_fused._C ({'host + CUDA' if cuda else 'host'}) "
                                 f"failed: {exc}\n")
        sys.stderr.write("gr_fused: WARNING: installing without gr_fused._C (pure Python; the "
                         "Triton and torch backends still work)\n")
        return False


csrc_sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.c*"))
ext_modules = [Extension("gr_fused._C", sources=csrc_sources)] if csrc_sources else []
cmdclass = {"build_ext": BuildCsrc}

if __name__ == "__main__":  # setuptools runs this file as a script; tests import it
    setup(
        name="gr_fused",
        version="0.1.0",
        description="Fused finite-difference gradient regularization (GR, SAM, GNP) for PyTorch",
        packages=find_packages(include=["gr_fused", "gr_fused.*"]),
        exclude_package_data={"gr_fused": ["_C.*"]},  # an in-place build is never package data
        python_requires=">=3.10",
        install_requires=["torch>=2.4"],
        extras_require={
            "test": ["pytest", "pytest-benchmark", "hypothesis", "expecttest", "safetensors",
                     "triton; platform_system == 'Linux'", "lightning", "accelerate"],
            "bench": ["matplotlib", "tqdm", "scikit-learn"],
            "hf": ["transformers>=4.46", "accelerate"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )
