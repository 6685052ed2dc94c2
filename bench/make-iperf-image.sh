#!/usr/bin/env bash
# Builds an OCI image with busybox (every applet) and Debian's iperf3 with the shared libraries
# it loads, for bench/network.rs: OUT/iperf, tag `latest`, command `sh`.
# Usage: bench/make-iperf-image.sh OUT   (needs umoci, busybox-static and iperf3; runs as root)
set -euo pipefail
out=${1:?usage: make-iperf-image.sh OUT}
for tool in umoci iperf3 ldd; do
    command -v "$tool" >/dev/null || { echo "make-iperf-image: $tool missing" >&2; exit 3; }
done
rm -rf "$out/iperf" "$out/iperf-bundle"
layout=$out/iperf bundle=$out/iperf-bundle
umoci init --layout "$layout"
umoci new --image "$layout:latest"
umoci unpack --image "$layout:latest" "$bundle" >/dev/null
root=$bundle/rootfs
mkdir -p "$root/bin" "$root/tmp" "$root/etc"
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
done
iperf=$(command -v iperf3)
cp "$iperf" "$root/bin/iperf3"
# The loader and every library iperf3 links, at the paths it looks for them.
for lib in $(ldd "$iperf" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
printf 'root:x:0:0:root:/:/bin/sh\n' >"$root/etc/passwd"
chmod 1777 "$root/tmp"
umoci repack --image "$layout:latest" "$bundle"
umoci config --image "$layout:latest" --config.cmd sh --config.env PATH=/bin:/usr/bin
umoci gc --layout "$layout"
rm -rf "$bundle"
