"""The one compiled part: the fused 8 x 8 block DCT of the CPU encode (hpcfed/codec/_blockdct.c).

Optional: where it cannot be built (no C compiler), the install goes on and the codec uses its NumPy path
(``hpcfed info`` says which one a rank has). Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("hpcfed.codec._blockdct", ["hpcfed/codec/_blockdct.c"],
                             extra_compile_args=["-O3"], optional=True)])
