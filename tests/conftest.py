"""Shared pytest set-up: no network, no Google credentials, small data."""

import os

# Keep google-auth off the metadata server: traffic may only go to loopback.
os.environ["NO_GCE_CHECK"] = "true"
os.environ["GCE_METADATA_HOST"] = "127.0.0.1"
os.environ["GCE_METADATA_IP"] = "127.0.0.1"
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
