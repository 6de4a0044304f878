"""Build of the Cython hot paths; everything else is in pyproject.toml.

* ``netstack._fast``: the TCP/IP stack's hot path and the Internet checksum;
  ``netstack.wireguard._fast``: WireGuard's transport messages through OpenSSL's
  libcrypto.  ``KAKUREMICHI_NETSTACK_PURE=1`` selects their pure-Python twins at run
  time.
* ``gateway.proxy.h1._scan``: the scanner of plain HTTP/1.1 heads; whatever it does not
  take, llhttp judges (``gateway/proxy/h1/read.py``), and
  ``KAKUREMICHI_H1_SCAN=0`` leaves every head to llhttp.
* ``gateway/proxy/headers.py``, ``h1/read.py`` and ``h1/write.py``: the gateway's
  per-request header work, compiled by Cython as they are (pure-Python mode: the
  ``.py`` files are the source, read by mypy and the tests alike); a fifth less CPU
  per proxied request than the interpreted modules.

The extensions are required, not optional: a build without them must fail loudly (CI
proves they build on a fresh machine).
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension("netstack._fast", ["netstack/_fast.pyx"]),
            Extension(
                "netstack.wireguard._fast", ["netstack/wireguard/_fast.pyx"], libraries=["crypto"]
            ),
            Extension("gateway.proxy.h1._scan", ["gateway/proxy/h1/_scan.pyx"]),
            Extension("gateway.proxy.headers", ["gateway/proxy/headers.py"]),
            Extension("gateway.proxy.h1.read", ["gateway/proxy/h1/read.py"]),
            Extension("gateway.proxy.h1.write", ["gateway/proxy/h1/write.py"]),
        ],
        compiler_directives={"language_level": "3"},
    )
)
