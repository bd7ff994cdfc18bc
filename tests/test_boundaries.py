"""The package's boundaries, read from its imports: the CPU backend is reached only through
`ser_jax.cpu` from the composition roots, and one module says where the cache folder is."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ser_jax"
# The modules that compose a run or a prediction: they ask the backend once and hand it in.
COMPOSITION_ROOTS = {"engine", "predict", "main", "study.__main__"}


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    yield name.removesuffix(".__init__"), ast.parse(path.read_text(), str(path))


def _imported(tree) -> set[str]:
  """Every ser_jax module a module imports, at any depth of its code."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
  return {name for name in names if name.startswith("ser_jax")}


def test_only_composition_roots_import_the_cpu_backend_and_only_its_interface():
  offenders = {}
  for module, tree in _modules():
    if module.startswith("ser_jax.cpu"):
      continue
    cpu_imports = {
      name for name in _imported(tree) if name == "ser_jax.cpu" or name.startswith("ser_jax.cpu.")
    }
    short = module.removeprefix("ser_jax.")
    if cpu_imports and short not in COMPOSITION_ROOTS:
      offenders[module] = cpu_imports
    elif cpu_imports - {"ser_jax.cpu"}:
      offenders[module] = cpu_imports - {"ser_jax.cpu"}
  assert not offenders, f"the CPU backend reached around its interface: {offenders}"


PLATFORMS = {"cpu", "gpu", "cuda", "rocm", "tpu"}


def _platform_names(tree) -> set[str]:
  """Platform names as string constants, and calls that ask which platform runs."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      if node.value.lower() in PLATFORMS:
        found.add(node.value)
    elif isinstance(node, ast.Attribute) and node.attr in ("default_backend", "platform"):
      found.add(node.attr)
  return found


def test_the_research_code_names_no_platform():
  """Models, losses, steps, folds and metrics run alike everywhere: they neither import the
  CPU backend nor ask or name a platform."""
  for module, tree in _modules():
    if module.removeprefix("ser_jax.") in ("models", "losses", "train", "folds", "metrics"):
      assert not {n for n in _imported(tree) if n.startswith("ser_jax.cpu")}, module
      assert not _platform_names(tree), (module, _platform_names(tree))


def test_the_platform_check_sees_a_platform_named():
  tree = ast.parse('def f(x):\n  return x if jax.default_backend() == "gpu" else -x\n')
  assert _platform_names(tree) == {"default_backend", "gpu"}


def test_one_module_reads_the_cache_folder_setting():
  readers = set()
  for module, tree in _modules():
    for node in ast.walk(tree):
      if isinstance(node, ast.Constant) and node.value == "SER_JAX_CACHE":
        readers.add(module)
  assert readers == {"ser_jax.cache"}


def test_the_boundary_check_sees_a_violation(tmp_path):
  """The import reader finds a backend import in a function body (the check can fail)."""
  tree = ast.parse("def f():\n  from ser_jax.cpu import onednn\n  return onednn\n")
  assert _imported(tree) == {"ser_jax.cpu", "ser_jax.cpu.onednn"}
