#!/usr/bin/env bash
# Installs everything the suite needs on a fresh machine (Python 3.11, Debian/Ubuntu).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -r requirements.txt
