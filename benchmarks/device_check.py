"""The device check of issues 28 and 29: ser_jax against PyTorch on one GPU, in 8 minutes.

Started by benchmarks/device_check.sh (its header says how to call it through the device
tool). EmoDB-4 (neutral, happiness, sadness, anger: 339 clips of 2 s) with
configs/mfcc_focal.py's protocol, stratified 5 folds x 40 epochs at batch 32. Sections,
in order, each under its own time limit (and all within DEVICE_CHECK_TOTAL_S), each
writing one file under $OUT:

  1_side_by_side.log  side_by_side.py: ser_jax's first run (empty feature and compilation
                      caches) and second (warm) against PyTorch eager; then the two ser_jax
                      runs (same seed) compared fold by fold
  2_bare_step.log     bench_steps.py at the run's input shape: training inside the run
                      against the bare train step (target: at least 90 %)
  3_kill_resume.log   fold 0 killed with SIGKILL after a checkpoint, then resumed: its
                      metrics against the uninterrupted first run's fold 0
  4_folds.log         the five folds as five processes at once against one at a time
  5_sweep.log         configs/gamma_sweep.py's 18 members on fold 0, trained together,
                      against one member at a time (the single run's fold 0, times 18)
  6_table4.log        bench_table4.py on 2,280 synthetic clips (4 configs at once); only
                      when named in DEVICE_CHECK_SECTIONS: it takes about 5 minutes alone
  summary.json        every section's figures, status and seconds

Environment: DEVICE_CHECK_SECTIONS (comma-separated: side_by_side, bare_step,
kill_resume, folds, sweep, table4), DEVICE_CHECK_TOTAL_S (default 450),
DEVICE_CHECK_DATA (default .device_data/emodb), DEVICE_CHECK_WORK (default
/tmp/device_check), DEVICE_CHECK_SET (extra key=value overrides, space-separated, for
every run), DEVICE_CHECK_TINY=1 (a CPU try of the whole script in a few minutes: 3 epochs,
width 8, the XLA lowering, two folds at once).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import common
import numpy as np

from ser_jax import layout, run_results

REPO = pathlib.Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TINY = os.environ.get("DEVICE_CHECK_TINY") == "1"
OUT = pathlib.Path(os.environ.get("OUT") or "/tmp/device_check_out")
WORK = pathlib.Path(os.environ.get("DEVICE_CHECK_WORK", "/tmp/device_check"))
DATA = pathlib.Path(os.environ.get("DEVICE_CHECK_DATA", REPO / ".device_data" / "emodb"))
SBS = WORK / "sbs"  # side_by_side.py's folder: its caches serve every later section.
DEFAULT_SECTIONS = "side_by_side,bare_step,kill_resume,folds,sweep"
# Seconds each section may take at most; each also stops at the overall deadline.
LIMITS = {
  "side_by_side": 290,
  "bare_step": 90,
  "kill_resume": 70,
  "folds": 60,
  "sweep": 110,
  "table4": 420,
}
TINY_SET = (
  "train.num_epochs=3 model.width=8 train.checkpoint_every_epochs=1 model.lowering=xla".split()
)


def overrides() -> list[str]:
  """key=value overrides of every ser_jax and PyTorch run in this check."""
  items = [
    "data.corpus=emodb",
    f"data.root={DATA.resolve()}",
    f"data.cache_dir={SBS / 'cache'}",
    "features.max_seconds=2.0",  # Every EmoDB file here lasts 2.0 s.
  ]
  items += TINY_SET if TINY else ["data.num_workers=16"]
  return items + os.environ.get("DEVICE_CHECK_SET", "").split()


def warm_env(**extra: str) -> dict:
  """The environment of runs after the first: side_by_side's caches, warm."""
  return dict(os.environ) | {
    "JAX_COMPILATION_CACHE_DIR": str(SBS / "xla"),
    "SER_JAX_CACHE": str(SBS / "home"),
    "PYTHONUNBUFFERED": "1",
    **extra,
  }


def ser_jax_command(workdir: pathlib.Path, *more: str, config: str = "mfcc_focal.py") -> list:
  command = [PYTHON, "-m", "ser_jax.main", f"--config={REPO / 'configs' / config}"]
  return command + [f"--workdir={workdir}", *[f"--config.{o}" for o in [*overrides(), *more]]]


