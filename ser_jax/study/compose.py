"""A study's config, its corpora and settings, each run's config, and the checks of a rerun.

A study config file starts from `study_config(BASE)`: BASE's config (a run's config file)
with a `study` group. Every ordinary key the file sets applies to every run, whatever its
value; `study.settings` names each setting's overrides as a group of keys:

  config = study_config("configs/mfcc_focal.py")
  config.cv.n_folds = 5
  config.study.settings = {
    "softmax": {"loss": {"name": "softmax"}},
    "focal": {"loss": {"name": "focal", "gamma": 2.0}},
  }
  config.study.reference = "softmax"

A run's config, later layers winning (run_config):
  1. the base config,
  2. the keys the study config sets,
  3. the corpus: data.corpus and data.root from its study.corpora entry (an EmoBox entry's
     @AUDIO_ROOT as data.audio_root; the EmoBox-only keys at their defaults elsewhere),
  4. the setting's keys,
  5. the `--config.<key>=` overrides of the command line (data.corpus, data.root and
     data.test_* excepted: the study sets them per corpus).
With cv.scheme='speaker' a corpus then gets min(cv.n_folds, its speakers) folds.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import inspect
import json
import logging
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

import ml_collections

from ser_jax import (
  compare,
  config_tree,
  engine,
  experiment,
  io_utils,
  run_data,
  run_results,
  trainer,
)
from ser_jax.cli import USER_ERRORS
from ser_jax.config import ConfigError, default_config, validate_config
from ser_jax.data import corpora
from ser_jax.folds import FoldError

REPO = pathlib.Path(__file__).resolve().parents[2]
# Study keys that choose which runs exist and how the table is computed: a rerun may change
# them (corpora and settings may be added or removed, not redefined).
_STUDY_NEUTRAL_KEYS = (
  "study.corpora",
  "study.settings",
  "study.reference",
  "study.cross_corpus",
  "study.resamples",
)
# Keys the study sets per corpus and pair; neither a setting nor the command line may.
_CORPUS_KEYS = ("data.corpus", "data.root", "data.test_corpus", "data.test_root")
# Ordinary keys that apply to EmoBox corpora only; a study's other corpora keep the defaults.
_EMOBOX_KEYS = ("data.audio_root", "data.case_insensitive_paths")
# What makes one run fail (and, for the reference setting, its corpus) while the study goes
# on: what a single run reports in one line, a diverged training among them.
RUN_ERRORS = (*USER_ERRORS, trainer.NonFiniteLossError)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")
# A setting's overrides are split at the commas that start the next `key=`.
_NEXT_OVERRIDE = re.compile(r",(?=\s*[A-Za-z_][\w.]*\s*=)")


def study_config(base: str = "configs/mfcc_focal.py") -> ml_collections.ConfigDict:
  """The config of the config file `base` (path or path:argument) and the `study` group."""
  config = load_config_file(base)
  config.study = ml_collections.ConfigDict()
  config.study.base = base  # Recorded; a study config file builds on it.
  # 'NAME=CORPUS:ROOT' (CORPUS a reader; for csv ROOT is the manifest), and for EmoBox
  # 'NAME=emobox:ROOT@AUDIO_ROOT' (ROOT its data/<dataset>/ folder; @AUDIO_ROOT optional).
  config.study.corpora = ()
  config.study.settings = ml_collections.ConfigDict()  # {NAME: {group: {key: value}}}.
  config.study.reference = ""  # The setting every other is compared with.
  config.study.cross_corpus = False  # Also train on each corpus and test on every other.
  config.study.resamples = compare.DEFAULT_RESAMPLES  # Bootstrap resamples and permutations.
  return config


@dataclasses.dataclass(frozen=True)
class Corpus:
  """One corpus of the study: its name, reader and root (and an EmoBox corpus's audio root)."""

  name: str
  reader: str
  root: str
  audio_root: str = ""


@dataclasses.dataclass(frozen=True)
class Setting:
  """One setting: its name and its config overrides as dotted keys, in order."""

  name: str
  overrides: tuple[tuple[str, object], ...]

  def describe(self) -> str:
    return ", ".join(f"{key}={value}" for key, value in self.overrides) or "the base config"


@dataclasses.dataclass(frozen=True)
class Run:
  """One ordinary run of the study."""

  path: str  # Relative to the study's workdir.
  setting: str
  config: ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Outcome:
  """A run's results (ser_jax.run_results), or the line saying why it failed."""

  result: run_results.RunResults | None
  error: str | None = None


def parse_corpus(text: str) -> Corpus:
  """'NAME=CORPUS:ROOT' -> Corpus; ROOT made absolute (it may be empty for 'demo')."""
  name, equals, rest = text.partition("=")
  reader, colon, root = rest.partition(":")
  name, reader, root = name.strip(), reader.strip(), root.strip()
  if not (equals and colon and _NAME.fullmatch(name)):
    raise ConfigError(
      f"study.corpora entry {text!r} is not NAME=CORPUS:ROOT (NAME of letters, digits and _), "
      "e.g. 'emodb=emodb:/data/emodb', 'casia=csv:/data/casia/manifest.csv' or "
      "'emodb=emobox:/EmoBox/data/emodb@/data/emodb'"
    )
  if reader not in corpora.CORPORA:
    raise ConfigError(
      f"study.corpora entry {text!r}: unknown corpus '{reader}'; expected one of: "
      f"{', '.join(sorted(corpora.CORPORA))}"
    )
  if not root and reader != "demo":
    raise ConfigError(f"study.corpora entry {text!r} has no ROOT (only 'demo' is built in)")
  audio_root = ""
  if reader == "emobox":
    root, _, audio_root = root.partition("@")
    audio_root = _absolute(audio_root.strip())
  return Corpus(name, reader, _absolute(root.strip()), audio_root)


def _absolute(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path)) if path else ""


