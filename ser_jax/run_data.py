"""A run's data: its corpus, its feature store, the utterances it uses and its folds.

Folds are made from a `Listing`: the corpus's before its features are extracted (so the
programs can compile meanwhile), then the store's, which differs only by skipped files.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import pathlib

import ml_collections
import numpy as np

from ser_jax import input_pipeline
from ser_jax.audio import AudioError
from ser_jax.cache import default_cache_dir
from ser_jax.data import corpora, demo, shares
from ser_jax.data.corpus import Corpus, CorpusError
from ser_jax.features import FeatureParams
from ser_jax.folds import (
  FoldError,
  GivenFold,
  check_stratifiable,
  make_folds,
  partition_line,
  session_roles,
)
from ser_jax.folds import given_folds as make_given_folds
from ser_jax.store import FeatureStore, build_store, open_store


def load_corpus(config: ml_collections.ConfigDict) -> Corpus:
  """The config's corpus listing (the demo corpus written first if it is the default one)."""
  root = config.data.root
  if config.data.corpus == "demo" and not (root and demo.is_demo_corpus(root)):
    # The default demo corpus, written on first use; a data.root that already holds a
    # demo corpus (of any size, see write_demo_corpus) is read as it is.
    root = root or str(cache_dir(config) / "demo_corpus")
    demo.write_demo_corpus(root)
  corpus = corpora.read_corpus(
    config.data.corpus,
    root,
    tuple(config.data.classes),
    include_scripted=config.data.include_scripted,
    merge_excited=config.data.merge_excited,
    audio_root=config.data.audio_root,
    case_insensitive_paths=config.data.case_insensitive_paths,
  )
  if corpus.skipped:
    first = corpus.skipped[0]
    logging.warning(
      "%d file(s) of the %s listing skipped (the feature store's skipped.csv lists them), "
      "e.g. %s: %s",
      len(corpus.skipped),
      corpus.name,
      first.path,
      first.reason,
    )
  if len(corpus.class_names) < 2:
    raise CorpusError(
      f"{corpus.name} at '{root}' has one class, {corpus.class_names[0]!r}; a classifier "
      "needs two or more"
    )
  return corpus


def check_fold_sizes(corpus, config: ml_collections.ConfigDict) -> None:
  """Fails before feature extraction when a class is too small for stratified folds."""
  if config.cv.scheme != "stratified" or config.data.test_corpus:
    return
  check_stratifiable(corpus.class_counts(), config.cv.n_folds)


def prepare_store(
  config: ml_collections.ConfigDict, progress: bool | None = None, corpus: Corpus | None = None
):
  """Builds (or reuses) the feature store of `corpus` (default: the config's, read and
  checked here); returns the opened store."""
  if corpus is None:
    corpus = load_corpus(config)
    check_fold_sizes(corpus, config)
  path = build_store(
    corpus,
    FeatureParams.from_config(config.features),
    cache_dir(config),
    num_workers=config.data.num_workers,
    strict=config.data.strict,
    progress=progress,
  )
  store = open_store(path)
  skipped = skipped_files(store)
  if config.data.strict and skipped:
    # A store built earlier without strict may hold skips; strict still refuses them.
    first = skipped[0]
    raise AudioError(
      f"{first['path']}: {first['reason']} ({len(skipped)} bad files in all; listed in "
      f"{store.path / 'skipped.csv'}; data.strict=False skips them)"
    )
  return store


