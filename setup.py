"""Build script: the pure-Python package (the native module is added by CMake, see CMakeLists.txt)."""
from setuptools import setup

setup()
