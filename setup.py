"""lavis_accel: a Salesforce LAVIS plugin for faster, smaller vision-language models."""
from setuptools import find_packages, setup

setup(
    name="lavis_accel",
    version="0.1.0",
    description="Token reduction (Turbo, ToMe, MADTP, CrossGET) and compact models (DLIP) for Salesforce LAVIS",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["lavis_accel", "lavis_accel.*"]),
    package_data={"lavis_accel": ["configs/**/*.yaml", "configs/**/*.json"]},
    include_package_data=True,
    install_requires=[
        "salesforce-lavis==1.0.2",
        # LAVIS 1.0.2's BLIP beam search is only right below 4.27 (see README, "Versions").
        "transformers>=4.25,<4.27",
        "torch>=2.4",  # checkpoints are read with weights_only=True, whose allow-list settled in 2.4
        "numpy<2",  # opencv-python-headless 4.5.5.64, pinned by LAVIS, fails to import with numpy 2
        "tokenizers",
        "omegaconf",
        "matplotlib",
        "pillow",
        "webdataset",  # the image_text_shards builder (a dependency of LAVIS too)
        "timm",  # DLIP's DeiT start (a dependency of LAVIS too)
    ],
    extras_require={"test": ["pytest", "pytest-xdist"]},  # the suite runs on two workers (run_scripts/test.sh)
    entry_points={"console_scripts": ["lavis-accel=lavis_accel.cli:main"]},
)
