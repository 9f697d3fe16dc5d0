"""The one place where component images are named, and the decorators that use them.

Images are built from docker/cpu and docker/gpu (`make images`); they contain craft and kfp, so
components install nothing at run time (``install_kfp_package=False``, no packages_to_install).
Override for a private registry with CRAFT_IMAGE_CPU / CRAFT_IMAGE_GPU when compiling.
"""

import functools
import os

from kfp import dsl

VERSION = "0.1.0"
REGISTRY = os.environ.get("CRAFT_IMAGE_REGISTRY", "ghcr.io/craft-ml")
CPU_IMAGE = os.environ.get("CRAFT_IMAGE_CPU", f"{REGISTRY}/craft-cpu:{VERSION}")
GPU_IMAGE = os.environ.get("CRAFT_IMAGE_GPU", f"{REGISTRY}/craft-gpu:{VERSION}")

# @cpu_component / @gpu_component: lightweight components on the project's own images.
cpu_component = functools.partial(dsl.component, base_image=CPU_IMAGE, install_kfp_package=False)
gpu_component = functools.partial(dsl.component, base_image=GPU_IMAGE, install_kfp_package=False)
