from setuptools import find_packages, setup

setup(
    name="keras_taylor",
    version="0.1.0",
    description="Taylor-expansion channel pruning for Keras 3 CNNs (Molchanov et al. ICLR'17, CVPR'19)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_taylor", "keras_taylor.*"]),
    py_modules=["keras_taylor_cli"],  # the console script: answers --help without importing TensorFlow
    python_requires=">=3.10",
    install_requires=[
        "keras>=3.10",
        "numpy",
        "absl-py",
    ],
    extras_require={
        # TensorFlow is the backend the scoring step runs on; `tensorflow` (GPU)
        # works as well as the CPU wheel.
        "tf": ["tensorflow-cpu>=2.18"],
        "examples": ["tensorflow-cpu>=2.18", "tensorflow-datasets", "importlib_resources", "matplotlib"],  # importlib_resources: tfds downloads
        # `keras_taylor.export.export_onnx`; tested with tf2onnx 1.17.0,
        # onnx 1.23.2, onnxruntime 1.31.1 on TF 2.21 / Keras 3.15.
        "onnx": ["tf2onnx>=1.16", "onnx", "onnxruntime"],
        # KerasHub vision models (tests/test_kerashub.py, docs/kerashub.md).
        # keras-hub itself is installed with --no-deps by .ci/setup.sh: its
        # own requirements pull `tensorflow` (GPU) and `tensorflow-text`,
        # which would replace tensorflow-cpu; vision models need only these.
        "hub": ["regex", "tokenizers", "sentencepiece", "kagglehub"],
        "test": [
            "tensorflow-cpu>=2.18", "tensorflow-datasets", "pytest", "pytest-xdist", "hypothesis", "scipy", "matplotlib",
            "tf2onnx>=1.16", "onnx", "onnxruntime", "tensorboard", "nbclient", "nbformat", "ipykernel",
            "regex", "tokenizers", "sentencepiece", "kagglehub",  # the "hub" extra; keras-hub: .ci/setup.sh
        ],
    },
    entry_points={"console_scripts": ["keras-taylor = keras_taylor_cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
