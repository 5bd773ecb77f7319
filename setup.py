"""Build of the one compiled part, `bict_ray/retrieval/_topk.cpp` (the search's streaming top-k); the rest of the
package is declared in pyproject.toml.

It is a plain shared library with a C ABI, loaded by `bict_ray.retrieval.search` through ctypes: no Python or
numpy headers. It is optional: where no C++ compiler is found the install goes on without it and
`exact_search` falls back to faiss's own top-k (slower, same results up to float32 rounding).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "bict_ray.retrieval._topk",
            sources=["bict_ray/retrieval/_topk.cpp"],
            language="c++",
            # No -march: the vector code is compiled per instruction set and picked at run time, so a
            # build runs on any x86-64 node of a cluster (and on other CPUs through the plain loop).
            extra_compile_args=["-O3", "-std=c++17"],
            optional=True,
        )
    ]
)
