#!/usr/bin/env bash
# Freshet's trainer against the PyTorch CPU peer (../shared/peers/pytorch), side by side in one
# run on the same generated rows: samples/s (training only) and test AUC for each, and ratios.
#
#   benches/peer.sh [TRAIN_ROWS] [TEST_ROWS] [MODELS]
#   benches/peer.sh 500000 100000 "wdl deepfm"
#
# Needs the peer's virtualenv: PEER=../shared/peers/pytorch; PY=$($PEER/setup.sh) (about a
# minute and 5.4 GB the first time). Set PEER_DIR to point elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-500000}
test_rows=${2:-100000}
models=${3:-"wdl deepfm"}
peer_dir=${PEER_DIR:-../shared/peers/pytorch}
threads=${THREADS:-2}
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

for model in $models; do
  echo "== $model: freshet" >&2
  f=$($bin --data-dir "$work/fd" train --data "$work/train.tsv" --test "$work/test.tsv" \
        --model "$model" --batch "$batch" --threads "$threads" --reserve-rows "$reserve")
  echo "== $model: pytorch peer" >&2
  p=$("$py" "$peer_dir/peer.py" --model "$model" --format criteo --data "$work/train.tsv" \
        --test "$work/test.tsv" --batch "$batch" --threads "$threads" | tail -1)
  python3 - "$model" "$f" "$p" <<'PY'
import json, sys
model, f, p = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(json.dumps({
    "model": model,
    "freshet_samples_per_sec": round(f["samples_per_sec"], 1),
    "peer_samples_per_sec": round(p["samples_per_sec"], 1),
    "speed_ratio": round(f["samples_per_sec"] / p["samples_per_sec"], 3),
    "freshet_test_auc": round(f["test_auc"], 4),
    "peer_test_auc": round(p["test_auc"], 4),
    "auc_delta": round(f["test_auc"] - p["test_auc"], 4),
    "oracle_auc": f.get("oracle_auc"),
}))
PY
done
