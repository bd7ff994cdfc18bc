"""The docs against the code: every config key documented, every link resolving."""

import pathlib
import re

import ml_collections

from ser_jax.config import default_config

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  keys = set()
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys |= _dotted_keys(value, f"{prefix}{name}.")
    else:
      keys.add(f"{prefix}{name}")
  return keys


def _table_keys(text: str) -> set[str]:
  """The `group.key` names in the first column of a markdown table."""
  keys = set()
  for line in text.splitlines():
    if line.startswith("| `"):
      first_cell = line.split("|")[1]
      keys |= set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", first_cell))
  return keys


def test_the_config_page_lists_every_key_and_no_other():
  documented = _table_keys((REPO / "docs" / "config.md").read_text())
  keys = _dotted_keys(default_config())
  assert len(keys) > 40  # The walk found the config's groups.
  assert sorted(keys - documented) == [], "keys missing from docs/config.md"
  assert sorted(documented - keys) == [], "docs/config.md names keys the config lacks"


def test_the_key_check_notices_a_missing_row():
  text = (REPO / "docs" / "config.md").read_text()
  without = "\n".join(line for line in text.splitlines() if not line.startswith("| `seed`"))
  assert "seed" in _dotted_keys(default_config()) - _table_keys(without)


def test_every_relative_link_resolves():
  broken = []
  for page in PAGES:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
      if "://" not in target and not (page.parent / target).exists():
        broken.append(f"{page.relative_to(REPO)} -> {target}")
  assert broken == []


def test_the_readme_is_short_and_its_test_command_is_what_ci_runs():
  readme = (REPO / "README.md").read_text()
  assert len(readme.splitlines()) <= 200
  setup = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
  demo, tests = [line for line in setup.splitlines() if line.startswith("python3 -m venv")]
  assert "python -m ser_jax.main --config=configs/demo.py" in demo
  ci = (REPO / ".ci" / "run").read_text()
  assert tests.endswith("python -m pytest -q")
  assert "pip install --quiet -e '.[cpu,test]'" in ci and ci.rstrip().endswith(
    "python -m pytest -q"
  )
