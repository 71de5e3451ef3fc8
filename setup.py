from setuptools import find_packages, setup

setup(
    name="vq-draw",
    version="0.1.0",
    description="VQ-DRAW: a sequential discrete auto-encoder, trained, tested and with a codec",
    packages=find_packages(include=["vq_draw", "vq_draw.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "pillow",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "notebooks": ["jupyter", "nbclient", "nbformat", "ipykernel"],
        "test": ["pytest", "hypothesis", "scipy", "nbclient", "nbformat", "ipykernel"],
    },
    entry_points={"console_scripts": ["vq-draw=vq_draw.cli:main"]},
)
