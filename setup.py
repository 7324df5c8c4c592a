# Project metadata lives in pyproject.toml. This file exists only because
# cffi hooks into setuptools through the `cffi_modules` keyword, which
# pyproject.toml cannot express: it compiles native/ring.c and the cdef from
# native/vm_event_abi.h into policyc.native._vm_event at install time (gcc
# and the Python headers only; no Xen headers or libraries).
from setuptools import setup

setup(cffi_modules=["native/build_vm_event.py:ffibuilder"])
