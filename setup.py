from setuptools import setup

setup(cffi_modules=["zipcomm/_ring_build.py:ffibuilder", "zipcomm/_ring_build.py:scatter_builder"])
