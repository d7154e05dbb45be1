#!/usr/bin/env bash
# Install the Debian packages named on the command line when any is missing.
# As root: apt-get; with passwordless sudo: sudo apt-get; otherwise say what to run.
set -euo pipefail
missing=()
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  apt=(apt-get)
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  apt=(sudo apt-get)
else
  echo "fourbit needs these Debian packages: ${missing[*]}" >&2
  echo "install them with:  sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${apt[@]}" install -y -q "${missing[@]}" >/dev/null \
  || { "${apt[@]}" update -q >/dev/null && "${apt[@]}" install -y -q "${missing[@]}" >/dev/null; }
