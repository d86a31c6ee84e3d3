"""Installs d2v_plugin, a fairseq ``--user-dir`` plugin for data2vec 1.0 / 2.0."""

from setuptools import find_namespace_packages, setup

setup(
    name="d2v_plugin",
    version="0.1.0",
    description="data2vec 2.0 / 1.0 as a fairseq user-dir plugin that runs on current Python and PyTorch",
    python_requires=">=3.10",
    # package_dir "" = "." makes `pip install -e` add this directory to sys.path (a static
    # .pth) so that Hydra finds hydra_plugins/ by scanning directories, as it does.
    package_dir={"": "."},
    packages=find_namespace_packages(include=["d2v_plugin", "d2v_plugin.*", "hydra_plugins.*"]),
    install_requires=[
        "fairseq-fixed==0.12.3.1",
        "torch>=2.6",
        "torchvision",
        "omegaconf>=2.3",
        "hydra-core>=1.3",
        "sentencepiece",
        "soundfile",
        "numpy",
        "tqdm",
        "scipy",
        "scikit-learn",
        "jiwer",  # WER / CER of speech recognition
        "timm",  # image fine-tuning: mixup / cutmix, RandAugment, random erasing
        "matplotlib",  # d2v-plot
    ],
    extras_require={
        # d2v-export / d2v-import-hf: safetensors weights, Hugging Face transformers, ONNX
        "export": ["safetensors", "transformers", "onnx", "onnxruntime"],
        # beam search with a KenLM language model (d2v-transcribe --lm)
        "asr": ["flashlight-text"],
        # tensorboard logging (common.tensorboard_logdir) and d2v-plot --html
        "monitor": ["tensorboard", "plotly"],
        "test": ["pytest", "safetensors", "transformers", "onnx", "onnxruntime", "flashlight-text", "tensorboard", "plotly"],
    },
    entry_points={
        "console_scripts": [
            "d2v-prep-text=d2v_plugin.prep.text:main",
            "d2v-squad-eval=d2v_plugin.squad_eval:main",
            "d2v-export=d2v_plugin.export.cli:main",
            "d2v-import-hf=d2v_plugin.export.hf:import_main",
            "d2v-extract=d2v_plugin.export.extract:main",
            "d2v-transcribe=d2v_plugin.asr.transcribe:main",
            "d2v-classify=d2v_plugin.classify:main",
            "d2v-plot=d2v_plugin.monitor.plot:main",
        ],
    },
)
