#!/usr/bin/env bash
# The BCT-criterion experiment (docs/EXPERIMENTS.md): one 2-step sequence per compatibility loss, all sharing
# the base run's phi_1, its gallery v1 and the splits, so that only phi_2's training differs between them.
#
#   scripts/bct_criterion.sh [OUT_DIR] ["loss lam" ...]     default: runs/bct_criterion, contrastive/ract/l2 at 1
#
# The base run is the config's own (bct, lambda 1): OUT_DIR/bct_1.0.
#
# Each variant is a normal run directory (OUT_DIR/<loss>_<lam>/results.json, report with `bict-ray report`);
# rerunning skips what is finished. Prints the step-2 table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bct_criterion}
shift || true
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=("contrastive 1.0" "ract 1.0" "l2 1.0")
bict=${BICT_RAY:-.venv/bin/bict-ray}
config=configs/bct_criterion.yaml

base="$out/bct_1.0"
"$bict" sequence -c "$config" --out "$base"
for variant in "${variants[@]}"; do
  read -r loss lam <<<"$variant"
  run="$out/${loss}_${lam}"
  [ "$run" != "$base" ] || continue
  if [ ! -e "$run/models/phi_1" ]; then
    mkdir -p "$run/models" "$run/gallery"
    cp -r "$base/splits" "$run/"
    cp -r "$base/models/phi_1" "$run/models/"
    cp -r "$base/gallery/v1" "$run/gallery/"
  fi
  "$bict" sequence -c "$config" --out "$run" --set "compat.loss=$loss" --set "compat.lam=$lam"
done
.venv/bin/python - "$out" <<'PY'
import json, sys
from pathlib import Path
print(f"{'run':<18} {'old_self':>8} {'new_self':>8} {'bwd_prev':>8} {'forward':>8}  criterion (bwd_prev > old_self)")
for results in sorted(Path(sys.argv[1]).glob("*/results.json")):
    tests = json.loads(results.read_text())["steps"][-1]["tests"]
    m = {k: 100 * v["mAP"] for k, v in tests.items()}
    print(f"{results.parent.name:<18} {m['old_self']:8.1f} {m['new_self']:8.1f} {m['backward_prev']:8.1f} "
          f"{m['forward']:8.1f}  {'met' if m['backward_prev'] > m['old_self'] else 'not met'}")
PY
