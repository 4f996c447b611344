#!/usr/bin/env bash
# Freshet's trainer against the PyTorch CPU peer (benches/peer/), side by side in one run on
# the same generated rows: samples/s (training only) and test AUC for each, and ratios.
#
#   benches/peer.sh [TRAIN_ROWS] [TEST_ROWS] [MODELS]
#   benches/peer.sh 500000 100000 "wdl deepfm"
#
# Each trainer runs REPEATS times per model (default 2), alternating which goes first; the
# speed ratio is of the mean rates, and each run's rate is printed too.
#
# The peer's setup.sh makes its virtualenv under target/tools/ the first time (a few minutes
# and about 5.4 GB; see benches/peer/README.md). Set PEER_DIR to use a peer elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-500000}
test_rows=${2:-100000}
models=${3:-"wdl deepfm"}
peer_dir=${PEER_DIR:-benches/peer}
threads=${THREADS:-2}
# Runs of each trainer per model, alternated (see below).
repeats=${REPEATS:-2}
batch=${BATCH:-512}
# The peer allocates and initialises its whole embedding table (26 x 2^20 rows) before its
# clock starts. Freshet's tables grow as ids arrive; --reserve-rows gives them room up front
# likewise: 6 rows per training row, above the ~4.5 distinct ids per row that `freshet gen`'s
# defaults give at 300k rows (fewer per row as the data grows). RESERVE_ROWS=0 turns it off.
reserve=${RESERVE_ROWS:-$((rows * 6))}

py=$("$peer_dir/setup.sh")
cargo build --release --quiet
bin=target/release/freshet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "generating $rows training and $test_rows test rows" >&2
$bin gen --rows "$rows" --seed 1 --out "$work/train.tsv" >/dev/null
$bin gen --rows "$test_rows" --seed 2 --out "$work/test.tsv" >/dev/null

run_freshet() {
  echo "== $model: freshet (run $rep of $repeats)" >&2
  $bin --data-dir "$work/fd" train --data "$work/train.tsv" --test "$work/test.tsv" \
    --model "$model" --batch "$batch" --threads "$threads" --reserve-rows "$reserve" \
    >>"$work/$model.freshet"
}
run_peer() {
  echo "== $model: pytorch peer (run $rep of $repeats)" >&2
  "$py" "$peer_dir/peer.py" --model "$model" --format criteo --data "$work/train.tsv" \
    --test "$work/test.tsv" --batch "$batch" --threads "$threads" | tail -1 >>"$work/$model.peer"
}

for model in $models; do
  # A shared machine's speed can drift by a third within minutes, so one run of each, one
  # after the other, can credit the drift to either side. The runs alternate in ABBA order
  # (the first pair Freshet first, the next peer first, ...), which cancels a steady drift,
  # and the ratio is of the mean rates.
  for rep in $(seq 1 "$repeats"); do
    if (( rep % 2 == 1 )); then run_freshet; run_peer; else run_peer; run_freshet; fi
  done
  python3 - "$model" "$work/$model.freshet" "$work/$model.peer" <<'PY'
import json, sys
model = sys.argv[1]
f = [json.loads(line) for line in open(sys.argv[2]) if line.startswith("{")]
p = [json.loads(line) for line in open(sys.argv[3]) if line.startswith("{")]
fr = [r["samples_per_sec"] for r in f]
pr = [r["samples_per_sec"] for r in p]
mean = lambda xs: sum(xs) / len(xs)
print(json.dumps({
    "model": model,
    "freshet_samples_per_sec": round(mean(fr), 1),
    "peer_samples_per_sec": round(mean(pr), 1),
    "speed_ratio": round(mean(fr) / mean(pr), 3),
    "freshet_runs": [round(x, 1) for x in fr],
    "peer_runs": [round(x, 1) for x in pr],
    "pair_ratios": [round(a / b, 3) for a, b in zip(fr, pr)],
    "freshet_test_auc": round(f[0]["test_auc"], 4),
    "peer_test_auc": round(p[0]["test_auc"], 4),
    "auc_delta": round(f[0]["test_auc"] - p[0]["test_auc"], 4),
    "oracle_auc": f[0].get("oracle_auc"),
}))
PY
done
