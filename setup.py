"""Install gr_fused. A plain install needs only torch; the compiled extension ``gr_fused._C``
(csrc/) is built when a compiler is present (see the csrc section below)."""
from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
# csrc/: the host (CPU) and CUDA kernels are added here by the extension build.

setup(
    name="gr_fused",
    version="0.1.0",
    description="Fused finite-difference gradient regularization (GR, SAM, GNP) for PyTorch",
    packages=find_packages(include=["gr_fused", "gr_fused.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton; platform_system == 'Linux'"],
        "bench": ["matplotlib", "tqdm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
