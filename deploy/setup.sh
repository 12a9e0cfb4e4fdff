#!/usr/bin/env bash
# Installs the Debian packages stpipe builds and runs with, and node/npm for the `openai`
# client test (tests/openai). Run as root (or with sudo).
# Usage: deploy/setup.sh [--with-clang]
set -euo pipefail
PKGS=(build-essential cmake pkg-config
      libzmq3-dev libprotobuf-c-dev protobuf-c-compiler libnuma-dev
      libpcre2-dev libutf8proc-dev liburing-dev libjansson-dev libcmocka-dev libmicrohttpd-dev
      nodejs npm)
if [[ "${1:-}" == "--with-clang" ]]; then PKGS+=(clang libclang-rt-14-dev clang-format); fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
missing=()
for p in "${PKGS[@]}"; do
  # a nodejs from elsewhere (NodeSource) ships npm itself and conflicts with Debian's npm
  if [[ ($p == nodejs && -x "$(command -v node)") || ($p == npm && -x "$(command -v npm)") ]]; then
    continue
  fi
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "stpipe setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
else
  echo "stpipe setup: all packages present"
fi
