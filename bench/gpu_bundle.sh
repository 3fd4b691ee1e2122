#!/usr/bin/env bash
# Everything a bare, offline GPU host lacks to run bench/gpu_check.sh, written into one folder,
# on a machine that reaches the package registries (PyPI, Debian's), from the repository root:
#
#   bench/gpu_bundle.sh DIR [--python 3.12]
#
# DIR/wheels: binary wheels of the project's dependencies for that Python on x86_64 Linux, and
#   of the test tools the check runs (pytest, pytest-timeout, fakeredis), without torch and
#   numpy, which such hosts have; the project itself as a wheel (so the host builds nothing);
#   and pip's own wheel, for a Python that lacks pip.
# DIR/redis: redis-server and redis-cli from Debian's redis-tools package (apt-get download,
#   dpkg-deb -x), the shared libraries they load beyond glibc (ldd), and two wrappers that set
#   LD_LIBRARY_PATH to them.
# DIR/BUNDLE: what it was made for and from.
#
# Fails when DIR exceeds 64 MiB. Needs pip, apt-get, dpkg-deb and ldd (Debian or Ubuntu).

set -euo pipefail

usage() { echo "usage: bench/gpu_bundle.sh DIR [--python 3.12]" >&2; exit 2; }
[ $# -ge 1 ] || usage
DIR=$1
shift
PY_VERSION=3.12
while [ $# -gt 0 ]; do
    case $1 in
        --python) PY_VERSION=${2:?--python needs a version such as 3.12}; shift 2 ;;
        *) usage ;;
    esac
done
LIMIT_MIB=64
MINOR=$(cut -d. -f1,2 <<<"$PY_VERSION")
ABI="cp${MINOR/./}"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# pip evaluates the dependencies' markers (python_full_version < "3.11.3") for the Python it
# runs in, whatever --python-version says: a Python of the host's version gives the host's set
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v "python$MINOR" >/dev/null && "python$MINOR" -m pip --version >/dev/null 2>&1; then
    PY=python$MINOR
else PY=python3
fi
RUNS=$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
case $RUNS in
    "$PY_VERSION"|"$PY_VERSION".*) ;;
    *) echo "warning: bundling with Python $RUNS for $PY_VERSION: dependencies with markers on"             "the version may differ (set PYTHON to a python$MINOR with pip)" >&2 ;;
esac

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
rm -rf "$DIR/wheels" "$DIR/redis"
mkdir -p "$DIR/wheels" "$DIR/redis/bin" "$DIR/redis/lib"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# --- the wheels -------------------------------------------------------------------------------
# The requirements are pyproject.toml's, less torch and numpy, plus the test tools gpu_check.sh
# runs (not the linters, nor scikit-learn, which only the training tests use).
"$PY" - "$ROOT/pyproject.toml" >"$WORK/requirements.txt" <<'END'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
wanted = {"pytest", "pytest-timeout", "fakeredis"}
tests = [r for r in project["optional-dependencies"]["test"]
         if re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() in wanted]
for req in project["dependencies"] + tests:
    if re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() not in ("torch", "numpy"):
        print(req)
print("pip")
END
echo "wheels for CPython $PY_VERSION ($ABI, manylinux x86_64) of:" $(cat "$WORK/requirements.txt")
"$PY" -m pip download -q --only-binary=:all: --dest "$DIR/wheels" \
    --python-version "$PY_VERSION" --implementation cp --abi "$ABI" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform linux_x86_64 --platform any \
    -r "$WORK/requirements.txt" 2>&1 | { grep -v "is neither a file nor a directory" || true; }
# pyspng requires numpy: its wheel came along; the host's own numpy is used
rm -f "$DIR"/wheels/numpy-*.whl "$DIR"/wheels/torch-*.whl "$DIR"/wheels/nvidia_*.whl \
    "$DIR"/wheels/triton-*.whl
# the project itself, pure Python: built here (isolated), so the host builds nothing
"$PY" -m pip wheel -q --no-deps --wheel-dir "$DIR/wheels" "$ROOT"

# --- Redis --------------------------------------------------------------------------------------
# redis-server (the package) holds the name, a link to redis-check-rdb in redis-tools
(cd "$WORK" && apt-get download redis-server redis-tools 2>&1 | grep -v unsandboxed || true)
for deb in "$WORK"/redis-*.deb; do dpkg-deb -x "$deb" "$WORK/deb"; done
for tool in redis-server redis-cli; do
    cp -L "$WORK/deb/usr/bin/$tool" "$DIR/redis/bin/$tool"
done
# every library the binaries load except glibc's own, as this (Debian) system resolves them
for lib in $(ldd "$DIR/redis/bin/redis-server" "$DIR/redis/bin/redis-cli" |
             awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u); do
    case $(basename "$lib") in
        libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|ld-linux*) ;;
        *) cp -L "$lib" "$DIR/redis/lib/" ;;
    esac
done
for tool in redis-server redis-cli; do
    cat >"$DIR/redis/$tool" <<END
#!/bin/sh
# $tool from Debian's redis-tools, with the shared libraries it was built against
here=\$(cd "\$(dirname "\$0")" && pwd)
LD_LIBRARY_PATH="\$here/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$here/bin/$tool" "\$@"
END
    chmod +x "$DIR/redis/$tool"
done
"$DIR/redis/redis-server" --version >/dev/null
GLIBC=$(objdump -T "$DIR/redis/bin/redis-server" 2>/dev/null |
        grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -n 1 || true)

# --- what it is ---------------------------------------------------------------------------------
cat >"$DIR/BUNDLE" <<END
python=$MINOR
markers_for=$RUNS
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
made=$(date -u +%Y-%m-%dT%H:%M:%SZ)
redis=$("$DIR/redis/redis-server" --version | grep -o 'v=[0-9.]*' | cut -c3-)
redis_needs=${GLIBC:-unknown}
END
size_kib=$(du -sk "$DIR" | cut -f1)
echo "bundle $DIR: $(ls "$DIR/wheels" | wc -l) wheels, Redis $(grep redis= "$DIR/BUNDLE" |
    cut -d= -f2) (needs ${GLIBC:-an unknown glibc}), $((size_kib / 1024)) MiB"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "bundle is over $LIMIT_MIB MiB: look at \`du -sh $DIR/*/*\`" >&2
    exit 1
fi
