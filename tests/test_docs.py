"""The README and docs/ say what the code has: every config key, links that resolve, CI's
set-up commands."""

from __future__ import annotations

import pathlib
import re
import tomllib

import ml_collections
import pytest

from ser_jax.config import default_config

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CONFIG_PAGE = REPO / "docs" / "config.md"
# The README, docs/, and the two pages of their own beside code.
PAGES = [
  README,
  *sorted((REPO / "docs").glob("*.md")),
  REPO / "launch" / "README.md",
  REPO / "benchmarks" / "NOTES.md",
]
README_MAX_LINES = 220

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
# A table row whose first cell is one backticked name: `| `train.batch_size` | `32` | ... |`.
KEY_ROW = re.compile(r"^\|\s*`([A-Za-z0-9_.]+)`\s*\|\s*(.*?)\s*\|", re.MULTILINE)
OVERRIDE = re.compile(r"--config\.([A-Za-z0-9_.]+)")


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
  """{'train.batch_size': 32, ...}: every leaf of a ConfigDict under its dotted name."""
  leaves = {}
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      leaves.update(flatten(value, f"{prefix}{key}."))
    else:
      leaves[f"{prefix}{key}"] = value
  return leaves


DEFAULTS = flatten(default_config())
GROUPS = sorted({key.split(".")[0] for key in DEFAULTS if "." in key})


def documented_keys() -> dict[str, str]:
  """{key: default cell} of docs/config.md's tables."""
  rows = KEY_ROW.findall(CONFIG_PAGE.read_text())
  keys = [key for key, _ in rows]
  repeated = sorted({key for key in keys if keys.count(key) > 1})
  assert not repeated, f"docs/config.md lists these keys more than once: {repeated}"
  return dict(rows)


def test_config_page_lists_every_key_of_the_default_config():
  missing = sorted(set(DEFAULTS) - set(documented_keys()))
  assert not missing, f"docs/config.md lacks a row for: {', '.join(missing)}"


def test_config_page_lists_no_key_the_default_config_lacks():
  unknown = sorted(set(documented_keys()) - set(DEFAULTS))
  assert not unknown, f"docs/config.md lists keys ser_jax.config does not have: {unknown}"


def test_config_page_gives_each_key_its_default():
  wrong = {
    key: (cell, f"`{DEFAULTS[key]!r}`")
    for key, cell in documented_keys().items()
    if key in DEFAULTS and cell != f"`{DEFAULTS[key]!r}`"
  }
  assert not wrong, f"docs/config.md's defaults (page, code): {wrong}"


def test_config_page_names_only_existing_keys_in_its_prose():
  pattern = re.compile(rf"\b(?:{'|'.join(GROUPS)})\.[a-z_]+\b")
  spans = INLINE_CODE.findall(CONFIG_PAGE.read_text())
  unknown = sorted({name for span in spans for name in pattern.findall(span)} - set(DEFAULTS))
  assert not unknown, f"docs/config.md names keys that do not exist: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_command_line_overrides_name_existing_keys(page):
  # The study group belongs to study configs (ser_jax/study.py), not to default_config().
  names = {name.rstrip(".") for name in OVERRIDE.findall(page.read_text())}
  unknown = sorted(name for name in names - set(DEFAULTS) if not name.startswith("study."))
  assert not unknown, f"{page.name} overrides keys that do not exist: {unknown}"


def anchors(page: pathlib.Path) -> set[str]:
  """The heading anchors GitHub makes for a Markdown page."""
  seen: dict[str, int] = {}
  result = set()
  for heading in HEADING.findall(FENCE.sub("", page.read_text())):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    result.add(slug if count == 0 else f"{slug}-{count}")
  return result


def relative_links(page: pathlib.Path) -> list[str]:
  text = INLINE_CODE.sub("", FENCE.sub("", page.read_text()))
  return [link for link in LINK.findall(text) if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_point_to_files_and_headings_that_exist(page):
  broken = []
  for link in relative_links(page):
    path, _, anchor = link.partition("#")
    target = (page.parent / path).resolve() if path else page
    if not target.exists():
      broken.append(f"{link} (no file {target.relative_to(REPO)})")
    elif anchor and target.suffix == ".md" and anchor not in anchors(target):
      broken.append(f"{link} (no heading '{anchor}' in {target.relative_to(REPO)})")
  assert not broken, f"{page.name}: broken links: {broken}"


def test_readme_is_short():
  n_lines = len(README.read_text().splitlines())
  assert n_lines <= README_MAX_LINES, f"README.md has {n_lines} lines; move detail to docs/"


def setup_commands() -> list[str]:
  """The command lines of the README's set-up block."""
  text = README.read_text()
  section = text[text.index("## Set-up") :]
  block = FENCE.search(section).group(0).splitlines()[1:-1]
  return [line for line in block if line.strip() and not line.lstrip().startswith("#")]


def ci_steps() -> list[str]:
  lines = (REPO / ".ci" / "run").read_text().splitlines()
  return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def without_pip_options(step: str) -> str:
  """`python -m pip install --quiet -e X` and `pip install -e X` are the same install."""
  return re.sub(r"^(python3? -m )?pip install( --quiet)?", "pip install", step)


def test_readme_has_two_setup_commands_the_demo_and_the_tests():
  demo, tests = setup_commands()
  assert "python -m ser_jax.main --config=configs/demo.py" in demo
  assert (REPO / "configs" / "demo.py").exists()
  assert tests.endswith("python -m pytest -q")


def test_readme_test_command_is_what_ci_runs():
  _, tests = setup_commands()
  ci = [without_pip_options(step) for step in ci_steps()]
  missing = [step for step in tests.split(" && ") if without_pip_options(step) not in ci]
  assert not missing, f"the README's test command has steps that .ci/run lacks: {missing}"
  assert "python -m pytest -q" in ci_steps()


def test_readme_demo_command_sets_up_as_the_test_command_does():
  demo, tests = (command.split(" && ") for command in setup_commands())
  assert demo[:2] == tests[:2], "the two set-up commands make the environment differently"


def test_readme_setup_commands_install_extras_that_exist():
  pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
  extras = set(pyproject["project"]["optional-dependencies"])
  for command in setup_commands():
    for listed in re.findall(r"pip install -e '\.\[([a-z,]+)\]'", command):
      assert set(listed.split(",")) <= extras, f"{command}: extras not in pyproject.toml"
