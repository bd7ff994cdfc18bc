"""xla_flags: the tuned XLA:CPU flags are added once, never over a user's own setting."""

from __future__ import annotations

import os
import subprocess
import sys

from ser_jax.cpu import xla_flags

# XNNPACK's convolutions in place of YNNPACK's (benchmarks/NOTES.md), in this order.
TUNED = [
  "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
  "--xla_cpu_experimental_xnn_fusion_type=individual_convolution",
]


def test_adds_each_tuned_flag_once():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  xla_flags.apply(env, jaxlib_version="0.10.2")
  flags = env["XLA_FLAGS"].split()
  assert flags[0] == "--xla_force_host_platform_device_count=8"
  assert flags[1:] == TUNED
  xla_flags.apply(env, jaxlib_version="0.10.2")
  assert env["XLA_FLAGS"].split() == flags


def test_user_setting_wins_and_opt_out_and_old_jaxlib():
  own = "--xla_cpu_experimental_xnn_fusion_type="
  env = {"XLA_FLAGS": own}
  xla_flags.apply(env, jaxlib_version="0.10.2")
  assert env["XLA_FLAGS"].split() == [own, TUNED[0]]
  env = {xla_flags.OPT_OUT: "0"}
  xla_flags.apply(env, jaxlib_version="0.10.2")
  assert "XLA_FLAGS" not in env
  env = {}
  xla_flags.apply(env, jaxlib_version="0.9.0")
  assert env == {}


def test_importing_ser_jax_leaves_xla_flags_alone_and_tune_process_sets_them():
  code = (
    "import os, sys, ser_jax, ser_jax.cpu\n"
    "print(os.environ.get('XLA_FLAGS', '<unset>'))\n"
    "ser_jax.cpu.tune_process()\n"
    "import jax; jax.devices(); print(os.environ['XLA_FLAGS'])"
  )
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_flags.OPT_OUT)}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  untouched, tuned = out.stdout.splitlines()
  assert untouched == "<unset>"
  assert tuned.split() == TUNED
