"""Optional compiled speed-ups; everything else is in pyproject.toml.

Each extension is optional: without a C compiler (or on a platform it does not support) the
build prints a warning and derpd/stund run their pure-Python paths, which behave the same.
"""

import sys

from setuptools import Extension, setup

ext_modules = [
    Extension("derpd._speedups", ["derpd/_speedups.c"], optional=True),
]
if sys.platform.startswith("linux"):
    ext_modules.append(Extension("stund._mmsg", ["stund/_mmsg.c"], optional=True))
    ext_modules.append(Extension("derpd._dataplane", ["derpd/_dataplane.c"], optional=True))

setup(ext_modules=ext_modules)