def parse_setting(text: str) -> tuple[str, dict]:
  """'NAME:key=value,key=value' (the command line's form) -> (NAME, {'key': value}): the
  entry of study.settings it stands for, its keys dotted. Values are Python literals, or
  else strings."""
  name, _, rest = text.partition(":")
  name = name.strip()
  if not _NAME.fullmatch(name):
    raise ConfigError(
      f"setting {text!r} is not NAME:key=value,... (NAME of letters, digits and _), "
      "e.g. 'focal:loss.name=focal,loss.gamma=2.0'"
    )
  overrides = {}
  for part in _NEXT_OVERRIDE.split(rest) if rest.strip() else ():
    key, equals, value = part.partition("=")
    if not equals or not key.strip():
      raise ConfigError(f"setting {text!r}: {part!r} is not key=value")
    overrides[key.strip()] = _literal(value.strip())
  return name, overrides


def settings_group(texts: Sequence[str]) -> ml_collections.ConfigDict:
  """study.settings of 'NAME:key=value,...' entries (parse_setting's form)."""
  parsed = [parse_setting(text) for text in texts]
  _unique("settings", [name for name, _ in parsed])
  return ml_collections.ConfigDict(
    {name: config_tree.unflatten(overrides) for name, overrides in parsed}
  )


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _unique(kind: str, names: Sequence[str]) -> None:
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ConfigError(f"study.{kind} repeats the name {repeated[0]!r}; names must differ")


def _setting(name: str, group) -> Setting:
  if not _NAME.fullmatch(name):
    raise ConfigError(f"study.settings has the name {name!r}; use letters, digits and _")
  if not isinstance(group, ml_collections.ConfigDict | Mapping):
    raise ConfigError(
      f"study.settings.{name}={group!r} is not a group of keys, e.g. "
      "{'loss': {'name': 'focal', 'gamma': 2.0}}"
    )
  overrides = tuple(config_tree.flatten(group).items())
  for key, _ in overrides:
    if key in (*_CORPUS_KEYS, "data.audio_root"):
      raise ConfigError(
        f"setting '{name}' sets {key}, which the study sets per corpus; give corpora in "
        "study.corpora"
      )
  return Setting(name, overrides)


