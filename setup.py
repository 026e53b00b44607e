"""fwpkm-megatron: GPT pretraining with Fast-weight Product Key Memory on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="fwpkm-megatron",
    version="0.1.0",
    description="Pretrain GPT language models with Fast-weight Product Key Memory (FwPKM) at cluster scale",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fwpkm_megatron", "fwpkm_megatron.*"]),
    # Ranges, not pins: GPU clusters bring their own CUDA torch. The CPU pins live in the Makefile.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.17",
        "deepspeed>=0.19",
        "triton>=3.0",
        "mosaicml-streaming>=0.13",
        "tensorboard>=2.16",
        "submitit>=1.5",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.66",
        "pyarrow>=14",  # Parquet and Hugging Face on-disk inputs to fwpkm-prep
        "zstandard>=0.22",  # .zst inputs to fwpkm-prep (streamed decompression)
        "boto3>=1.28",  # s3:// inputs and outputs of fwpkm-prep (listing, ranged reads, downloads)
        "numpy",
    ],
    # transformers (export / lm-eval) is installed in a second step: mosaicml-streaming 0.13 declares
    # transformers<5 but runs with 5.x; see the Makefile and docs/evaluation.md. The exported model's
    # code runs on transformers 4.57 and 5.x (export/hf/configuration_fwpkm.py: TRANSFORMERS_RANGE).
    extras_require={
        "test": ["pytest>=8", "moto[server]>=5.1", "matplotlib>=3.8"],  # moto: a local S3 endpoint for the data
                                                                       # tests; matplotlib: eval and bench plots
        "eval": ["transformers>=4.57,<6", "lm-eval[hf]>=0.4.13", "matplotlib>=3.8"],
        # model.mixer=gdn on CUDA: fla's chunked gated-delta-rule kernels (megatron's GatedDeltaNet imports
        # them) and the fused causal conv. Never installed on CPU: parallel/mcore_cpu.py runs megatron's
        # torch paths there.
        "gpu": ["fla-core>=0.6", "causal-conv1d>=1.5"],
    },
    entry_points={
        "console_scripts": [
            "fwpkm-prep=fwpkm_megatron.cli.prep:main",
            "fwpkm-train=fwpkm_megatron.cli.train:main",
            "fwpkm-eval=fwpkm_megatron.cli.eval:main",
            "fwpkm-export=fwpkm_megatron.cli.export:main",
            "fwpkm-launch=fwpkm_megatron.cli.launch:main",
        ]
    },
)
