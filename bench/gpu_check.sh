#!/usr/bin/env bash
# Check digitscore on a GPU host in one command, from the repository root, with a CUDA build of
# torch and digitscore installed (`pip install -e '.[test]'`), Redis and PostgreSQL reachable as
# the tests expect them (DIGITSCORE_TEST_* variables, see tests/conftest.py):
#
#   bench/gpu_check.sh [LOG_DIR]
#
# Runs, in order: nvidia-smi; a torch CUDA probe; the GPU tests under CI=true (a GPU test that
# would skip fails); `worker` on every GPU, briefly, scoring the sample digits, with the GPU
# memory of its processes; `python -m bench.throughput --device cuda:0 --quick`; and the
# CPU/GPU comparison (`python -m bench.gpu_compare`). A failing step is recorded and the next
# one runs. Prints one summary table; the exit status is the number of failed steps.
#
# Settings: DIGITSCORE_CHECK_BROKER_URL (default redis://127.0.0.1:6379/14), the broker of the
# worker step; DIGITSCORE_CHECK_WORKER_SECONDS (default 120), how long that step may take.

set -u

cd "$(dirname "$0")/.." || exit 1
LOG_DIR=${1:-$(mktemp -d /tmp/digitscore-gpu-check.XXXXXX)}
mkdir -p "$LOG_DIR"
PYTHON=${PYTHON:-python}
BROKER=${DIGITSCORE_CHECK_BROKER_URL:-redis://127.0.0.1:6379/14}
WORKER_SECONDS=${DIGITSCORE_CHECK_WORKER_SECONDS:-120}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

names=()
results=()
seconds=()
notes=()

# run_step NAME COMMAND...: run it with its output in LOG_DIR/NAME.log (and on the terminal),
# and record its status, duration and the last line it printed.
run_step() {
    local name=$1
    shift
    local log="$LOG_DIR/$name.log"
    local start=$SECONDS
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$log"  # the step runs in a subshell: what it exports stays there
    local status=${PIPESTATUS[0]}
    names+=("$name")
    seconds+=($((SECONDS - start)))
    if [ "$status" -eq 0 ]; then results+=("ok"); else results+=("FAILED ($status)"); fi
    notes+=("$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-70)")
}

torch_probe() {
    "$PYTHON" - <<'END'
import os
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
import torch

print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}")
n = torch.cuda.device_count()
assert n > 0, "torch counts no GPU"
for i in range(n):
    x = torch.arange(256, device=f"cuda:{i}", dtype=torch.float32).sum().item()
    assert x == 32640.0, (i, x)
    print(f"cuda:{i} {torch.cuda.get_device_name(i)}: a kernel ran")
free, total = torch.cuda.mem_get_info(0)
print(f"{n} GPU(s) usable; cuda:0 has {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
END
}

gpu_tests() {
    CI=true DIGITSCORE_TEST_REQUIRE_GPU=1 "$PYTHON" -m pytest -q \
        tests/test_devices.py tests/test_device_health.py tests/test_worker_cli.py
}

# `worker` on every GPU (its defaults) scoring the sample digits, then stopped warmly.
worker_on_all_gpus() {
    local dir="$LOG_DIR/worker-run"
    mkdir -p "$dir"
    local queue="digitscore-gpu-check-$$"
    export DIGITSCORE_BROKER_URL="$BROKER" DIGITSCORE_QUEUE="$queue"
    export DIGITSCORE_DATABASE_URL="sqlite:///$dir/digitscore.db"
    producer sample-data "$dir/mnist" --classes all >/dev/null &&
        producer train "$dir/mnist/train" --epochs 2 >/dev/null || return 1
    local gpus
    gpus=$(nvidia-smi --list-gpus | wc -l)
    [ "$gpus" -gt 0 ] || { echo "nvidia-smi lists no GPU"; return 1; }
    worker --require-gpu >"$dir/worker.log" 2>&1 &
    local launcher=$!
    local deadline=$((SECONDS + WORKER_SECONDS))
    until [ "$(grep -c ' ready\.' "$dir/worker.log")" -ge "$gpus" ]; do
        if ! kill -0 "$launcher" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
            tail -n 20 "$dir/worker.log"
            kill -TERM "$launcher" 2>/dev/null
            return 1
        fi
        sleep 1
    done
    timeout "$WORKER_SECONDS" producer submit "$dir/mnist/valid" --wait
    local submitted=$?
    local pool
    pool=$(grep -c 'scores on cuda:0' "$dir/worker.log")
    echo "pool processes: $pool, on $gpus GPU(s)"
    echo "GPU memory of each process (MiB), while the workers run:"
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
    kill -TERM "$launcher"
    wait "$launcher"
    local stopped=$?
    grep -E "cannot score|device error" "$dir/worker.log"
    echo "submit: status $submitted; worker stopped with status $stopped"
    [ "$submitted" -eq 0 ] && [ "$stopped" -eq 0 ] && [ "$pool" -ge "$gpus" ]
}

run_step nvidia-smi nvidia-smi
run_step torch-cuda-probe torch_probe
run_step gpu-tests gpu_tests
run_step worker-all-gpus worker_on_all_gpus
run_step throughput-cuda0 "$PYTHON" -m bench.throughput --device cuda:0 --quick
run_step cpu-gpu-compare "$PYTHON" -m bench.gpu_compare --device cuda:0

failed=0
echo
echo "digitscore GPU check: logs in $LOG_DIR"
printf '%-18s %-12s %7s  %s\n' "step" "result" "seconds" "last line"
for i in "${!names[@]}"; do
    printf '%-18s %-12s %7s  %s\n' "${names[$i]}" "${results[$i]}" "${seconds[$i]}" "${notes[$i]}"
    [ "${results[$i]}" = "ok" ] || failed=$((failed + 1))
done
exit "$failed"