def study_parts(config: ml_collections.ConfigDict) -> tuple[list[Corpus], list[Setting]]:
  """The study's corpora and settings (the reference first), checked; ConfigError names the
  bad entry."""
  if not config.study.corpora:
    raise ConfigError(
      "study.corpora is empty; give --config.study.corpora='(\"NAME=CORPUS:ROOT\", ...)', "
      "e.g. '(\"emodb=emodb:/data/emodb\",)', or set SER_JAX_DATA to the folder a study "
      "config reads its corpora from (configs/focal_study.py, configs/emobox_study.py)"
    )
  if not config.study.settings:
    raise ConfigError(
      "study.settings is empty; give at least one, e.g. "
      "--settings=softmax:loss.name=softmax --settings=focal:loss.name=focal"
    )
  if config.study.resamples < 2:
    raise ConfigError(f"study.resamples={config.study.resamples} must be at least 2")
  settings = {name: _setting(name, group) for name, group in config.study.settings.items()}
  if config.study.reference not in settings:
    raise ConfigError(
      f"study.reference={config.study.reference!r} names no setting; expected one of: "
      f"{', '.join(settings)}"
    )
  study_corpora = [parse_corpus(text) for text in config.study.corpora]
  _unique("corpora", [c.name for c in study_corpora])
  reference = settings.pop(config.study.reference)
  return study_corpora, [reference, *settings.values()]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """get_config() of a config file given as `path` or `path:argument` (as --config takes it);
  a relative path is looked up in the working folder, then in the repository."""
  path, _, argument = spec.partition(":")
  candidates = [pathlib.Path(path).expanduser()]
  if not candidates[0].is_absolute():
    candidates.append(REPO / path)
  found = next((p for p in candidates if p.is_file()), None)
  if found is None:
    raise ConfigError(
      f"config file {spec!r} does not exist (looked for {', '.join(map(str, candidates))})"
    )
  module_spec = importlib.util.spec_from_file_location(f"_config_{found.stem}", found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"config file {found} defines no get_config()")
  arguments = (argument,) if argument else ()
  try:
    inspect.signature(module.get_config).bind(*arguments)
  except TypeError as error:
    takes = f"the argument {argument!r}" if argument else "no argument"
    raise ConfigError(
      f"config file {spec!r}: its get_config() does not take {takes} ({error})"
    ) from None
  return module.get_config(*arguments)


def _corpus_keys(corpus: Corpus) -> dict:
  keys = {"data.corpus": corpus.reader, "data.root": corpus.root}
  if corpus.reader != "emobox":
    defaults = config_tree.flatten(default_config())
    keys.update({key: defaults[key] for key in _EMOBOX_KEYS})
  elif corpus.audio_root:  # Else the study's data.audio_root.
    keys["data.audio_root"] = corpus.audio_root
  return keys


def run_config(
  config: ml_collections.ConfigDict,
  corpus: Corpus,
  setting: Setting,
  command_line_keys: Iterable[str] = (),
) -> ml_collections.ConfigDict:
  """The config of `setting` on `corpus` (before the corpus's fold count): the study config
  without its `study` group, then the corpus, the setting, and the keys `command_line_keys`
  (their values are the study config's, where the command line put them); see the module."""
  run = copy.deepcopy(config)
  with run.unlocked():
    del run["study"]
  run.unlock()
  config_tree.overlay(run, _corpus_keys(corpus), f"corpus '{corpus.name}'")
  config_tree.overlay(run, dict(setting.overrides), f"setting '{setting.name}'")
  command_line = {}
  for key in command_line_keys:
    if key in _CORPUS_KEYS:
      raise ConfigError(
        f"--config.{key} is set per corpus by study.corpora; give the corpora there"
      )
    if not key.startswith("study.") and (corpus.reader == "emobox" or key not in _EMOBOX_KEYS):
      command_line[key] = config_tree.value(config, key)
  config_tree.overlay(run, command_line, "command line")
  if engine.is_sweep(run):
    raise ConfigError(
      f"setting '{setting.name}': a study's runs are single models; leave the sweep.* lists "
      "empty and give each model as a setting"
    )
  return run


def within_runs(
  config: ml_collections.ConfigDict,
  corpus: Corpus,
  settings: Sequence[Setting],
  command_line_keys: Iterable[str] = (),
) -> tuple[list[Run], tuple[str, ...]]:
  """The corpus's cross-validated runs, one per setting, and its classes as listed; raises
  one of RUN_ERRORS when the corpus cannot be used."""
  runs, classes = [], None
  for setting in settings:
    run = run_config(config, corpus, setting, command_line_keys)
    listed = run_data.load_corpus(run)
    classes = classes or tuple(listed.class_names)
    if run.cv.scheme == "speaker":
      speakers = sorted({u.speaker for u in listed.utterances})
      if len(speakers) < 2:
        raise FoldError(
          f"cv.scheme='speaker' needs speaker ids, but corpus '{corpus.name}' has "
          f"{len(speakers)} speaker ({', '.join(speakers)}); give its manifest a speaker "
          "column, or use cv.scheme=stratified"
        )
      if len(speakers) < run.cv.n_folds:
        logging.info(
          "Corpus %s has %d speakers: as many speaker-independent folds (cv.n_folds=%d)",
          corpus.name,
          len(speakers),
          run.cv.n_folds,
        )
        run.cv.n_folds = len(speakers)
    validate_config(run)
    runs.append(Run(within_path(corpus.name, setting.name), setting.name, run))
  return runs, classes


