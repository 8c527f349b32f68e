"""Test session setup: 8 fake CPU devices, float32 matmuls, fast compiles.

This must run before JAX initialises its backends, so it sets the flags at import time.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile afresh (hermetic); tests/test_compile_cache.py turns the cache on in a subprocess.
os.environ["RLHF_JAX_COMPILE_CACHE"] = "off"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Compile time dominates the tiny configs used in tests.
jax.config.update("jax_disable_most_optimizations", True)
