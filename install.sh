#!/usr/bin/env bash
# Installs everything the suite needs on a fresh machine (Python 3.11, Debian/Ubuntu).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -r requirements.txt
# Debian packages: Chromium renders the HTML report in the browser test.
packages=()
command -v chromium > /dev/null || packages+=(chromium)
if [ ${#packages[@]} -gt 0 ]; then
  as_root=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  $as_root apt-get update -q
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"
fi
