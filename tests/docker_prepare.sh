#!/usr/bin/env bash
# What the Docker tests need and must not download while they run (tests/run.sh calls this in its
# install phase; a second run reuses it): a Debian bookworm filesystem with Python, made with
# debootstrap (the engine's base image, since no image registry is reachable), a second one with
# Debian's PostgreSQL, Redis and nginx (the team Compose test's stand-ins for the official
# postgres, redis and nginx images, tests/docker_engine.py), and the wheels the image's pip
# installs from a server on the test's loopback. Needs root, debootstrap and network.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=.cache/docker
mkdir -p "$cache"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ ! -s "$cache/bookworm-python.tar" ]; then
  echo "debootstrap: Debian bookworm (minbase, python3, python3-venv), about a minute"
  debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv \
    bookworm "$work/fs" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
  # Package lists and logs are no part of an image.
  rm -rf "$work/fs/var/cache/apt/archives/"*.deb "$work/fs/var/lib/apt/lists/"* "$work/fs/var/log/"*
  tar -C "$work/fs" -cf "$cache/bookworm-python.tar.part" . && mv "$cache/bookworm-python.tar.part" "$cache/bookworm-python.tar"
fi

# The stand-ins' filesystem: Debian's own server packages. debootstrap configures them with
# services blocked (its policy-rc.d), so nothing starts on this machine while it runs; the
# cluster postgresql-common creates is removed, the stand-in makes its own from the environment.
if [ ! -s "$cache/bookworm-services.tar" ]; then
  echo "debootstrap: Debian bookworm (minbase, postgresql, redis-server, nginx-light), about two minutes"
  debootstrap --variant=minbase --include=postgresql,redis-server,nginx-light \
    bookworm "$work/services" >"$work/services.log" 2>&1 || { tail -20 "$work/services.log"; exit 1; }
  rm -rf "$work/services/var/cache/apt/archives/"*.deb "$work/services/var/lib/apt/lists/"* \
    "$work/services/var/log/"* "$work/services/var/lib/postgresql/"* "$work/services/etc/postgresql/"*
  tar -C "$work/services" -cf "$cache/bookworm-services.tar.part" . \
    && mv "$cache/bookworm-services.tar.part" "$cache/bookworm-services.tar"
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
