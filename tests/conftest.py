"""Test session setup: 8 fake CPU devices, float32 matmuls, fast compiles.

This must run before JAX initialises its backends, so it sets the flags at import time.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile afresh (hermetic); tests/test_compile_cache.py turns the cache on in a subprocess.
os.environ["RLHF_JAX_COMPILE_CACHE"] = "off"
# XLA:CPU's fusion emitters nearly double the compile time of the tiny test programs (a PPO
# iteration of a one-layer model: about 5 s with them, under 3 s without) when most optimisations
# are off, as here (with them on, turning the emitters off compiles slower: a test-only setting).
# Subprocesses started by the tests take the same flags from RLHF_JAX_TEST_XLA_FLAGS.
COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"
os.environ["RLHF_JAX_TEST_XLA_FLAGS"] = COMPILE_FLAGS
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # inherited by the tests' subprocesses
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if COMPILE_FLAGS not in _flags:
    _flags += " " + COMPILE_FLAGS
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Compile time dominates the tiny configs used in tests.
jax.config.update("jax_disable_most_optimizations", True)
