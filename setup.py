"""Build of the netstack Cython hot path; everything else is in pyproject.toml.

The extension is required, not optional: a build without it must fail loudly (CI
proves it builds on a fresh machine).  ``KAKUREMICHI_NETSTACK_PURE=1`` selects the
pure-Python twin at run time.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("netstack._fast", ["netstack/_fast.pyx"], libraries=["crypto"])],
        compiler_directives={"language_level": "3"},
    )
)