class Section:
  """A section's log file, its deadline and its figures."""

  def __init__(self, index: int, name: str, deadline: float):
    self.name, self.deadline = name, deadline
    self.log_path = OUT / f"{index}_{name}.log"
    self.log_path.write_text("")
    self.figures: dict = {}

  def left(self) -> float:
    return self.deadline - time.perf_counter()

  def say(self, text: str) -> None:
    print(f"[{self.name}] {text}", flush=True)
    with open(self.log_path, "a") as log:
      log.write(text + "\n")

  def run(self, command: list[str], env: dict | None = None, limit: float | None = None) -> str:
    """Runs a command to completion (or its limit), its output in the section's log."""
    limit = min(limit or self.left(), self.left())
    self.say(f"$ {' '.join(map(str, command))}")
    start = time.perf_counter()
    status = common.run_process(command, self.log_path, env or warm_env(), limit, cwd=REPO)
    self.say(f"-> {status} in {time.perf_counter() - start:.1f} s")
    return status


def read_results(workdir: pathlib.Path) -> run_results.RunResults | None:
  return run_results.read(workdir) if (workdir / layout.RESULTS).exists() else None


def read_records(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:  # A line cut short by a kill.
      pass
  return records


def read_predictions(workdir: pathlib.Path) -> dict:
  """{(fold, member, utt_id): (predicted, probabilities)} from predictions.csv."""
  rows = {}
  with open(workdir / "predictions.csv") as f:
    for row in csv.DictReader(f):
      probabilities = [float(v) for k, v in row.items() if k.startswith("p_")]
      rows[(int(row["fold"]), int(row["member"]), row["utt_id"])] = (
        row["predicted"],
        probabilities,
      )
  return rows


def compare_runs(a: pathlib.Path, b: pathlib.Path, folds=None) -> list[dict]:
  """Fold by fold: same confusion counts? predictions differing, largest probability gap."""
  results_a, results_b = read_results(a), read_results(b)
  if results_a is None or results_b is None:
    return []
  pred_a, pred_b = read_predictions(a), read_predictions(b)
  folds_b = {f.fold: f for f in results_b.members[0].folds}
  rows = []
  for fold_a in results_a.members[0].folds:
    k = fold_a.fold
    if k not in folds_b or (folds is not None and k not in folds):
      continue
    keys = [key for key in pred_a if key[0] == k and key in pred_b]
    gaps = [np.max(np.abs(np.subtract(pred_a[x][1], pred_b[x][1]))) for x in keys]
    rows.append(
      {
        "fold": k,
        "same_counts": fold_a.confusion_counts == folds_b[k].confusion_counts,
        "predictions_differing": sum(pred_a[x][0] != pred_b[x][0] for x in keys),
        "utterances": len(keys),
        "max_probability_gap": float(max(gaps, default=float("nan"))),
        "wa": (fold_a.wa, folds_b[k].wa),
        "ua": (fold_a.ua, folds_b[k].ua),
      }
    )
  return rows


def say_comparison(section: Section, label: str, rows: list[dict]) -> bool:
  for r in rows:
    section.say(
      f"{label} fold {r['fold']}: counts {'equal' if r['same_counts'] else 'DIFFER'}, "
      f"{r['predictions_differing']}/{r['utterances']} predictions differ, largest "
      f"probability gap {r['max_probability_gap']:.2e}; WA {r['wa'][0]:.2f} / {r['wa'][1]:.2f}, "
      f"UA {r['ua'][0]:.2f} / {r['ua'][1]:.2f}"
    )
  identical = bool(rows) and all(r["same_counts"] and r["max_probability_gap"] == 0 for r in rows)
  section.say(f"{label}: {'identical' if identical else 'NOT identical'} over {len(rows)} folds")
  return identical


def fold_train_seconds(workdir: pathlib.Path, fold: int) -> float:
  return sum(r["seconds"] for r in read_records(workdir) if r["fold"] == fold)


def side_by_side(s: Section) -> None:
  command = [PYTHON, str(REPO / "benchmarks" / "side_by_side.py"), f"--dir={SBS}"]
  command += ["--corpus=emodb", f"--root={DATA.resolve()}", "--torch-modes=eager"]
  command += ["--torch-runs=1", f"--timeout={0.62 * s.left():.0f}", f"--json={WORK / 'sbs.json'}"]
  command += [f"--set={o}" for o in overrides()[3:]]  # corpus, root and cache_dir: its own.
  s.run(command, env=dict(os.environ, PYTHONUNBUFFERED="1"))
  if (WORK / "sbs.json").exists():
    runs = {r["name"]: r for r in json.loads((WORK / "sbs.json").read_text())["runs"]}
    s.figures["runs"] = runs
    for name in ("ser_jax_1", "ser_jax_2", "torch_eager_1"):
      tail = pathlib.Path(runs[name]["log"]).read_text().splitlines()[-8:] if name in runs else []
      s.say(f"--- the end of {name}.log\n" + "\n".join(tail))
    torch_row = runs.get("torch_eager_1", {})
    for name in ("ser_jax_1", "ser_jax_2"):
      if name in runs and torch_row.get("status") == "ok" and runs[name]["status"] == "ok":
        s.figures[f"torch_wall_over_{name}_wall"] = (
          torch_row["wall_seconds"] / runs[name]["wall_seconds"]
        )
  rows = compare_runs(SBS / "ser_jax_1", SBS / "ser_jax_2")
  s.figures["same_seed"] = rows
  s.figures["same_seed_identical"] = say_comparison(s, "run 1 vs run 2 (same seed)", rows)


def store_shape() -> tuple[int, int]:
  """(n_bins, n_frames) of the feature store the first run used."""
  results = read_results(SBS / "ser_jax_1") or read_results(SBS / "ser_jax_2")
  features = np.load(pathlib.Path(results.feature_store) / "features.npy", mmap_mode="r")
  return features.shape[1], features.shape[2]


def bare_step(s: Section) -> None:
  n_bins, n_frames = store_shape()
  width = 8 if TINY else 64
  lowering = "xla" if TINY else "auto"
  reps, steps, warmup = (2, 2, 1) if TINY else (5, 20, 3)
  command = [PYTHON, str(REPO / "benchmarks" / "bench_steps.py"), "--kind=mfcc", "--batch=32"]
  command += [f"--n-frames={n_frames}", f"--width={width}", f"--lowering={lowering}"]
  command += ["--no-eval", f"--reps={reps}", f"--steps={steps}", f"--warmup={warmup}"]
  command += [f"--json={WORK / 'bare.json'}"]
  s.say(f"input [32, {n_bins}, {n_frames}, 1], width {width}")
  (WORK / "bare.json").unlink(missing_ok=True)
  s.run(command, env=warm_env(BENCH_QUIET_TIMEOUT="0.5"))
  if not (WORK / "bare.json").exists():
    return
  bare = json.loads((WORK / "bare.json").read_text())["results"][0]["samples_per_s"]
  s.figures["bare_samples_per_second"] = bare
  for name in ("ser_jax_1", "ser_jax_2"):
    records = read_records(SBS / name)
    if records:
      in_run = common.steady_samples_per_second(records, 32)
      share = in_run / bare
      s.figures[f"{name}_in_run_share"] = share
      verdict = "meets" if share >= 0.9 else "BELOW"
      s.say(
        f"{name}: {in_run:.0f} samples/s in the run (epochs 2+) = {100 * share:.0f} % of the "
        f"bare step's {bare:.0f}: {verdict} the 90 % target"
      )


def kill_resume(s: Section) -> None:
  workdir = WORK / "kill"
  subprocess.run(["rm", "-rf", str(workdir)], check=True)
  every = 1 if TINY else 5
  epochs = 3 if TINY else 40
  target = min(every + 2, epochs - 1)  # A checkpoint has been written (or is being).
  command = ser_jax_command(workdir, "cv.folds=(0,)")
  s.say(f"$ {' '.join(command)}  (killed once metrics.jsonl reaches epoch {target})")
  with open(s.log_path, "a") as log:
    process = subprocess.Popen(
      command, cwd=REPO, env=warm_env(), stdout=log, stderr=subprocess.STDOUT
    )
    killed_at = None
    while process.poll() is None and s.left() > 0:
      epochs_seen = [r["epoch"] for r in read_records(workdir)]
      if epochs_seen and max(epochs_seen) >= target:
        process.send_signal(signal.SIGKILL)
        killed_at = max(epochs_seen)
        break
      time.sleep(0.02)
    if process.poll() is None and killed_at is None:
      process.kill()
    process.wait()
  s.say(f"SIGKILL after epoch {killed_at} of fold 0" if killed_at else "the kill missed")
  s.figures["killed_after_epoch"] = killed_at
  before = (workdir / "metrics.jsonl").read_text() if killed_at else ""
  s.run(command)
  resumed = [line for line in s.log_path.read_text().splitlines() if "resuming from" in line]
  s.say("resume line: " + (resumed[-1] if resumed else "none (started over)"))
  s.figures["resumed"] = bool(resumed)
  s.figures["records_before_kill"] = len(before.splitlines())
  rows = compare_runs(SBS / "ser_jax_1", workdir, folds=[0])
  s.figures["against_uninterrupted"] = rows
  s.figures["identical"] = say_comparison(s, "uninterrupted vs killed and resumed", rows)


def folds_at_once(s: Section) -> None:
  folds = [0, 1] if TINY else [0, 1, 2, 3, 4]
  env = warm_env(XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / len(folds):.2f}")
  processes = {}
  start = time.perf_counter()
  logs = {k: open(WORK / f"fold_{k}.log", "w") for k in folds}
  for k in folds:
    subprocess.run(["rm", "-rf", str(WORK / f"fold_{k}")], check=True)
    command = ser_jax_command(WORK / f"fold_{k}", f"cv.folds=({k},)")
    processes[k] = subprocess.Popen(
      command, cwd=REPO, env=env, stdout=logs[k], stderr=subprocess.STDOUT
    )
  s.say(f"{len(folds)} processes, one fold each, at once: {command[3:]} ...")
  while any(p.poll() is None for p in processes.values()) and s.left() > 0:
    time.sleep(0.2)
  for p in processes.values():
    if p.poll() is None:
      p.kill()
    p.wait()
  wall = time.perf_counter() - start
  for k in folds:
    logs[k].close()
    s.say(f"--- fold {k} (exit {processes[k].returncode}):")
    s.say("\n".join((WORK / f"fold_{k}.log").read_text().splitlines()[-4:]))
  ok = all(p.returncode == 0 for p in processes.values())
  s.figures |= {"folds": folds, "wall_seconds": wall, "ok": ok}
  sbs = json.loads((WORK / "sbs.json").read_text()) if (WORK / "sbs.json").exists() else {}
  warm = next((r for r in sbs.get("runs", []) if r["name"] == "ser_jax_2"), None)
  if warm and warm["status"] == "ok":
    s.figures["one_process_wall_seconds"] = warm["wall_seconds"]
    s.say(
      f"{len(folds)} folds at once, a process each: {wall:.1f} s wall; all five one at a time "
      f"in one process (side_by_side's warm run): {warm['wall_seconds']:.1f} s"
    )
  rows = []
  for k in folds:
    rows += compare_runs(SBS / "ser_jax_1", WORK / f"fold_{k}", folds=[k])
  s.figures["identical"] = say_comparison(s, "one run vs a process per fold", rows)


def sweep(s: Section) -> None:
  workdir = WORK / "sweep"
  subprocess.run(["rm", "-rf", str(workdir)], check=True)
  s.run(ser_jax_command(workdir, "cv.folds=(0,)", config="gamma_sweep.py:emodb"))
  records = read_records(workdir)
  steady = [r for r in records if r["epoch"] > 1]
  if not steady:
    return
  # Each record is one chunk's epoch, with a loss per member; a cut-short run still counts.
  member_samples = sum(r["step"] // r["epoch"] * 32 * len(r["train_loss"]) for r in steady)
  rate = member_samples / sum(r["seconds"] for r in steady)
  sizes = {r["first_member"]: len(r["train_loss"]) for r in records}
  members, chunks = sum(sizes.values()), len(sizes)
  s.figures["finished"] = read_results(workdir) is not None
  single = read_records(SBS / "ser_jax_2")
  single_rate = common.steady_samples_per_second([r for r in single if r["fold"] == 0], 32)
  train = sum(r["seconds"] for r in records)
  single_train = fold_train_seconds(SBS / "ser_jax_2", 0)
  s.figures |= {
    "members": members,
    "chunks": chunks,
    "member_samples_per_second": rate,
    "single_samples_per_second": single_rate,
    "train_seconds": train,
    "one_at_a_time_train_seconds": members * single_train,
  }
  s.say(
    f"{members} members in {chunks} chunk(s), fold 0: {rate:.0f} member-samples/s (epochs 2+), "
    f"training {train:.1f} s; one at a time: {single_rate:.0f} samples/s, {members} x "
    f"{single_train:.1f} s = {members * single_train:.1f} s (ser_jax_2's fold 0); speed-up "
    f"{rate / single_rate:.2f}x in samples/s"
    + (f", {members * single_train / train:.2f}x in training time" if s.figures["finished"] else "")
    + ("" if s.figures["finished"] else " (cut short: figures from the epochs it ran)")
  )


def table4(s: Section) -> None:
  command = [PYTHON, str(REPO / "benchmarks" / "bench_table4.py"), f"--dir={WORK / 't4'}"]
  if TINY:
    command += ["--utterances=80", "--parallel=2", "--set=model.lowering=xla"]
    command += ["--set=train.num_epochs=1", "--set=model.width=8"]
  else:
    command += ["--parallel=4", "--set=data.num_workers=16"]
  start = time.perf_counter()
  status = s.run(command, env=dict(os.environ, PYTHONUNBUFFERED="1"))
  s.figures |= {"status": status, "wall_seconds": time.perf_counter() - start}


SECTIONS = {
  "side_by_side": side_by_side,
  "bare_step": bare_step,
  "kill_resume": kill_resume,
  "folds": folds_at_once,
  "sweep": sweep,
  "table4": table4,
}


def main() -> None:
  start = time.perf_counter()
  total = float(os.environ.get("DEVICE_CHECK_TOTAL_S", 1500 if TINY else 450))
  names = os.environ.get("DEVICE_CHECK_SECTIONS", DEFAULT_SECTIONS).split(",")
  unknown = set(names) - set(SECTIONS)
  if unknown:
    raise SystemExit(f"unknown sections {sorted(unknown)}; expected some of: {', '.join(SECTIONS)}")
  OUT.mkdir(parents=True, exist_ok=True)
  WORK.mkdir(parents=True, exist_ok=True)
  summary = {"tiny": TINY, "overrides": overrides(), "python": sys.version, "sections": {}}
  print(f"device check: {names}, {total:.0f} s in all, figures in {OUT}", flush=True)
  for name in names:
    index = list(SECTIONS).index(name) + 1
    left = total - (time.perf_counter() - start)
    if left < 20:
      summary["sections"][name] = {"status": f"skipped: {left:.0f} s left"}
      print(f"[{name}] skipped: {left:.0f} s left", flush=True)
      continue
    limit = LIMITS[name] * (4 if TINY else 1)
    section = Section(index, name, time.perf_counter() + min(limit, left))
    began = time.perf_counter()
    try:
      SECTIONS[name](section)
      status = "done"
    except Exception as error:  # One broken section must not cost the others.
      status = f"failed: {type(error).__name__}: {error}"
      section.say(status)
    section.figures |= {"status": status, "seconds": time.perf_counter() - began}
    summary["sections"][name] = section.figures
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
  print(f"device check done in {time.perf_counter() - start:.0f} s", flush=True)
  print(json.dumps(brief(summary), indent=1, default=str))


def brief(summary: dict) -> dict:
  """The figures that answer the issues, for the end of the output."""
  out = {}
  for name, figures in summary["sections"].items():
    if name == "side_by_side":
      runs = figures.get("runs", {})
      out[name] = {
        n: {k: r.get(k) for k in ("wall_seconds", "steady_samples_per_second", "status")}
        | {"wa": r.get("wa"), "ua": r.get("ua")}
        for n, r in runs.items()
      }
      out[name] |= {k: v for k, v in figures.items() if k not in ("runs", "same_seed")}
    else:
      out[name] = {
        k: v
        for k, v in figures.items()
        if k not in ("against_uninterrupted", "records_before_kill")
      }
  return out


if __name__ == "__main__":
  main()
