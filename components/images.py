"""The one place where component images are named. Built from docker/cpu and docker/gpu (`make images`).

Override for a private registry with CRAFT_IMAGE_CPU / CRAFT_IMAGE_GPU when compiling.
"""

import os

VERSION = "0.1.0"
REGISTRY = os.environ.get("CRAFT_IMAGE_REGISTRY", "ghcr.io/craft-ml")
CPU_IMAGE = os.environ.get("CRAFT_IMAGE_CPU", f"{REGISTRY}/craft-cpu:{VERSION}")
GPU_IMAGE = os.environ.get("CRAFT_IMAGE_GPU", f"{REGISTRY}/craft-gpu:{VERSION}")
