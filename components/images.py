"""The one place where component images are named, and the decorators that use them.

Images are built from docker/cpu and docker/gpu by `make images` and tagged with the git commit they are
built from; they contain craft and kfp, so components install nothing at run time (``install_kfp_package=False``,
no packages_to_install). The pipeline compiled from a commit names that commit's images, so a run executes the
code that was compiled: the tag is ``CRAFT_IMAGE_TAG``, else the code version (craft/version.py: the image's
``CRAFT_GIT_SHA`` or the checkout's HEAD; a checkout with uncommitted changes gives ``<sha>-dirty``, a tag
`make images` never builds, so such a compile cannot run stale code by accident). Override the registry with
CRAFT_IMAGE_REGISTRY, or the full names with CRAFT_IMAGE_CPU / CRAFT_IMAGE_GPU (a digest ``name@sha256:...`` works).
"""

import functools
import os

from kfp import dsl


def image_tag() -> str:
    """``CRAFT_IMAGE_TAG``, else the git sha of the code (craft.version); refuses when neither is known."""
    tag = os.environ.get("CRAFT_IMAGE_TAG", "").strip()
    if tag:
        return tag
    from craft.version import code_version

    version = code_version()
    if version.startswith("unknown:"):
        raise RuntimeError(
            f"components/images.py: no image tag ({version[len('unknown:') :]}); set CRAFT_IMAGE_TAG to the git sha "
            "the images were built from (make images), or CRAFT_IMAGE_CPU / CRAFT_IMAGE_GPU"
        )
    return version


VERSION = "0.1.0"  # the package version (pyproject): part of pipeline version names, never an image tag
REGISTRY = os.environ.get("CRAFT_IMAGE_REGISTRY", "ghcr.io/craft-ml")
TAG = image_tag()
CPU_IMAGE = os.environ.get("CRAFT_IMAGE_CPU", f"{REGISTRY}/craft-cpu:{TAG}")
GPU_IMAGE = os.environ.get("CRAFT_IMAGE_GPU", f"{REGISTRY}/craft-gpu:{TAG}")

# @cpu_component / @gpu_component: lightweight components on the project's own images.
cpu_component = functools.partial(dsl.component, base_image=CPU_IMAGE, install_kfp_package=False)
gpu_component = functools.partial(dsl.component, base_image=GPU_IMAGE, install_kfp_package=False)
