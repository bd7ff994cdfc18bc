"""Memory planning for sweeps: XLA's account of a program, the memory left, the chunk plan."""

import os
import types

import jax
import jax.numpy as jnp
import pytest

from ser_jax import memory
from ser_jax.memory import ChunkPlan, GiB, MemoryPlanError, plan_chunks

MEMINFO = """\
MemTotal:       24683664 kB
MemFree:        19896504 kB
MemAvailable:   20000000 kB
Buffers:          123456 kB
"""


def _compiled(fn, *args, **jit_kwargs):
  return jax.jit(fn, **jit_kwargs).lower(*args).compile()


# compiled_bytes


def test_compiled_bytes_of_a_matmul_is_its_arguments_and_output():
  a = jnp.zeros((256, 128), jnp.float32)
  b = jnp.zeros((128, 512), jnp.float32)
  expected = (256 * 128 + 128 * 512 + 256 * 512) * 4
  assert memory.compiled_bytes(_compiled(jnp.matmul, a, b)) == expected


def test_compiled_bytes_counts_the_intermediate_of_two_matmuls():
  a = jnp.zeros((256, 128), jnp.float32)
  b = jnp.zeros((128, 512), jnp.float32)
  c = jnp.zeros((512, 64), jnp.float32)
  known = (a.size + b.size + c.size + 256 * 64) * 4
  intermediate = 256 * 512 * 4  # a @ b, which the second matmul reads whole.
  got = memory.compiled_bytes(_compiled(lambda a, b, c: (a @ b) @ c, a, b, c))
  assert known + intermediate <= got <= known + 2 * intermediate


def test_compiled_bytes_counts_a_donated_buffer_once():
  a = jnp.zeros((256, 128), jnp.float32)
  assert memory.compiled_bytes(_compiled(lambda a: a * 2, a)) == 2 * a.nbytes
  assert memory.compiled_bytes(_compiled(lambda a: a * 2, a, donate_argnums=0)) == a.nbytes


def test_compiled_bytes_without_a_memory_analysis_is_zero():
  assert memory.compiled_bytes(types.SimpleNamespace(memory_analysis=lambda: None)) == 0


# available_bytes


def _cgroup_v2(root, limit: str, current: int, inactive_file: int = 0):
  root.mkdir(exist_ok=True)
  (root / "memory.max").write_text(f"{limit}\n")
  (root / "memory.current").write_text(f"{current}\n")
  (root / "memory.stat").write_text(f"anon 1000\ninactive_file {inactive_file}\nactive_file 5\n")
  return root


def _cgroup_v1(root, limit: int, usage: int, inactive_file: int = 0):
  (root / "memory").mkdir(parents=True)
  (root / "memory" / "memory.limit_in_bytes").write_text(f"{limit}\n")
  (root / "memory" / "memory.usage_in_bytes").write_text(f"{usage}\n")
  (root / "memory" / "memory.stat").write_text(
    f"cache 7\ninactive_file 3\ntotal_inactive_file {inactive_file}\n"
  )
  return root


@pytest.fixture
def meminfo(tmp_path):
  path = tmp_path / "meminfo"
  path.write_text(MEMINFO)
  return path


CPU = jax.devices("cpu")[0]


def test_cpu_without_a_cgroup_limit_has_memavailable(meminfo, tmp_path):
  assert memory.available_bytes(CPU, meminfo, tmp_path / "no_cgroup") == 20000000 * 1024


def test_cgroup_v2_limit_bounds_the_host(meminfo, tmp_path):
  cgroup = _cgroup_v2(tmp_path / "cg", str(8 * GiB), current=3 * GiB)
  assert memory.available_bytes(CPU, meminfo, cgroup) == 5 * GiB


def test_cgroup_v2_usage_leaves_out_inactive_file_pages(meminfo, tmp_path):
  cgroup = _cgroup_v2(tmp_path / "cg", str(8 * GiB), current=3 * GiB, inactive_file=GiB)
  assert memory.available_bytes(CPU, meminfo, cgroup) == 6 * GiB


def test_cgroup_v2_max_means_no_limit(meminfo, tmp_path):
  cgroup = _cgroup_v2(tmp_path / "cg", "max", current=3 * GiB)
  assert memory.available_bytes(CPU, meminfo, cgroup) == 20000000 * 1024


def test_a_cgroup_limit_above_the_host_leaves_memavailable(meminfo, tmp_path):
  cgroup = _cgroup_v2(tmp_path / "cg", str(100 * GiB), current=GiB)
  assert memory.available_bytes(CPU, meminfo, cgroup) == 20000000 * 1024


