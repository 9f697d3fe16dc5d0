"""Shared test setup: offline hubs, no telemetry, small thread counts for 2-core machines."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# latent / text-state caches of the stages under test go to a throwaway folder, not ~/.cache/craft
if "CRAFT_CACHE_DIR" not in os.environ:
    os.environ["CRAFT_CACHE_DIR"] = tempfile.mkdtemp(prefix="craft-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CRAFT_CACHE_DIR"], True)

# The SeaweedFS S3 server fixtures (`s3_server`, `s3_env`) for the object-store and DVC tests.
from tests.s3server import s3_env, s3_server  # noqa: E402, F401
