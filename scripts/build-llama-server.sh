#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from a pinned PyPI source distribution (llama-cpp-python vendors
# llama.cpp, MIT) into ~/.cache/alignq/. Idempotent: a later run finds the binary and prints its path.
# The last stdout line is always the path of the executable.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.16}
CACHE=${ALIGNQ_CACHE_DIR:-$HOME/.cache/alignq}
PREFIX="$CACHE/llama-server-$VERSION"
BIN="$PREFIX/bin/llama-server"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
PY=${PYTHON:-python3}
command -v cmake >/dev/null || { echo "build-llama-server: cmake is required" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/llama-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: \
  "llama-cpp-python==$VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || { echo "build-llama-server: no vendored llama.cpp in the sdist" >&2; exit 1; }
# CPU-only, no curl (no network at run time), native ISA off so the cached binary runs on sibling machines.
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
nice -n 10 cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$PREFIX/bin.tmp"
cp "$work/build/bin/llama-server" "$PREFIX/bin.tmp/"
rm -rf "$PREFIX/bin" && mv "$PREFIX/bin.tmp" "$PREFIX/bin"   # atomic-ish: a half build never looks done
echo "$BIN"
