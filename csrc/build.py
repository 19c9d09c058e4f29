"""Build gr_fused._C from csrc/: the one recipe used by setup.py and by the JIT build of
gr_fused/_ext.py. It needs the standard library only (no torch, no setuptools): pybind11's
headers, a C++17 compiler with OpenMP and, for the CUDA part, nvcc.

The build is a ninja file (plain commands, run one by one, when ninja is missing):

* bind.cpp, host.cpp   c++ -O3 -fopenmp       the module and the host build (host.cpp a
                                              second time with AVX2 + FMA on x86-64)
* cuda.cu              nvcc for sm_80 and sm_90 SASS plus compute_90 PTX (only with CUDA)
* link                 c++ (or nvcc, which adds the static CUDA runtime)

Run it by hand with ``python csrc/build.py OUTPUT.so [--cuda] [--build-dir DIR]``.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

CSRC = Path(__file__).resolve().parent
HEADERS = ("grf_api.h", "grf_math.h", "grf_ops.h")
HOST_SOURCES = ("bind.cpp", "host.cpp")
CUDA_SOURCES = ("cuda.cu",)
CUDA_ARCHS = ("80", "90")  # SASS for each; PTX of the last one for newer GPUs
MODULE = "_C"


class BuildError(RuntimeError):
    """The extension could not be built; the message says which step failed and why."""


def source_hash() -> str:
    """A hash of everything the build reads from csrc/ (sources, headers, this recipe)."""
    h = hashlib.sha256()
    for name in sorted(HEADERS + HOST_SOURCES + CUDA_SOURCES + ("build.py",)):
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    return h.hexdigest()[:16]


def extension_filename() -> str:
    return MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def find_nvcc() -> Optional[str]:
    """nvcc from $CUDA_HOME/$CUDA_PATH, then PATH, then /usr/local/cuda; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def find_ninja() -> Optional[str]:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI package ships the binary
    except ImportError:
        return None
    exe = Path(ninja.BIN_DIR) / "ninja"
    return str(exe) if exe.is_file() else None


def _pybind11_include() -> str:
    try:
        import pybind11
    except ImportError as exc:
        raise BuildError("pybind11 is not installed (pip install pybind11)") from exc
    return pybind11.get_include()


def commands(output: Path, build_dir: Path, cuda: bool, nvcc: Optional[str] = None
             ) -> List[Tuple[str, List[str], List[str]]]:
    """The build as (target, inputs, argv) steps, in dependency order."""
    cxx = os.environ.get("CXX", "c++")
    defines = [f'-DGRF_SOURCE_HASH="{source_hash()}"']
    if cuda:
        nvcc = nvcc or find_nvcc()
        if nvcc is None:
            raise BuildError("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        defines += ["-DGRF_WITH_CUDA",
                    f'-DGRF_CUDA_ARCHS="{",".join("sm_" + a for a in CUDA_ARCHS)}"']
    includes = [f"-I{CSRC}", f"-I{_pybind11_include()}",
                f"-I{sysconfig.get_paths()['include']}"]
    cxxflags = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-std=c++17", "-fPIC",
                "-fopenmp", "-fvisibility=hidden", "-Wall"]
    # host.cpp once more with AVX2 + FMA on x86-64 (bind.cpp picks it where the CPU has it)
    variants = [(src, src, []) for src in HOST_SOURCES]
    if platform.machine().lower() in ("x86_64", "amd64"):
        defines.append("-DGRF_WITH_HOST_AVX2")
        variants.append(("host.cpp", "host_avx2.cpp", ["-mavx2", "-mfma", "-DGRF_HOST_NS=host_avx2"]))
    steps, objects = [], []
    headers = [str(CSRC / h) for h in HEADERS]
    for src, name, extra in variants:
        obj = str(build_dir / (name + ".o"))
        steps.append((obj, [str(CSRC / src)] + headers,
                      [cxx, *cxxflags, *extra, *defines, *includes, "-c", str(CSRC / src),
                       "-o", obj]))
        objects.append(obj)
    if cuda:
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
        gencode.append(f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}")
        ccbin = ["-ccbin", os.environ["CXX"]] if "CXX" in os.environ else []
        for src in CUDA_SOURCES:
            obj = str(build_dir / (src + ".o"))
            steps.append((obj, [str(CSRC / src)] + headers,
                          [nvcc, *ccbin, "-O3", "-std=c++17", "--fmad=false", "-Xcompiler=-fPIC",
                           "-Xcompiler=-fvisibility=hidden", *gencode, f"-I{CSRC}",
                           "-c", str(CSRC / src), "-o", obj]))
            objects.append(obj)
        # -ldl: cuda.cu looks libcuda's primary-context state up with dlsym
        link = [nvcc, *ccbin, "-shared", "--cudart=static", "-Xcompiler=-fopenmp", "-ldl"]
    else:
        link = [cxx, "-shared", "-fopenmp"]
    linked = str(build_dir / extension_filename())
    steps.append((linked, objects, [*link, *objects, "-o", linked]))
    return steps


def _ninja_escape(s: str) -> str:
    return s.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _write_ninja(path: Path, steps) -> None:
    lines = ["ninja_required_version = 1.3", "rule run", "  command = $cmd",
             "  description = $desc", ""]
    for target, inputs, argv in steps:
        lines.append(f"build {_ninja_escape(target)}: run " + " ".join(map(_ninja_escape, inputs)))
        lines.append("  cmd = " + shlex.join(argv).replace("$", "$$"))
        lines.append(f"  desc = {Path(argv[0]).name} -> {Path(target).name}")
    path.write_text("\n".join(lines) + "\n")


def _run(argv: List[str], what: str, verbose: bool) -> None:
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if verbose or proc.returncode != 0:
        sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def build(output: Path, build_dir: Path, cuda: bool, verbose: bool = False) -> Path:
    """Compile and link gr_fused._C into ``output`` (replaced atomically). Raises BuildError."""
    output, build_dir = Path(output).resolve(), Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    steps = commands(output, build_dir, cuda)
    for tool in {steps[0][2][0], steps[-1][2][0]}:
        if shutil.which(tool) is None and not Path(tool).is_file():
            raise BuildError(f"compiler {tool!r} was not found")
    ninja = find_ninja()
    if ninja:
        _write_ninja(build_dir / "build.ninja", steps)
        _run([ninja, "-C", str(build_dir)], "ninja build of gr_fused._C", verbose)
    else:
        for target, _, argv in steps:
            _run(argv, f"building {Path(target).name}", verbose)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=output.parent, prefix=".tmp_C", delete=False) as tmp:
        shutil.copyfile(steps[-1][0], tmp.name)
    os.chmod(tmp.name, 0o755)
    os.replace(tmp.name, output)
    return output


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", help="path of the module, e.g. gr_fused/" + extension_filename())
    ap.add_argument("--cuda", action="store_true", help="also build the CUDA kernels")
    ap.add_argument("--build-dir", default=None)
    args = ap.parse_args(argv)
    build_dir = args.build_dir or str(CSRC.parent / "build" / "csrc")
    build(Path(args.output), Path(build_dir), cuda=args.cuda, verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