def cross_run(
  config: ml_collections.ConfigDict,
  train: Corpus,
  test: Corpus,
  setting: Setting,
  test_classes: Sequence[str],
  command_line_keys: Iterable[str] = (),
) -> Run:
  """`setting` trained on every kept utterance of `train` and tested on `test`, on the
  classes both have (data.class_shares restricted to them)."""
  run = run_config(config, train, setting, command_line_keys)
  train_classes = run_data.load_corpus(run).class_names
  shared = [name for name in train_classes if name in test_classes]
  if len(shared) < 2:
    raise ConfigError(
      f"corpora '{train.name}' and '{test.name}' share {len(shared)} class(es) "
      f"({', '.join(shared) or 'none'}); a run across them needs at least two"
    )
  if run.data.class_shares:
    shares = dict(zip(train_classes, run.data.class_shares, strict=True))
    run.data.class_shares = tuple(shares[name] for name in shared)
  run.data.classes = tuple(shared)
  run.data.test_corpus = test.reader
  run.data.test_root = test.root
  run.cv.folds = ()
  validate_config(run)
  return Run(cross_path(train.name, test.name, setting.name), setting.name, run)


def within_path(corpus: str, setting: str) -> str:
  """A run's folder in the study's workdir: a setting cross-validated on one corpus."""
  return f"{corpus}/{setting}"


def cross_path(train: str, test: str, setting: str) -> str:
  """A run's folder in the study's workdir: a setting trained on one corpus, tested on another."""
  return f"{train}-to-{test}/{setting}"


def crosses(corpus: Corpus) -> bool:
  """Whether the corpus takes part in runs across corpora: EmoBox's do not yet (a run's
  data.test_corpus does not take them)."""
  return corpus.reader != "emobox"


def cross_pairs(study_corpora: Sequence[Corpus]) -> list[tuple[Corpus, Corpus]]:
  """(train, test) for every ordered pair of the corpora that cross."""
  across = [c for c in study_corpora if crosses(c)]
  return [(train, test) for train in across for test in across if train.name != test.name]


def run_paths(study_corpora: Sequence[Corpus], settings: Sequence[Setting], cross: bool):
  """Every run of the study in the order it runs them: `<corpus>/<setting>` for each corpus
  and setting, then `<train>-to-<test>/<setting>` for each setting and pair of corpora
  (cross_pairs). Task i of a SLURM array (`--task_index`) is the i-th."""
  paths = [within_path(c.name, s.name) for c in study_corpora for s in settings]
  if cross:
    pairs = cross_pairs(study_corpora)
    paths += [cross_path(train.name, test.name, s.name) for s in settings for train, test in pairs]
  return paths


# Rerunning ---------------------------------------------------------------------------------------


def check_same_study(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses a study config that would mix results with what `workdir` holds: a changed
  ordinary key or base, or a corpus or setting whose name now means something else."""
  path = workdir / "config.json"
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    previous = json.loads(path.read_text())
    changed = config_tree.diff(
      previous, current, (*experiment.RESULT_NEUTRAL_KEYS, *_STUDY_NEUTRAL_KEYS)
    )
    for kind, entries in (("corpora", _corpus_entries), ("settings", _setting_entries)):
      before, now = entries(previous["study"][kind]), entries(current["study"][kind])
      changed += [
        f"study.{kind}[{n}]" for n in sorted(before.keys() & now.keys()) if before[n] != now[n]
      ]
    if changed:
      raise experiment.ConfigMismatchError(
        f"study workdir {workdir} holds a study with a different config (changed: "
        f"{', '.join(changed)}); use another --workdir, or --fresh to discard it"
      )
  io_utils.atomic_write_json(path, current)


def _corpus_entries(texts: Sequence[str]) -> dict[str, str]:
  """{name: definition} of study.corpora's entries, as written."""
  return {text.partition("=")[0].strip(): text.strip() for text in texts}


def _setting_entries(settings: Mapping | Sequence[str]) -> dict[str, dict]:
  """{name: dotted overrides} of study.settings as config.json holds it (or, from a study
  written before settings were groups, as 'NAME:key=value,...' entries)."""
  if isinstance(settings, Mapping):
    return {name: config_tree.flatten(group) for name, group in settings.items()}
  return dict(parse_setting(text) for text in settings)


def check_finished_run(run: Run, run_dir: pathlib.Path) -> None:
  """A finished run is read only if its config.json is the run's config (as `main` checks)."""
  experiment.check_same_config(
    run.config, run_dir, "use another --workdir, or --fresh to discard the study"
  )
