"""Build of the compiled parts; the rest of the package is declared in pyproject.toml.

- `bict_ray/retrieval/_topk.cpp`, the search's streaming top-k, loaded by `bict_ray.retrieval.search`;
- `bict_ray/retrieval/_ranks.cpp`, the exact ranking of exact mAP, loaded by `bict_ray.retrieval.metrics`.

Each is a plain shared library with a C ABI, loaded through ctypes: no Python or numpy headers. Both are
optional: where no C++ compiler is found the install goes on without them, `exact_search` falls back to faiss's
own top-k (slower, same results up to float32 rounding) and exact mAP to numpy sorts (slower, the same numbers).
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
        ),
        Extension(
            "bict_ray.retrieval._ranks",
            sources=["bict_ray/retrieval/_ranks.cpp"],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
    ]
)
