#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-perplexity, llama-bench, llama-imatrix, llama-quantize) from the source
# distribution of the llama-cpp-python that scripts/setup.sh installs, with that build's GGML flags, and print the
# folder holding them. A benchmark step (scripts/bench_gguf.py checks quantlab's llama.cpp numbers against these
# tools'), not a runtime dependency: quantlab itself never calls them.
#
#   bash scripts/build_llama_tools.sh          # about 5-10 minutes on 2 cores, once per version and flags
#
# Kept in ${QUANTLAB_HOME:-~/.cache/quantlab}/tools/llama.cpp-<version>-<sha256 of the cmake flags, 12 hex>/bin;
# a later run finds it there and builds nothing. The version and the GGML flags are read from scripts/setup.sh, so
# the tools run the same ggml kernels as the llama-cpp-python the engine loads (GGML_NATIVE=OFF: a native build
# here also compiles AMX kernels, which this VM's CPU advertises but dies on with SIGILL).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^LLAMA_CPP_VERSION=\([0-9.]*\)$/\1/p' scripts/setup.sh)
SETUP_ARGS=$(sed -n 's/^LLAMA_CMAKE_ARGS="\(.*\)"$/\1/p' scripts/setup.sh)
if [ -z "$VERSION" ] || [ -z "$SETUP_ARGS" ]; then
  echo "build_llama_tools: LLAMA_CPP_VERSION or LLAMA_CMAKE_ARGS not found in scripts/setup.sh" >&2
  exit 1
fi
GGML_ARGS=$(printf '%s\n' $SETUP_ARGS | grep '^-DGGML_' | tr '\n' ' ' | sed 's/ $//')
# Release, shared libraries beside the tools with an $ORIGIN rpath (the folder can move), nothing fetched.
CMAKE_ARGS="$GGML_ARGS -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH=\$ORIGIN"
TARGETS="llama-perplexity llama-bench llama-imatrix llama-quantize"
HASH=$(printf %s "$CMAKE_ARGS" | sha256sum | cut -c1-12)
TOOLS="${QUANTLAB_HOME:-$HOME/.cache/quantlab}/tools"
DEST="$TOOLS/llama.cpp-$VERSION-$HASH"

complete() {
  for t in $TARGETS; do [ -x "$1/bin/$t" ] || return 1; done
}

if ! complete "$DEST"; then
  mkdir -p "$TOOLS"
  WORK=$(mktemp -d "$TOOLS/.build-llama.cpp-$VERSION-$HASH.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  start=$(date +%s)
  PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  echo "build_llama_tools: downloading the llama-cpp-python $VERSION source distribution" >&2
  "$PYTHON" -m pip --disable-pip-version-check -q download --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$WORK/sdist" >&2
  tar -xzf "$WORK"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
  SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
  GENERATOR=()
  if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi
  echo "build_llama_tools: building $TARGETS with $CMAKE_ARGS" >&2
  # shellcheck disable=SC2086  # CMAKE_ARGS is a list of words by construction
  cmake -S "$SRC" -B "$WORK/build" "${GENERATOR[@]}" $CMAKE_ARGS >"$WORK/cmake.log" 2>&1 \
    || { tail -30 "$WORK/cmake.log" >&2; exit 1; }
  # shellcheck disable=SC2086
  cmake --build "$WORK/build" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" --target $TARGETS >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" >&2; exit 1; }
  mkdir -p "$WORK/out"
  cp -a "$WORK/build/bin" "$WORK/out/bin"
  {
    echo "llama-cpp-python $VERSION sdist sha256 $(sha256sum "$WORK"/sdist/*.tar.gz | cut -c1-64)"
    echo "cmake $CMAKE_ARGS"
    echo "targets $TARGETS"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(( $(date +%s) - start )) s"
  } >"$WORK/out/BUILD_INFO"
  cp "$WORK/build.log" "$WORK/out/build.log"
  # One rename puts the folder in place whole; a build finishing first elsewhere wins and this one is dropped.
  mv -T "$WORK/out" "$DEST" 2>/dev/null || complete "$DEST" \
    || { echo "build_llama_tools: $DEST exists but lacks a tool — remove it and run again" >&2; exit 1; }
  echo "build_llama_tools: built in $(( $(date +%s) - start )) s" >&2
fi
echo "$DEST/bin"
