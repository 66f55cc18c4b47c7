#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU (about 5 minutes): graphopt's Triton kernels
# compiled and tested on the GPU in fp32, fp16 and bf16, then the kernel microbenchmarks.
# Writes bench/results/gpu-<date>.json (tests + benchmarks) beside the benchmark's own files.
# Needs a Python with torch (CUDA build), triton, pytest and graphopt's dependencies: PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
day=$(date +%F)
out=bench/results
mkdir -p "$out"
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)"
set +e
"$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton_cuda.py --junitxml="$out/gpu-tests-$day.xml" 2>&1 | tee "$out/gpu-tests-$day.log"
tests_rc=${PIPESTATUS[0]}
set -e
"$PY" bench/kernels.py --out "$out" ${QUICK:+--quick}
"$PY" - "$out" "$day" "$tests_rc" <<'PYEOF'
import json, sys, pathlib, torch
out, day, rc = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
device = torch.cuda.get_device_name().replace(" ", "-")
bench = json.loads((out / f"kernels-{device}-{day}.json").read_text())
log = (out / f"gpu-tests-{day}.log").read_text().strip().splitlines()
result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tests_exit_code": rc,
          "tests_summary": log[-1] if log else "", "kernels": bench["rows"], "int8": bench.get("int8", []),
          "table": bench["table"]}
(out / f"gpu-{day}.json").write_text(json.dumps(result, indent=1) + "\n")
print(f"wrote {out / f'gpu-{day}.json'}; tests: {result['tests_summary']}")
PYEOF
exit "$tests_rc"
