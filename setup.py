"""jam_metaseq: Joint Autoregressive Mixture (JAM) models on metaseq and fairseq."""

from setuptools import find_packages, setup

# torch/torchvision are pinned: a looser pin lets pip pull a newer multi-GB CUDA build.
CORE = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy>=1.24,<3",
    "safetensors>=0.4,<1",
    "sentencepiece>=0.2,<0.3",
    "tokenizers>=0.20,<1",
    "pillow>=10",
    "tqdm>=4.66",
    "rich>=13",
    "psutil>=5.9",
    "matplotlib>=3.8",
    "pyyaml>=6",
    "isal>=1.6,<2",  # CRC-32 of jam-ckpt's .pt zip records at ~3x zlib's speed (falls back to zlib)
    "pydantic>=2.7,<3",  # the plan schema of `jam run` (field docstrings as descriptions)
    "gguf>=0.19,<1",  # llama.cpp's own GGUF library: jam-ckpt reads GGUF checkpoints (types, dequantization)
]
EXTRAS = {
    # fairscale: fairseq's --ddp-backend fully_sharded (the launchers' default on GPUs)
    "fairseq": ["fairseq-fixed==0.12.3.1", "fairscale==0.4.13"],
    "retrieval": ["faiss-cpu==1.15.1", "open_clip_torch==3.3.0"],
    "launch": ["submitit>=1.5,<2"],
    "eval": ["lm_eval==0.4.13"],
    # jam serve: the chat page (an ASGI app on Starlette, served by uvicorn)
    "serve": ["starlette>=1.0,<2", "uvicorn>=0.30,<1"],
    "dev": [
        "pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100",
        "transformers>=4.45,<6",  # HF OPT: the independent reference in parity tests and benchmarks
        "accelerate>=1.0,<2",  # transformers' GGUF loading, the reference of tests/test_gguf_smollm2.py
        "selenium>=4.20,<5",  # drives Debian's chromium + chromium-driver in the jam serve page test
    ],
}
EXTRAS["all"] = sorted({d for deps in EXTRAS.values() for d in deps})

setup(
    name="jam_metaseq",
    version="0.1.0",
    description="Joint Autoregressive Mixture (JAM): fuse a text LLM and a text-to-image decoder",
    python_requires=">=3.10",
    packages=find_packages(include=["jam_metaseq*", "checkpoints_tools*", "launch*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "jam = jam_metaseq.cli:main",
            "jam-data = jam_metaseq.data.cli:main",
            "jam-ckpt = checkpoints_tools.cli:main",
            "jam-generate = jam_metaseq.generation.cli:main",
            "jam-retrieval = jam_metaseq.retrieval.cli:main",
            "jam-vq = jam_metaseq.image_tokenizer.cli:main",
            "jam-launch = launch.cli:main",
            "jam-eval = jam_metaseq.eval.cli:main",
        ],
    },
)
