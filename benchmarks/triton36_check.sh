#!/usr/bin/env bash
# The Triton kernels under triton 3.6 (the GPU image's) and 3.9 (this repo's venv), without a GPU:
#
#   1. the GPU compile check of every shipped kernel config for sm_80 and sm_90
#      (python -m transfuse.codegen.triton.compile_check: registers, spills, shared memory);
#   2. the kernel tests, tests/codegen/triton_target/, under each version's interpreter;
#   3. a summary of both in benchmarks/results/triton36-compat-<YYYY-MM-DD>.json.
#
# Triton 3.6 lives in its own venv (default /tmp/venv36, made when missing: torch 2.13 CPU,
# triton 3.6.0, numpy < 2.4 since 3.6's interpreter breaks with NumPy >= 2.4, pytest, this
# repo installed --no-deps). The GPU image pairs 3.6 with torch 2.11: the kernels do not
# depend on the torch version, but that pairing is not what runs here.
#
# usage: benchmarks/triton36_check.sh [--record] [--cold] [--jobs N]
#   --record  also refresh tests/data/triton_compile_record.json with both versions' results
#             (each --record run keeps the other version's still-current results)
#   --cold    recompile everything (default: reuse the content-addressed compile cache,
#             keyed by kernel source, spec, triton version and arch)
# env: VENV36 (the 3.6 venv), PY39 (the 3.9 python; default .venv/bin/python)
# Time on 2 shared cores: ~2 + ~4 min of compiles cold, ~1 + ~1 min of tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV36=${VENV36:-/tmp/venv36}
PY39=${PY39:-$ROOT/.venv/bin/python}
REC=()
COLD=()
JOBS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --record) REC=(--record tests/data/triton_compile_record.json) ;;
    --cold) COLD=(--no-cache) ;;
    --jobs) JOBS=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ ! -x "$VENV36/bin/python" ]; then
  python3.11 -m venv "$VENV36"
  "$VENV36/bin/pip" install -q torch==2.13.0 triton==3.6.0 "numpy<2.4" pytest
  "$VENV36/bin/pip" install -q --no-deps -e "$ROOT"
fi
PY36=$VENV36/bin/python

OUT=$(mktemp -d /tmp/triton36-check-XXXXXX)
export OPENBLAS_NUM_THREADS=1

for tag in 36 39; do
  py=$PY36; [ "$tag" = 39 ] && py=$PY39
  echo "== triton $("$py" -c 'import triton; print(triton.__version__)') ($py)"
  # 1. compile check (a GPU compiler process: TRITON_INTERPRET=0)
  start=$(date +%s)
  set +e
  TRITON_INTERPRET=0 "$py" -m transfuse.codegen.triton.compile_check --jobs "$JOBS" \
    "${COLD[@]}" "${REC[@]}" --json "$OUT/compile-$tag.json" > "$OUT/compile-$tag.txt" 2>&1
  echo $? > "$OUT/compile-$tag.rc"
  echo $(( $(date +%s) - start )) > "$OUT/compile-$tag.seconds"
  set -e
  grep -E '^[0-9]+ compiles|^recorded' "$OUT/compile-$tag.txt" || tail -5 "$OUT/compile-$tag.txt"
done
for tag in 36 39; do
  py=$PY36; [ "$tag" = 39 ] && py=$PY39
  # 2. the kernel tests under the interpreter (after both --record runs: the record test
  #    takes both versions' results from it)
  set +e
  "$py" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests/codegen/triton_target/ \
    --junitxml="$OUT/tests-$tag.xml" > "$OUT/tests-$tag.txt" 2>&1
  set -e
  tail -1 "$OUT/tests-$tag.txt"
done

# 3. the summary
"$PY39" - "$OUT" "$PY36" "$PY39" <<'EOF'
import datetime
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from transfuse.codegen.triton.compile_check import SHARED_LIMIT, Result

