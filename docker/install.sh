#!/usr/bin/env bash
# Installs torch and this package into one Python environment. This is the install step of
# docker/Dockerfile and docker/Dockerfile-cpu, and tests/test_docker.py runs the same script in
# a fresh virtual environment; it works outside Docker too.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: docker/install.sh [options] [SRC]

Install torch, then this package from the source directory SRC (default: the directory
above this script), into the environment of the given Python.

options:
  --python PYTHON        interpreter whose environment receives the packages (default: python3)
  --torch VERSION        torch version to install first (default: 2.13.0)
  --torch-index-url URL  index to take torch from, e.g. https://download.pytorch.org/whl/cpu
                         for the CPU-only build (default: pip's configured index; on Linux,
                         PyPI's torch is the CUDA build)
  --extras LIST          comma-separated extras of the package, e.g. vocab,serve
                         (each must be declared in SRC/pyproject.toml)
  --flash-attn           also build flash-attn (needs CUDA's nvcc; MAX_JOBS limits the build)
  --no-compile           do not compile .pyc files (a faster install; first imports compile them)
  -h, --help             show this help

torch is installed first and then held at the installed version while the package and its
extras install, so that no dependency can swap the CPU build for a CUDA one or the reverse.
EOF
}

die() {
    echo "install.sh: error: $*" >&2
    exit 2
}

python=python3
torch_version=2.13.0
torch_index_url=""
extras=""
flash_attn=0
compile=1
src=""

while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --python | --torch | --torch-index-url | --extras)
            [ $# -ge 2 ] || die "$1 needs a value"
            case "$1" in
                --python) python=$2 ;;
                --torch) torch_version=$2 ;;
                --torch-index-url) torch_index_url=$2 ;;
                --extras) extras=$2 ;;
            esac
            shift 2
            ;;
        --flash-attn)
            flash_attn=1
            shift
            ;;
        --no-compile)
            compile=0
            shift
            ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            [ -z "$src" ] || die "more than one source directory given: $src and $1"
            src=$1
            shift
            ;;
    esac
done

if [ -z "$src" ]; then
    case "${BASH_SOURCE[0]}" in
        */*) src="${BASH_SOURCE[0]%/*}/.." ;;
        *) src=.. ;;
    esac
fi
src=$(cd "$src" && pwd -P) || die "source directory $src not found"
[ -f "$src/pyproject.toml" ] || die "$src has no pyproject.toml: pass the repository's root as SRC"
command -v "$python" >/dev/null 2>&1 || die "Python interpreter '$python' not found"
[ -n "$torch_version" ] || die "--torch needs a version"
extras=${extras// /}

# Every requested extra must be declared by the package: pip only warns about unknown ones,
# and an image built without the extra it was asked for fails later, at run time.
if [ -n "$extras" ]; then
    "$python" - "$src/pyproject.toml" "$extras" <<'EOF' || die "unknown extra in --extras $extras"
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's own warning has to do
    sys.exit(0)
with open(sys.argv[1], "rb") as f:
    declared = tomllib.load(f)["project"].get("optional-dependencies", {})
unknown = [name for name in sys.argv[2].split(",") if name not in declared]
if unknown:
    print(f"install.sh: extras {unknown} are not declared in {sys.argv[1]} "
          f"(declared: {', '.join(sorted(declared))})", file=sys.stderr)
    sys.exit(1)
EOF
fi

pip=("$python" -m pip install --disable-pip-version-check)
[ "$compile" = 1 ] || pip+=(--no-compile)

echo "install.sh: torch==$torch_version${torch_index_url:+ from $torch_index_url}"
if [ -n "$torch_index_url" ]; then
    "${pip[@]}" --index-url "$torch_index_url" "torch==$torch_version"
else
    "${pip[@]}" "torch==$torch_version"
fi

# Hold torch where it is (its local version label included: 2.13.0+cpu stays the CPU build).
installed_torch=$("$python" -I -c "import torch; print(torch.__version__)")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$installed_torch" >"$constraints"

target=$src
[ -z "$extras" ] || target="${src}[${extras}]"
echo "install.sh: $target"
"${pip[@]}" --constraint "$constraints" "$target"

if [ "$flash_attn" = 1 ]; then
    echo "install.sh: flash-attn (compiled against torch $installed_torch; MAX_JOBS=${MAX_JOBS:-4})"
    "${pip[@]}" --constraint "$constraints" packaging psutil ninja wheel
    MAX_JOBS=${MAX_JOBS:-4} "${pip[@]}" --constraint "$constraints" --no-build-isolation "flash-attn>=2.6"
fi

# -I: import the installed package, not a source tree in the working directory.
"$python" -I -c '
import qwen
import torch

cuda = torch.version.cuda or "none"
print(f"install.sh: done: torch {torch.__version__} (CUDA {cuda}), qwen from {qwen.__path__[0]}")
'
