"""demixlab: a Hydra/Dora experiment platform for music source separation."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "demixlab" / "__init__.py").read_text()).group(1)

setup(
    name="demixlab",
    version=VERSION,
    description="Train, compare and ship music source separation models (UMX, X-UMX, sliCQ-CDAE, Hybrid Demucs, "
                "BS-RoFormer, Mel-Band RoFormer)",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["demixlab", "demixlab.*"]),
    # The Hydra configuration ships with the package: `demixlab evaluate` and `dora run` compose it.
    package_data={"demixlab": ["conf/*.yaml", "conf/*/*.yaml"]},
    install_requires=[
        "torch",  # install the build you want first (README): an unpinned torch pulls CUDA wheels
        "hydra-core>=1.3",
        "omegaconf",
        "dora-search>=0.1.13",
        "submitit",
        "numpy",
        "scipy",  # LAPACK potrf/potrs in place for BSS Eval v4 (demixlab.evaluation.bsseval)
        "threadpoolctl",  # one BLAS thread for those (next to torch's OpenMP pool)
        "soundfile",
        "julius",
        "tqdm",
        "tensorboard",
        "musdb",
        "museval",
        "matplotlib",  # PNG plots (evaluation box plots, sliCQ spectrograms)
        "pedalboard>=0.9.26",  # augment.pitch_tempo/codec/eq/reverb/distortion (imported only when on)
        "optuna>=4",  # demixlab search (study storage, samplers, pruners, plots)
        "scikit-learn",  # optuna's parameter importances (fANOVA) in demixlab search
    ],
    entry_points={
        "console_scripts": ["demixlab = demixlab.commands:main"],
    },
    extras_require={
        # The reference implementations used as test oracles are NOT listed here: their own
        # requirements (torchaudio, another torch) cannot be installed next to this torch build.
        # They install with --no-deps from tests/requirements-reference.txt (see README); einops
        # is what demucs needs beyond our own requirements, librosa and packaging what the RoFormer
        # references need.
        "onnx": ["onnx", "onnxruntime", "onnxscript"],  # demixlab export --onnx/--quantize, separate --backend onnxruntime
        "automix": ["librosa>=0.10"],  # demixlab automix: beat tracking, chroma (the test extra pins it)
        "test": ["pytest", "scipy", "einops", "onnx", "onnxruntime", "onnxscript", "librosa==0.11.0", "packaging"],
    },
)