out, pythons = Path(sys.argv[1]), {"36": sys.argv[2], "39": sys.argv[3]}
versions = {}
per_config = {}
for tag, py in pythons.items():
    env = json.loads(subprocess.run(
        [py, "-c", "import json, sys, numpy, torch, triton; print(json.dumps({'triton': "
         "triton.__version__, 'torch': torch.__version__, 'numpy': numpy.__version__, "
         "'python': sys.version.split()[0]}))"], capture_output=True, text=True,
        check=True).stdout)
    results = [Result.from_json(r) for r in json.loads((out / f"compile-{tag}.json").read_text())]
    per_config[tag] = {(r.name, r.num_warps, r.num_stages, r.arch): r for r in results}
    kernels: dict = {}
    for r in results:
        k = kernels.setdefault(r.kernel.split(":")[1], {})
        a = k.setdefault(f"sm_{r.arch}", {"configs": 0, "max_registers": 0, "max_shared_bytes": 0})
        a["configs"] += 1
        a["max_registers"] = max(a["max_registers"], r.registers or 0)
        a["max_shared_bytes"] = max(a["max_shared_bytes"], r.shared or 0)
    by_arch = {}
    for arch in sorted({r.arch for r in results}):
        rs = [r for r in results if r.arch == arch]
        by_arch[f"sm_{arch}"] = {
            "compiles": len(rs), "max_registers": max(r.registers or 0 for r in rs),
            "max_shared_bytes": max(r.shared or 0 for r in rs),
            "shared_limit_bytes": SHARED_LIMIT[arch]}
    suite = ET.parse(out / f"tests-{tag}.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n, fail, err, skip = (int(suite.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
    versions[env["triton"]] = {
        **env,
        "compile_check": {
            "exit_code": int((out / f"compile-{tag}.rc").read_text()),
            "compiles": len(results),
            "ok": sum(not r.problems() for r in results),
            "problems": [f"{r.name} w{r.num_warps} s{r.num_stages} sm_{r.arch}: {p}"
                         for r in results for p in r.problems()],
            "configs_spilling": sum(bool(r.spills) for r in results),
            "wall_seconds": int((out / f"compile-{tag}.seconds").read_text()),
            "by_arch": by_arch, "by_kernel": kernels},
        "tests": {"path": "tests/codegen/triton_target", "collected": n,
                  "passed": n - fail - err - skip, "failed": fail, "errors": err,
                  "skipped": skip, "seconds": round(float(suite.get("time", 0)), 1),
                  "not_passed": [f"{c.get('classname')}::{c.get('name')}"
                                 for c in suite.iter("testcase")
                                 if c.find("failure") is not None
                                 or c.find("error") is not None]},
    }
a, b = per_config["36"], per_config["39"]
both = sorted(set(a) & set(b))
diff = sorted(((b[k].registers or 0) - (a[k].registers or 0), k) for k in both)
doc = {
    "what": "triton 3.6 vs 3.9 on the shipped Triton kernels without a GPU: the sm_80/sm_90 "
            "compile check of every shipped config and tests/codegen/triton_target under each "
            "version's interpreter (benchmarks/triton36_check.sh)",
    "date": datetime.date.today().isoformat(),
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip(),
    "gpu_run": None,
    "versions": versions,
    "registers_3_9_minus_3_6": {
        "configs_compared": len(both), "configs_same": sum(d == 0 for d, _ in diff),
        "min": diff[0][0] if diff else None, "max": diff[-1][0] if diff else None,
        "largest": [{"config": f"{k[0]} w{k[1]} s{k[2]} sm_{k[3]}", "triton_3_6": a[k].registers,
                     "triton_3_9": b[k].registers}
                    for _, k in sorted(diff, key=lambda x: -abs(x[0]))[:10]]},
}
path = Path("benchmarks/results") / f"triton36-compat-{doc['date']}.json"
path.write_text(json.dumps(doc, indent=1) + "\n")
print(f"wrote {path}")
bad = [v for v, d in versions.items()
       if d["compile_check"]["problems"] or d["tests"]["failed"] or d["tests"]["errors"]]
print("problems with triton " + ", ".join(bad) if bad else "both versions clean")
sys.exit(1 if bad else 0)
EOF
