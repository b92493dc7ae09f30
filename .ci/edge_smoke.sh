#!/usr/bin/env bash
# The edge box's commands, run by the `inspect` on PATH from a torch-free install (`pip install .`):
#   .ci/edge_smoke.sh LINE EXPORTED_BUNDLE WORKDIR
# LINE: an MVTec-layout folder (train/good, test/good, test/<defect>); EXPORTED_BUNDLE: a calibrated
# bundle with an OpenVINO export. Fails on any error, any traceback, or a torch import.
set -euo pipefail
LINE=$1 EXPORTED=$2 WORK=$3
mkdir -p "$WORK"
fail() { echo "edge smoke: $*" >&2; exit 1; }
PY=$(dirname "$(command -v inspect)")/python

"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
  || fail "torch is installed in the edge environment"

echo "-- info"
inspect info > "$WORK/info.txt" 2>&1 || { cat "$WORK/info.txt"; fail "info failed"; }
grep -q "OpenVINO CPU" "$WORK/info.txt" || fail "info does not name OpenVINO's CPU kernels"

echo "-- a usage error is one line and exit 2"
rc=0; inspect score --bogus > /dev/null 2> "$WORK/usage.txt" || rc=$?
[ "$rc" = 2 ] || fail "usage error exited $rc"
[ "$(wc -l < "$WORK/usage.txt")" = 1 ] || { cat "$WORK/usage.txt"; fail "usage error is not one line"; }

echo "-- cold start: calibrate --detector copod"
inspect calibrate --detector copod "$LINE/train/good" --out "$WORK/cold" --false-reject-rate 0.1

frames="$WORK/frames"
mkdir -p "$frames"
cp "$LINE"/test/good/*.png "$frames/"
for d in "$LINE"/test/*/; do
  [ "$(basename "$d")" = good ] || for f in "$d"*.png; do cp "$f" "$frames/$(basename "$d")_$(basename "$f")"; done
done
n=$(ls "$frames" | wc -l)

check_score() {  # bundle, extra args...
  local bundle=$1; shift
  inspect score "$bundle" "$frames" --json "$@" > "$WORK/score.jsonl" 2> "$WORK/score.err" \
    || { cat "$WORK/score.err"; fail "score on $bundle failed"; }
  "$PY" - "$WORK/score.jsonl" "$n" <<'EOF' || fail "score output on $bundle"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
assert len(rows) == int(sys.argv[2]), (len(rows), sys.argv[2])
assert all(r["label"] in ("ok", "ng") for r in rows), [r for r in rows if r["label"] == "error"][:2]
assert any(r["label"] == "ng" for r in rows)
EOF
}

check_watch() {  # bundle, results folder, extra args...
  local bundle=$1 out=$2; shift 2
  inspect watch "$frames" --model "$bundle" --out "$out" --once --quiet "$@" > "$WORK/watch.log" 2>&1 \
    || { cat "$WORK/watch.log"; fail "watch on $bundle failed"; }
  grep -q Traceback "$WORK/watch.log" && { cat "$WORK/watch.log"; fail "traceback in watch"; }
  rows=$(wc -l < "$out/results.jsonl")
  [ "$rows" = "$n" ] || fail "watch wrote $rows rows for $n frames"
}

echo "-- score and watch --once on the cold-start bundle"
check_score "$WORK/cold"
check_watch "$WORK/cold" "$WORK/results-cold"

echo "-- score and watch --once on the exported OpenVINO bundle"
check_score "$EXPORTED" --backend openvino
check_watch "$EXPORTED" "$WORK/results-openvino" --backend openvino
echo "edge smoke: ok ($n frames)"
