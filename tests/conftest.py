"""Test-session set-up: 8 virtual CPU devices (mesh tests), parsed absl flags (grain), a compilation cache."""

import os
import sys
import tempfile

# Must happen before JAX initialises its backends.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `configs.*`

from absl import flags  # noqa: E402
import jax  # noqa: E402

flags.FLAGS.mark_as_parsed()
# The train-step programs are large; identical ones compiled by several tests (and xdist workers) are reused.
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('MMGAN_TEST_CACHE', os.path.join(tempfile.gettempdir(), 'mmgan_jax_test_cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
