#!/usr/bin/env bash
# Check digitscore on a GPU host in one command, from the repository root, offline:
#
#   bench/gpu_check.sh [--bundle DIR] [--dry-run-cpu] [--log-dir DIR]
#
# --bundle DIR: what bench/gpu_bundle.sh wrote on a machine with the registries. The check
#   makes a virtual environment of the host's python3 that sees the host's own torch and numpy,
#   installs the bundle's wheels into it with `pip install --no-index`, and starts Redis from
#   the bundle on a free port. Without it: python3 as it is, and redis-server from PATH.
# --dry-run-cpu: every step that needs no CUDA runs on the CPU (the others say "skipped: dry
#   run"), with small image counts, and the GPU tests step runs only the tests whose names say
#   GPU or CUDA (the rest of those files are the CPU suite's, and a worker runs in its own
#   step); this is how tests/test_gpu_kit.py keeps the kit working.
#
# Steps, each with a time limit (it says what it waited for when it runs out): the install;
# the environment (torch, CUDA, driver, compute mode, TF32 flags); the GPU tests under CI=true,
# the CUDA-state tests (tests/test_device_health.py) in a process of their own; CPU against GPU
# predictions on the shipped digits (bench/gpu_compare.py); one process's decode and score
# split on the GPU; one worker on cuda:0 with its whole pool and a full queue, then the same on
# the CPU (bench/gpu_runs.py; SQLite). The database is SQLite throughout: no PostgreSQL. A step
# that fails is recorded and the next one runs. The summary is a Markdown table for
# docs/performance.md ending in one verdict line; the exit status is the number of failed
# steps.
#
# Settings: PYTHON (default python3); DIGITSCORE_CHECK_IMAGES, the images of each worker run
# (default 400000; 1000 in a dry run); DIGITSCORE_CHECK_SPLIT_IMAGES (default 100000; 8192);
# DIGITSCORE_CHECK_LIMIT_SCALE, a factor on every step's time limit (default 1, whose limits add
# up to 8 minutes; 3 in a dry run, for a small shared machine).

set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
BUNDLE=""
DRY_RUN=0
LOG_DIR=""
while [ $# -gt 0 ]; do
    case $1 in
        --bundle) BUNDLE=$(cd "${2:?--bundle needs a folder}" && pwd) || exit 2; shift 2 ;;
        --dry-run-cpu) DRY_RUN=1; shift ;;
        --log-dir) LOG_DIR=${2:?--log-dir needs a folder}; shift 2 ;;
        -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "unknown argument $1: see bench/gpu_check.sh --help" >&2; exit 2 ;;
    esac
done
LOG_DIR=${LOG_DIR:-$(mktemp -d /tmp/digitscore-gpu-check.XXXXXX)}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
if [ "$DRY_RUN" = 1 ]; then
    IMAGES=${DIGITSCORE_CHECK_IMAGES:-1000}
    SPLIT_IMAGES=${DIGITSCORE_CHECK_SPLIT_IMAGES:-8192}
    LIMIT_SCALE=${DIGITSCORE_CHECK_LIMIT_SCALE:-3}
else
    IMAGES=${DIGITSCORE_CHECK_IMAGES:-400000}
    SPLIT_IMAGES=${DIGITSCORE_CHECK_SPLIT_IMAGES:-100000}
    LIMIT_SCALE=${DIGITSCORE_CHECK_LIMIT_SCALE:-1}
fi
PY=${PYTHON:-python3}
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 PY DRY_RUN BUNDLE LOG_DIR REPO
# pip reads nothing but what the check gives it: no configured index or folder of wheels
export PIP_CONFIG_FILE=/dev/null PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT

names=() results=() seconds=() notes=()
REDIS_PID=""
trap '[ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null' EXIT

# step NAME LIMIT WAITS_FOR COMMAND...: COMMAND (a function here, or a program) with at most
# LIMIT seconds, its output in LOG_DIR/NAME.log and on the terminal; records its result, its
# duration and its last line.
step() {
    local name=$1 limit=$2 waits=$3
    shift 3
    local log="$LOG_DIR/$name.log" start=$SECONDS status
    limit=$((limit * LIMIT_SCALE))
    echo "=== $name (at most ${limit} s, waits for $waits)"
    timeout -k 10 "$limit" bash -c "$(declare -f); \"\$@\"" _ "$@" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    names+=("$name")
    seconds+=($((SECONDS - start)))
    case $status in
        0) results+=("ok") ;;
        124|137) results+=("TIMED OUT")
                 printf '\n%s\n' "$name: no end after $limit s waiting for $waits" | tee -a "$log" ;;
        *) results+=("FAILED ($status)") ;;
    esac
    notes+=("$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-110 | tr '|' '/')")
}

skip() {  # skip NAME WHY
    names+=("$1") results+=("skipped: $2") seconds+=(0) notes+=("")
    echo "=== $1: skipped: $2"
}

