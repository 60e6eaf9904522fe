#!/bin/sh
# Print requirements.lock adapted to a Debian architecture: lock-for-arch.sh LOCK [ARCH].
#
# The lock pins tensorflow-cpu, which publishes x86_64 (and Windows) wheels only. On aarch64 the
# `tensorflow` wheel of the same version is the CPU build with the same dependencies, so arm64
# swaps the distribution name and keeps the pin; every other pin has wheels (or a pure-Python
# sdist) for both. ARCH defaults to the architecture of the image being built, so one Dockerfile
# builds unchanged on amd64 and arm64 hosts (and under buildx for either platform).
set -eu
lock=$1
arch=${2:-$(dpkg --print-architecture)}
case "$arch" in
  amd64) cat "$lock" ;;
  arm64) sed 's/^tensorflow-cpu==/tensorflow==/' "$lock" ;;
  *)
    echo "lock-for-arch.sh: unsupported architecture '$arch' (amd64 and arm64 are)" >&2
    exit 1
    ;;
esac
