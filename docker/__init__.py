"""Not a Python package: this folder holds the Dockerfiles (docker/cpu, docker/gpu).

Without this file, ``import docker`` run with the repository root on ``sys.path`` (pytest puts it
there) finds this folder as an empty namespace package instead of failing, and kfp.local's optional
Docker runner then crashes at import ("module 'docker' has no attribute 'DockerClient'") in every
local pipeline run. Raising ImportError makes kfp treat the Docker SDK as absent, which it is.
"""

raise ImportError("docker/ in the craft repository holds Dockerfiles, not the Docker SDK (pip package `docker`)")
