#!/usr/bin/env bash
# Installs everything the suite needs on a fresh machine (Python 3.11, Debian/Ubuntu).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -r requirements.txt
python -m pip install -r requirements-converter.txt  # see that file: it cannot resolve with the line above
python -m pip install "typing-extensions>=4.13"      # TVM's FFI floor, which the converter's xdsl pin lowered
# Debian packages: Chromium renders the HTML report in the browser test; the host gcc builds the qemu
# plugin that counts Cortex-M instructions by address; the cross compilers build
# for aarch64 boards and Cortex-M parts; qemu runs the emulated aarch64 board (user mode) and the
# microcontroller firmware (system mode); OpenSSH's server lets the tests bring a "board" up over SSH.
packages=()
command -v chromium > /dev/null || packages+=(chromium)
command -v gcc > /dev/null || packages+=(gcc)  # the qemu instruction-counting plugin and the host C tests
command -v aarch64-linux-gnu-g++ > /dev/null || packages+=(g++-aarch64-linux-gnu)
command -v arm-none-eabi-gcc > /dev/null || packages+=(gcc-arm-none-eabi libnewlib-arm-none-eabi)
command -v qemu-system-arm > /dev/null || packages+=(qemu-system-arm)
command -v qemu-aarch64-static > /dev/null || packages+=(qemu-user-static binfmt-support)
command -v debootstrap > /dev/null || packages+=(debootstrap)
[ -x /usr/sbin/sshd ] || packages+=(openssh-server)
if [ ${#packages[@]} -gt 0 ]; then
  as_root=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  $as_root apt-get update -q
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"
fi
# The emulated aarch64 board's Debian root filesystem (build/boards/, about 5 min once, reused after):
# the remote-board tests run against it. It needs root (debootstrap, chroot, binfmt_misc); without it
# those tests are skipped.
invoke board.rootfs || echo "warning: the emulated board's rootfs was not built; remote-board tests will be skipped" >&2
