#!/usr/bin/env bash
# Installs the Debian packages the test suite needs, when they are missing:
# chromium for the dashboard's browser test, npm (and with it Node.js) for the
# test of a producer written in JavaScript. As root it installs them; otherwise
# it says what is missing (and, under CI=true, such a test then fails, never skips).
set -euo pipefail
PACKAGES=(chromium npm)
missing=()
for pkg in "${PACKAGES[@]}"; do
  command -v "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "system packages missing: ${missing[*]} (run 'make system-packages' as root)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "system packages missing: ${missing[*]}; no apt-get to install them" >&2
  exit 0
fi
echo "installing system packages: ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