def config_for_test_corpus(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of data.test_corpus: the run's classes and features on its corpus."""
  copied = config.copy_and_resolve_references()
  copied.data.corpus, copied.data.root = config.data.test_corpus, config.data.test_root
  return copied


def log_store(store: FeatureStore) -> None:
  """Logs the store's size and classes, and each file it skipped."""
  logging.info(
    "Feature store %s: %d clips, classes %s", store.path, len(store), store.meta["class_names"]
  )
  for skipped in skipped_files(store):
    logging.warning("Skipped %s: %s", skipped["path"], skipped["reason"])
  if store.meta["n_skipped"]:
    logging.warning(
      "%d files skipped; listed in %s", store.meta["n_skipped"], store.path / "skipped.csv"
    )


def skipped_files(store: FeatureStore) -> list[dict[str, str]]:
  """The store's skipped.csv rows: path, reason."""
  path = store.path / "skipped.csv"
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def class_counts(store: FeatureStore, indices: np.ndarray) -> dict[str, int]:
  """{class name: count} of the utterances at `indices`."""
  counts = shares.class_counts(store.labels[indices], len(store.class_names))
  return dict(zip(store.class_names, counts.tolist(), strict=True))


def cache_dir(config) -> pathlib.Path:
  """data.cache_dir, or the default cache folder."""
  return (
    pathlib.Path(config.data.cache_dir).expanduser()
    if config.data.cache_dir
    else default_cache_dir()
  )


def padded_rows(store: FeatureStore, n_rows: int) -> dict:
  """The store's rows (input_pipeline.load_rows), padded with zeros to the corpus's
  `n_rows` (skipped files leave rows that no index reaches)."""
  rows = input_pipeline.load_rows(store)
  return {
    name: np.concatenate([x, np.zeros((n_rows - len(x), *x.shape[1:]), x.dtype)])
    for name, x in rows.items()
  }


def rows_bytes(store: FeatureStore) -> int:
  """Bytes of the store's features as float32."""
  return int(np.prod(store.features.shape)) * 4


@dataclasses.dataclass(frozen=True)
class Listing:
  """What folds are made from, per utterance: a feature store's, or a corpus's before its
  features are extracted (the same, unless files are skipped)."""

  corpus: str
  labels: np.ndarray  # [N] class indices
  speakers: np.ndarray  # [N]
  groups: np.ndarray  # [N]
  class_names: tuple[str, ...]
  fold_names: tuple[str, ...] = ()  # The corpus's own folds, if it has any.
  fold_roles: np.ndarray | None = None  # [N, len(fold_names)] 'train', 'test', 'valid' or ''.

  @classmethod
  def of_corpus(cls, corpus: Corpus) -> Listing:
    return cls(
      corpus.name,
      np.asarray(corpus.label_indices()),
      np.array([u.speaker for u in corpus.utterances]),
      np.array([u.group for u in corpus.utterances]),
      corpus.class_names,
      corpus.fold_names,
      np.array([u.splits for u in corpus.utterances], dtype=object).reshape(
        len(corpus.utterances), len(corpus.fold_names)
      ),
    )

  @classmethod
  def of_store(cls, store: FeatureStore) -> Listing:
    return cls(
      store.corpus,
      store.labels,
      store.speakers,
      store.groups,
      store.class_names,
      store.fold_names,
      store.fold_roles,
    )

  def __len__(self) -> int:
    return len(self.labels)


def utterances(config: ml_collections.ConfigDict, listing) -> np.ndarray:
  """Indices of the utterances the run uses: all, or the data.class_shares subset.

  listing: a Listing, or a FeatureStore.
  """
  if not config.data.class_shares:
    return np.arange(len(listing))
  return shares.subset_to_shares(
    listing.labels,
    listing.speakers,
    tuple(config.data.class_shares),
    config.data.class_shares_seed,
    listing.class_names,
  )


def given_roles(listing) -> tuple[np.ndarray, tuple[str, ...]]:
  """(roles [N, n_folds], fold names) of the corpus's own folds: its fold files or manifest
  column, or IEMOCAP's sessions; no folds for other corpora.

  listing: a Listing, or a FeatureStore.
  """
  if listing.fold_names:
    return listing.fold_roles, listing.fold_names
  if listing.corpus == "iemocap":
    return session_roles(listing.groups)
  return np.zeros((len(listing), 0), object), ()


def given_folds(listing, kept: np.ndarray) -> list[GivenFold]:
  """The corpus's own folds over the kept utterances, in listing indices."""
  roles, names = given_roles(listing)
  folds = make_given_folds(roles[kept], names, listing.corpus)
  return [GivenFold(f.name, kept[f.train], kept[f.test], kept[f.valid]) for f in folds]


def cross_validation_folds(config, listing, kept: np.ndarray):
  """(train, test) indices per fold, made over the kept utterances only.

  listing: a Listing, or a FeatureStore.
  """
  if config.cv.scheme == "given":
    folds = given_folds(listing, kept)
    partition, line = partition_line(given_roles(listing)[0][kept], listing.corpus)
    logging.log(logging.INFO if partition else logging.WARNING, "%s", line)
    beyond = [k for k in config.cv.folds if k >= len(folds)]
    if beyond:
      raise FoldError(
        f"cv.folds contains {beyond[0]}; {listing.corpus} has {len(folds)} given folds, "
        f"0..{len(folds) - 1} ({', '.join(f.name for f in folds)})"
      )
    return [(f.train, f.test) for f in folds]
  folds = make_folds(
    listing.labels[kept],
    listing.speakers[kept],
    listing.groups[kept],
    scheme=config.cv.scheme,
    n_folds=config.cv.n_folds,
    seed=config.seed,
    class_names=listing.class_names,
  )
  return [(kept[train_idx], kept[test_idx]) for train_idx, test_idx in folds]


def run_folds(config, listing, test_size: int | None = None):
  """(kept utterances, [(train, test) indices] per fold): cross-validation folds, or with
  a test corpus of `test_size` utterances one fold of every kept utterance against it."""
  kept = utterances(config, listing)
  if test_size is not None:
    return kept, [(kept, np.arange(test_size))]
  return kept, cross_validation_folds(config, listing, kept)


def trained_folds(config: ml_collections.ConfigDict, folds) -> list[int]:
  """The folds this run trains: cv.folds, or all."""
  return list(config.cv.folds) or list(range(len(folds)))
