"""Wall time of the paper's Table 4 (four configs x 5 folds) on an IEMOCAP-sized corpus.

Writes a synthetic demo-format corpus (2,280 utterances in IEMOCAP's four-class shares,
10 speakers) unless --root names a real one, runs `python -m ser_jax.main` for each
config in turn, and prints each run's wall time (feature extraction included for the
first config of each input kind), WA and UA, the total, and ser_jax.report's table.

  python benchmarks/bench_table4.py --dir /tmp/table4                 # the whole table
  python benchmarks/bench_table4.py --dir /tmp/t4 --utterances 80 \\
    --set train.num_epochs=1 --set model.width=8                       # a quick check
  python benchmarks/bench_table4.py --dir /tmp/t4 --corpus iemocap --root /data/IEMOCAP_full_release
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

from ser_jax.data import demo

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ("mfcc_focal", "mfcc_softmax", "logmel_focal", "logmel_softmax")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", required=True, help="workdirs, feature cache and corpus go here")
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--corpus", default="demo", help="a corpus name; 'demo' is synthesised")
  parser.add_argument("--root", default="", help="the corpus folder (default: synthesise one)")
  parser.add_argument("--utterances", type=int, default=2280, help="size of the synthetic corpus")
  parser.add_argument("--set", action="append", default=[], help="config override key=value")
  args = parser.parse_args()
  out = pathlib.Path(args.dir).resolve()
  root = args.root
  if not root:
    start = time.perf_counter()
    root = str(demo.write_demo_corpus(out / "corpus", n_utterances=args.utterances, n_speakers=10))
    print(f"synthetic corpus: {args.utterances} utterances in {time.perf_counter() - start:.0f} s")
  overrides = [
    f"--config.data.corpus={args.corpus}",
    f"--config.data.root={root}",
    f"--config.data.cache_dir={out / 'cache'}",
    *[f"--config.{item}" for item in args.set],
  ]
  rows, workdirs = [], []
  for name in args.configs.split(","):
    workdir = out / name
    cmd = [sys.executable, "-m", "ser_jax.main", f"--config={REPO / 'configs' / f'{name}.py'}"]
    cmd += [f"--workdir={workdir}", "--fresh", *overrides]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.perf_counter() - start
    results = json.loads((workdir / "results.json").read_text())
    rows.append((name, wall, results["overall_accuracy"], results["class_accuracy"]))
    workdirs.append(str(workdir))
  print(f"\n{'config':16s} {'wall s':>8s} {'WA':>6s} {'UA':>6s}")
  for name, wall, wa, ua in rows:
    print(f"{name:16s} {wall:8.0f} {wa:6.2f} {ua:6.2f}")
  print(f"{'total':16s} {sum(row[1] for row in rows):8.0f}")
  subprocess.run([sys.executable, "-m", "ser_jax.report", *workdirs], check=True, cwd=REPO)


if __name__ == "__main__":
  main()
