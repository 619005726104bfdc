#!/usr/bin/env bash
# The CUDA checks, in under 8 minutes on one GPU: the CUDA tests, then every family's training
# throughput under bfloat16 and float16 AMP through `dora run` (bench/gpu_steps.py: steps/s and
# peak memory), with a 2-process NCCL run when the machine has two GPUs.
#
#   bash bench/gpu_check.sh                  # from the repository root, demixlab installed with a CUDA torch
#   WHEELS=.whl bash bench/gpu_check.sh      # offline machine: install demixlab's requirements from wheels
#   STEPS=30 bash bench/gpu_check.sh         # fewer steps per epoch (default 60, two epochs per XP)
#
# WHEELS is a folder of wheels for that machine's Python (pip download hydra-core omegaconf
# dora-search submitit soundfile julius musdb museval treetable ... -d .whl); they are installed
# under /tmp/site, without touching the machine's torch. Prints a summary at the end; exit code
# non-zero when a test or a run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
begin=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${WHEELS:-}" ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 - <<'EOF' || exit 1
import torch
assert torch.cuda.is_available(), "bench/gpu_check.sh: torch sees no CUDA device"
import demixlab.train  # noqa: F401  (every requirement importable)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x "
      f"{torch.cuda.get_device_name(0)}")
EOF
status=0
echo "== CUDA tests"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_bsseval.py tests/test_slicqt.py \
    -k "cuda" || status=1
echo "== training throughput ($(( $(date +%s) - begin )) s in)"
python3 bench/gpu_steps.py --steps "${STEPS:-60}" --ddp --budget $(( 420 - ($(date +%s) - begin) )) || status=1
echo "== done in $(( $(date +%s) - begin )) s, status $status"
exit $status
