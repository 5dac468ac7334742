# Placeholder; replaced by the CUDA extension build (see csrc/).
from setuptools import setup

setup()