def test_cgroup_v1_limit_bounds_the_host(meminfo, tmp_path):
  cgroup = _cgroup_v1(tmp_path, 6 * GiB, usage=4 * GiB, inactive_file=GiB)
  assert memory.available_bytes(CPU, meminfo, cgroup) == 3 * GiB


def test_cgroup_v1_unlimited_means_no_limit(meminfo, tmp_path):
  cgroup = _cgroup_v1(tmp_path, 9223372036854771712, usage=4 * GiB)
  assert memory.available_bytes(CPU, meminfo, cgroup) == 20000000 * 1024


def test_usage_above_the_limit_leaves_nothing(meminfo, tmp_path):
  cgroup = _cgroup_v2(tmp_path / "cg", str(2 * GiB), current=3 * GiB)
  assert memory.available_bytes(CPU, meminfo, cgroup) == 0


def test_without_meminfo_the_host_falls_back_to_sysconf(tmp_path):
  got = memory.available_bytes(CPU, tmp_path / "none", tmp_path / "none")
  total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  assert 0 < got <= total


def test_the_real_host_has_some_memory_available():
  total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  assert 0 < memory.available_bytes() <= total


def _accelerator(stats):
  return types.SimpleNamespace(platform="gpu", memory_stats=lambda: stats)


def test_accelerator_has_its_allocator_limit_less_its_use():
  device = _accelerator({"bytes_limit": 80 * GiB, "bytes_in_use": 2 * GiB, "num_allocs": 3})
  assert memory.available_bytes(device) == 78 * GiB


def test_accelerator_without_memory_stats_is_unknown():
  assert memory.available_bytes(_accelerator(None)) == 0
  assert memory.available_bytes(types.SimpleNamespace(platform="tpu")) == 0


# plan_chunks


def test_a_small_memory_gives_small_even_chunks():
  # 10 GiB * 0.9 = 9 GiB holds 3 members of 2.5 GiB.
  plan = plan_chunks(18, int(2.5 * GiB), 10 * GiB, "gpu")
  assert plan == ChunkPlan(
    n_models=18,
    models_per_chunk=3,
    n_chunks=6,
    bytes_per_chunk=3 * int(2.5 * GiB),
    available=10 * GiB,
    limited_by="memory",
  )


def test_a_large_accelerator_trains_all_models_at_once():
  plan = plan_chunks(18, GiB, 80 * GiB, "gpu")
  assert (plan.models_per_chunk, plan.n_chunks, plan.limited_by) == (18, 1, "models")


@pytest.mark.parametrize(
  ("fit", "per_chunk", "n_chunks"),
  [(4, 4, 5), (5, 5, 4), (17, 9, 2), (6, 6, 3), (7, 6, 3), (1, 1, 18)],
)
def test_chunks_are_as_few_and_as_even_as_the_memory_allows(fit, per_chunk, n_chunks):
  plan = plan_chunks(18, GiB, fit * GiB, "tpu", margin=1.0)
  assert (plan.models_per_chunk, plan.n_chunks) == (per_chunk, n_chunks)
  assert plan.models_per_chunk <= fit
  assert (plan.n_chunks - 1) * plan.models_per_chunk < 18 <= plan.n_chunks * plan.models_per_chunk


def test_the_default_margins_are_nine_tenths_on_accelerators_and_three_quarters_on_cpus():
  # 4 GiB per member: 0.9 * 40 GiB = 36 GiB holds 9; 0.75 * 40 GiB = 30 GiB holds 7.
  for platform in ("gpu", "tpu"):
    plan = plan_chunks(50, 4 * GiB, 40 * GiB, platform)
    assert (plan.models_per_chunk, plan.n_chunks, plan.limited_by) == (9, 6, "memory")
  plan = plan_chunks(50, 4 * GiB, 40 * GiB, "cpu")
  assert (plan.models_per_chunk, plan.n_chunks, plan.limited_by) == (7, 8, "memory")
  # At the edge: 0.75 * 4 GiB holds 3 models of 1 GiB, and not a byte more.
  assert plan_chunks(18, GiB, 4 * GiB, "cpu").models_per_chunk == 3
  assert plan_chunks(18, GiB + 1, 4 * GiB, "cpu").models_per_chunk == 2


