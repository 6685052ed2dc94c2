#!/usr/bin/env bash
# Builds a realistic "Debian + python3" OCI image from Debian's packages for bench/pull.rs:
# OUT/python, tag `latest`, three layers like a Dockerfile's: a bookworm minbase root
# (debootstrap), then python3 with pip and numpy (apt-get in a chroot), then a small app.
# About 330 MB unpacked (125 MB compressed). Needs debootstrap and umoci, root, and deb.debian.org (or $MIRROR).
# Usage: bench/make-python-image.sh OUT
set -euo pipefail
out=${1:?usage: make-python-image.sh OUT}
mirror=${MIRROR:-http://deb.debian.org/debian}
for tool in debootstrap umoci; do
    command -v "$tool" >/dev/null || { echo "make-python-image: $tool missing (apt-get install $tool)" >&2; exit 3; }
done
layout=$out/python bundle=$out/python-bundle
rm -rf "$layout" "$bundle"
mkdir -p "$out"
umoci init --layout "$layout"
umoci new --image "$layout:latest"
umoci unpack --image "$layout:latest" "$bundle" >/dev/null
root=$bundle/rootfs
clean() {
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* \
        "$root"/tmp/* "$root"/run/*
}
debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
clean
umoci repack --refresh-bundle --image "$layout:latest" "$bundle"
for fs in proc sys dev; do mount --bind "/$fs" "$root/$fs"; done
trap 'for fs in proc sys dev; do umount "$root/$fs" 2>/dev/null || true; done' EXIT
chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-pip python3-numpy >/dev/null'
for fs in proc sys dev; do umount "$root/$fs"; done
trap - EXIT
clean
umoci repack --refresh-bundle --image "$layout:latest" "$bundle"
mkdir -p "$root/app"
printf 'import numpy, sys\nprint("numpy", numpy.__version__, "on python", sys.version.split()[0])\n' >"$root/app/main.py"
umoci repack --refresh-bundle --image "$layout:latest" "$bundle"
umoci config --image "$layout:latest" --config.cmd python3 --config.cmd /app/main.py \
    --config.env PATH=/usr/local/bin:/usr/bin:/bin --config.workingdir /app
umoci gc --layout "$layout"
rm -rf "$bundle"
du -sh "$layout" >&2
