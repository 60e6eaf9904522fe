#!/usr/bin/env bash
# Installs the Debian packages cvops' tests and local stack need, where they are missing.
# Usage: scripts/install-system-deps.sh [package ...]   (default: the test set below)
set -euo pipefail
packages=("$@")
[ ${#packages[@]} -gt 0 ] || packages=(postgresql)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing system packages: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