def test_a_set_bound_caps_the_chunks_and_memory_can_bound_them_further():
  plan = plan_chunks(18, GiB, 1000 * GiB, "cpu", at_most=1)
  assert (plan.models_per_chunk, plan.n_chunks, plan.limited_by) == (1, 18, "setting")
  plan = plan_chunks(18, GiB, 1000 * GiB, "cpu", at_most=4)
  assert (plan.models_per_chunk, plan.n_chunks, plan.limited_by) == (4, 5, "setting")
  assert plan.describe().endswith("(at most 4 at once, as set)")
  # 0.75 * 4 GiB holds 3 models of 1 GiB, below the bound of 4.
  plan = plan_chunks(18, GiB, 4 * GiB, "cpu", at_most=4)
  assert (plan.models_per_chunk, plan.n_chunks, plan.limited_by) == (3, 6, "memory")
  with pytest.raises(MemoryPlanError):  # A bound of one still needs one to fit.
    plan_chunks(18, 8 * GiB, 4 * GiB, "cpu", at_most=1)


def test_one_member_too_large_is_a_one_line_error_with_the_way_out():
  with pytest.raises(MemoryPlanError) as error:
    plan_chunks(18, int(3.1 * GiB), int(1.6 * GiB), "cpu")
  message = str(error.value)
  assert "\n" not in message
  assert "3.1 GiB" in message  # Needed per model.
  assert "1.2 GiB" in message and "1.6 GiB" in message  # Usable, and available.
  for remedy in ("train.batch_size", "features.max_seconds", "model.compute_dtype=bfloat16"):
    assert remedy in message
  assert isinstance(error.value, ValueError)


def test_unknown_memory_trains_all_models_at_once():
  assert plan_chunks(18, 0, 10 * GiB, "gpu").models_per_chunk == 18
  assert plan_chunks(18, GiB, 0, "gpu").models_per_chunk == 18
  assert "memory unknown" in plan_chunks(18, GiB, 0, "gpu").describe()


def test_describe_is_one_line_with_the_chunks_and_the_memory():
  plan = plan_chunks(18, int(0.87 * GiB), int(20.1 * GiB), "gpu", margin=0.13)
  assert plan.describe() == (
    "18 models: 6 chunks of 3, about 2.6 GiB per chunk, 20.1 GiB available (as many as fit)"
  )
  one = plan_chunks(2, GiB, 80 * GiB, "gpu")
  assert one.describe() == (
    "2 models: 1 chunk of 2, about 2.0 GiB per chunk, 80.0 GiB available (all at once)"
  )


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [({"n_models": 0}, "n_models=0"), ({"margin": 1.5}, "margin=1.5")],
)
def test_bad_arguments_name_the_value(kwargs, match):
  arguments = {"n_models": 4, "bytes_per_model": GiB, "available": 8 * GiB, "platform": "cpu"}
  with pytest.raises(ValueError, match=match):
    plan_chunks(**{**arguments, **kwargs})


# group_cells


@pytest.mark.parametrize("n_folds", [1, 2, 5, 7])
@pytest.mark.parametrize("n_members", [1, 3, 18])
@pytest.mark.parametrize("per_program", [1, 2, 4, 5, 18, 90, 200])
def test_cells_cover_every_fold_and_member_once_within_the_program_size(
  n_folds, n_members, per_program
):
  folds = list(range(10, 10 + n_folds))
  groups = memory.group_cells(folds, n_members, per_program)
  models = [(fold, j) for group in groups for fold, chunk in group for j in chunk]
  assert sorted(models) == [(f, j) for f in folds for j in range(n_members)]
  sizes = [sum(len(chunk) for _, chunk in group) for group in groups]
  assert max(sizes) <= max(per_program, 1)
  assert max(sizes) - min(sizes) <= max(n_members, 1)  # Even groups of whole cells.
  for group in groups:  # A group's cells have the same number of members.
    assert len({len(chunk) for _, chunk in group}) == 1
  # As few programs as the size allows: whole folds together, else member chunks.
  if per_program >= n_members:
    assert len(groups) == -(-n_folds // (per_program // n_members))
  else:
    assert len(groups) == n_folds * -(-n_members // per_program)


def test_five_folds_of_one_member_train_in_one_program_or_one_at_a_time():
  assert memory.group_cells(range(5), 1, 5) == [[(k, range(1)) for k in range(5)]]
  assert memory.group_cells(range(5), 1, 1) == [[(k, range(1))] for k in range(5)]
  assert memory.group_cells([0, 1, 2, 3, 4], 1, 2) == [
    [(0, range(1)), (1, range(1))],
    [(2, range(1)), (3, range(1))],
    [(4, range(1))],
  ]
