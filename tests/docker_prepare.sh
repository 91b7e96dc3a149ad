#!/usr/bin/env bash
# What the Docker tests need and must not download while they run (tests/run.sh calls this in its
# install phase; a second run reuses it): a Debian bookworm filesystem with Python, made with
# debootstrap (the engine's base image, since no image registry is reachable), and the wheels the
# image's pip installs from a server on the test's loopback. Needs root, debootstrap and network.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=.cache/docker
mkdir -p "$cache"

if [ ! -s "$cache/bookworm-python.tar" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "debootstrap: Debian bookworm (minbase, python3, python3-venv), about a minute"
  debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv \
    bookworm "$work/fs" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
  # Package lists and logs are no part of an image.
  rm -rf "$work/fs/var/cache/apt/archives/"*.deb "$work/fs/var/lib/apt/lists/"* "$work/fs/var/log/"*
  tar -C "$work/fs" -cf "$cache/bookworm-python.tar.part" . && mv "$cache/bookworm-python.tar.part" "$cache/bookworm-python.tar"
fi

# The image's pinned dependencies, and the build backend pyproject.toml names.
if ! [ -f "$cache/wheels/.complete" ] || [ packaging/requirements.lock -nt "$cache/wheels/.complete" ]; then
  rm -rf "$cache/wheels"
  .venv/bin/python -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --python-version 3.11 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --implementation cp \
    -d "$cache/wheels" -r packaging/requirements.lock "setuptools>=77" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  touch "$cache/wheels/.complete"
fi