# --- the steps -----------------------------------------------------------------------------

install_bundle() {
    local want have venv=$LOG_DIR/venv site pip
    want=$(sed -n 's/^python=//p' "$BUNDLE/BUNDLE")
    have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || return 1
    if [ "$want" != "$have" ]; then
        echo "the bundle's wheels are for Python $want, $PY is $have: make one with" \
             "bench/gpu_bundle.sh DIR --python $have"
        return 1
    fi
    # a virtual environment of the host's Python that sees the host's torch and numpy, even
    # when those live in another virtual environment
    site=$("$PY" -c 'import os, torch, numpy
print("\n".join(sorted({os.path.dirname(os.path.dirname(m.__file__)) for m in (torch, numpy)})))') ||
        { echo "$PY cannot import torch and numpy: install the host's CUDA build of torch first"; return 1; }
    "$PY" -m venv --without-pip "$venv" || return 1
    echo "$site" >"$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/host-torch.pth"
    pip=$(ls "$BUNDLE"/wheels/pip-*.whl | head -n 1)
    "$venv/bin/python" "$pip/pip" install -q --no-index --find-links "$BUNDLE/wheels" \
        --no-build-isolation digitscore pytest pytest-timeout fakeredis || return 1
    check_torch_range "$venv/bin/python" || return 1
    echo "installed $(ls "$BUNDLE/wheels" | wc -l) wheels into $venv, with the host's torch"
}

check_torch_range() {  # PYTHON: torch and numpy within pyproject.toml's ranges
    "$1" - "$REPO/pyproject.toml" <<'END'
import sys
import tomllib
from importlib.metadata import version

from packaging.requirements import Requirement

with open(sys.argv[1], "rb") as f:
    reqs = [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]
for req in reqs:
    if req.name in ("torch", "numpy"):
        have = version(req.name)
        if not req.specifier.contains(have, prereleases=True):
            sys.exit(f"{req.name} {have} is outside the project's range {req}: use a host "
                     f"{req.name} within it, or widen the range in pyproject.toml")
        print(f"{req.name} {have}: within {req}")
END
}

environment() {
    "$PY" - "$DRY_RUN" <<'END'
import os
import subprocess
import sys

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
import torch

dry = sys.argv[1] == "1"
print(f"python {sys.version.split()[0]}; torch {torch.__version__}, CUDA build "
      f"{torch.version.cuda}; {os.cpu_count()} cores")
override = os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
matmul = torch.backends.cuda.matmul.allow_tf32
print(f"TF32: matmul {matmul}, cudnn {torch.backends.cudnn.allow_tf32}, float32 matmul "
      f"precision {torch.get_float32_matmul_precision()}, TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="
      f"{override}")
if dry:
    print("dry run: no driver, compute mode or kernel asked for")
    sys.exit(0)
smi = subprocess.run(["nvidia-smi", "--query-gpu=index,name,driver_version,compute_mode,"
                      "memory.total", "--format=csv,noheader"], capture_output=True, text=True)
print(smi.stdout.strip() or smi.stderr.strip())
assert torch.cuda.device_count() > 0, "torch counts no GPU"
x = torch.arange(256, device="cuda:0", dtype=torch.float32).sum().item()
assert x == 32640.0, x
problems = []
if matmul or override == "1" or torch.get_float32_matmul_precision() != "highest":
    problems.append("TF32 is on for float32 products: the CPU/GPU bounds assume it off")
if "Exclusive_Process" in smi.stdout or "Prohibited" in smi.stdout:
    problems.append("compute mode admits at most one process a GPU: a worker's pool needs more")
print("; ".join(problems) or f"cuda:0 {torch.cuda.get_device_name(0)}: a kernel ran, TF32 off")
sys.exit(1 if problems else 0)
END
}

start_redis() {  # in the background, on a free port; its PID in REDIS_PID
    local server=redis-server
    [ -n "$BUNDLE" ] && server=$BUNDLE/redis/redis-server
    REDIS_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$server" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$LOG_DIR" >"$LOG_DIR/redis-server.log" 2>&1 &
    REDIS_PID=$!
    BROKER=redis://127.0.0.1:$REDIS_PORT
}

wait_redis() {
    until "$PY" -c "import redis, sys; redis.Redis.from_url('$BROKER').ping()" 2>/dev/null; do
        kill -0 "$REDIS_PID" 2>/dev/null || { cat "$LOG_DIR/redis-server.log"; return 1; }
        sleep 0.2
    done
    echo "Redis $("$PY" -c "import redis; print(redis.Redis.from_url('$BROKER').info()['redis_version'])") at $BROKER"
}

gpu_tests() {  # FILES...: under CI=true; a GPU test that would skip fails, except in a dry run
    local require=1
    [ "$DRY_RUN" = 1 ] && require=0
    # in one process (-o addopts= drops pyproject.toml's -n): the bundle has no pytest-xdist,
    # and tests that share one GPU are not run side by side
    CI=true DIGITSCORE_TEST_REQUIRE_GPU=$require DIGITSCORE_TEST_REDIS_URL=$BROKER \
        DIGITSCORE_TEST_REDIS_DB=0 "$PY" -m pytest -q -p no:cacheprovider -o addopts= "$@"
}

# --- the run ---------------------------------------------------------------------------------

started=$SECONDS
if [ -n "$BUNDLE" ]; then
    step install 60 "pip installing the bundle's wheels" install_bundle
    if [ "${results[0]}" != ok ]; then
        echo "verdict: FAILED at the install: nothing else can run (see $LOG_DIR/install.log)"
        exit 1
    fi
    export PY=$LOG_DIR/venv/bin/python
    export PATH="$LOG_DIR/venv/bin:$PATH"
elif ! check_torch_range "$PY" >"$LOG_DIR/install.log" 2>&1; then
    cat "$LOG_DIR/install.log"
    echo "verdict: FAILED: $(tail -n 1 "$LOG_DIR/install.log")"
    exit 1
fi
step environment 30 "torch to import and CUDA to run a kernel" environment
start_redis
export BROKER REDIS_PID
step redis 15 "redis-server to answer PING" wait_redis
gpu_only=()
[ "$DRY_RUN" = 1 ] && gpu_only=(-k "gpu or cuda")
step gpu-tests 120 "pytest: the device, launcher and worker tests" \
    gpu_tests tests/test_devices.py tests/test_worker_cli.py "${gpu_only[@]}"
step cuda-state-tests 45 "pytest: tests/test_device_health.py, CUDA untouched before it" \
    gpu_tests tests/test_device_health.py
if [ "$DRY_RUN" = 1 ]; then
    skip cpu-gpu-compare "dry run"
    step split-cpu 45 "decoding and scoring $SPLIT_IMAGES images in one process" \
        "$PY" -m bench.gpu_runs split --device cpu --images "$SPLIT_IMAGES"
    skip worker-cuda0 "dry run"
else
    step cpu-gpu-compare 45 "the shipped digits scored on the CPU and on cuda:0" \
        "$PY" -m bench.gpu_compare --device cuda:0
    step split-cuda0 45 "decoding and scoring $SPLIT_IMAGES images in one process" \
        "$PY" -m bench.gpu_runs split --device cuda:0 --images "$SPLIT_IMAGES"
    step worker-cuda0 60 "one worker on cuda:0 scoring $IMAGES images" \
        "$PY" -m bench.gpu_runs worker --device cuda:0 --images "$IMAGES" \
        --broker-url "$BROKER/0" --work-dir "$LOG_DIR/runs"
fi
step worker-cpu 60 "one worker on the CPU scoring $IMAGES images" \
    "$PY" -m bench.gpu_runs worker --device cpu --images "$IMAGES" \
    --broker-url "$BROKER/0" --work-dir "$LOG_DIR/runs"

# --- the summary -----------------------------------------------------------------------------

rate_of() {  # the images/s of a worker step's last line
    local i
    for i in "${!names[@]}"; do
        [ "${names[$i]}" = "$1" ] && [ "${results[$i]}" = ok ] &&
            sed -n 's/^.*: \([0-9,]*\) images\/s.*/\1/p' <<<"${notes[$i]}" | tr -d ,
    done
}
failed=0 failures=""
echo
echo "digitscore GPU check, $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null)," \
     "$(nproc) cores$([ "$DRY_RUN" = 1 ] && echo ', dry run on the CPU'): \`bench/gpu_check.sh" \
     "${BUNDLE:+--bundle DIR }$([ "$DRY_RUN" = 1 ] && echo '--dry-run-cpu')\` (logs in $LOG_DIR)"
echo
echo "| step | result | seconds | figure or last line |"
echo "|---|---|---:|---|"
for i in "${!names[@]}"; do
    echo "| ${names[$i]} | ${results[$i]} | ${seconds[$i]} | ${notes[$i]} |"
    case ${results[$i]} in ok|skipped:*) ;; *) failed=$((failed + 1)); failures+=" ${names[$i]}" ;; esac
done
gpu=$(rate_of worker-cuda0) cpu=$(rate_of worker-cpu)
if [ -n "$gpu" ] && [ -n "$cpu" ]; then
    echo
    echo "One worker on cuda:0: $(awk "BEGIN {printf \"%.2f\", $gpu / $cpu}") times the images/s of one worker on the CPU of the same host, in the same run."
fi
echo
total=$((SECONDS - started))
if [ "$failed" -gt 0 ]; then
    echo "verdict: FAILED, $failed step(s):$failures, in $total s"
elif [ "$DRY_RUN" = 1 ]; then
    echo "verdict: dry run passed in $total s: every step without CUDA ran on the CPU; the GPU steps were skipped"
else
    echo "verdict: passed in $total s: every step ok on this GPU host"
fi
exit "$failed"
