"""The project's XLA:CPU defaults: added once, never over the user's own setting, skipped on an
unmeasured jaxlib or with the opt-out, and accepted by the installed XLA."""

import os
import subprocess
import sys

from pasd_jax.perf import xla_cpu

FLAG = xla_cpu.CPU_FLAGS[0]


def test_added_to_the_users_flags_once():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_cpu.apply_defaults(env, "0.10.2") == [FLAG]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}"
    assert xla_cpu.apply_defaults(env, "0.10.2") == []  # already there: unchanged
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_the_users_value_opt_out_and_unknown_jaxlib_win():
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
    assert xla_cpu.apply_defaults(mine, "0.10.2") == [] and mine["XLA_FLAGS"].endswith("individual_dot")
    off = {xla_cpu.OPT_OUT: "0"}
    assert xla_cpu.apply_defaults(off, "0.10.2") == [] and "XLA_FLAGS" not in off
    other = {}
    assert xla_cpu.apply_defaults(other, "0.11.0") == [] and "XLA_FLAGS" not in other


def test_installed_xla_accepts_the_flags():
    """An unknown flag makes XLA abort the process: run a convolution under the defaults."""
    env = dict(os.environ, XLA_FLAGS=" ".join(xla_cpu.CPU_FLAGS), JAX_PLATFORMS="cpu")
    code = ("import jax, jax.numpy as jnp; x = jnp.ones((1, 8, 8, 3)); k = jnp.ones((3, 3, 3, 4));"
            "y = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'));"
            "print(float(y[0, 4, 4, 0]))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "27.0"
