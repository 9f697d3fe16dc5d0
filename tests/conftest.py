"""Shared test setup: offline hubs, no telemetry, small thread counts for 2-core machines."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

# The SeaweedFS S3 server fixtures (`s3_server`, `s3_env`) for the object-store and DVC tests.
from tests.s3server import s3_env, s3_server  # noqa: E402, F401
