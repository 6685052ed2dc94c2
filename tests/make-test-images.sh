#!/usr/bin/env bash
# Builds OCI test images offline with umoci and Debian's busybox-static:
#   OUT/demo            an OCI layout, tag `latest`, two layers: the lower has busybox, /etc/gone
#                       and /etc/app/{old,keep}; the upper deletes /etc/gone (a whiteout) and
#                       replaces /etc/app (deleted, made again with only `new`); the config sets
#                       entrypoint, cmd, env, workdir and user.
#   OUT/demo.oci.tar    the same layout as an oci-archive.
#   OUT/box             an OCI layout, tag `latest`, one layer: busybox with every applet,
#                       /etc/passwd and /etc/group with root and user 1000; no entrypoint, cmd
#                       `sh` (the engines' tests: podman, docker and containerd load it).
# Usage: tests/make-test-images.sh OUT   (needs umoci and busybox-static; runs as root)
set -euo pipefail
out=${1:?usage: make-test-images.sh OUT}
command -v umoci >/dev/null || { echo "make-test-images: umoci missing (apt-get install umoci)" >&2; exit 3; }
[[ -x /bin/busybox ]] || { echo "make-test-images: /bin/busybox missing (apt-get install busybox-static)" >&2; exit 3; }
rm -rf "$out" && mkdir -p "$out"
layout=$out/demo bundle=$out/bundle
umoci init --layout "$layout"
umoci new --image "$layout:latest"
umoci unpack --image "$layout:latest" "$bundle" >/dev/null
root=$bundle/rootfs
mkdir -p "$root/bin" "$root/etc/app" "$root/tmp" "$root/work"
cp /bin/busybox "$root/bin/busybox"
for applet in sh ls cat echo env id pwd true; do ln -s busybox "$root/bin/$applet"; done
echo gone >"$root/etc/gone"
echo old >"$root/etc/app/old"
echo keep >"$root/etc/app/keep"
chmod 1777 "$root/tmp"
umoci repack --image "$layout:latest" "$bundle"
rm -rf "$bundle"
umoci unpack --image "$layout:latest" "$bundle" >/dev/null
root=$bundle/rootfs
rm "$root/etc/gone"
rm -rf "$root/etc/app"
mkdir "$root/etc/app"
echo new >"$root/etc/app/new"
umoci repack --image "$layout:latest" "$bundle"
rm -rf "$bundle"
umoci config --image "$layout:latest" \
    --config.entrypoint /bin/sh --config.entrypoint -c \
    --config.cmd 'echo hello' \
    --config.env PATH=/bin --config.env GREETING=hi \
    --config.workingdir /work --config.user 1000:1000
umoci gc --layout "$layout"
tar -C "$layout" -cf "$out/demo.oci.tar" .

# The engines' image: a shell and the usual tools.
layout=$out/box bundle=$out/box-bundle
umoci init --layout "$layout"
umoci new --image "$layout:latest"
umoci unpack --image "$layout:latest" "$bundle" >/dev/null
root=$bundle/rootfs
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/home/user" "$root/proc" "$root/sys" "$root/dev"
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
    [[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nuser:x:1000:\n' >"$root/etc/group"
chmod 1777 "$root/tmp"
chown 1000:1000 "$root/home/user"
umoci repack --image "$layout:latest" "$bundle"
rm -rf "$bundle"
umoci config --image "$layout:latest" --config.cmd sh --config.env PATH=/bin
umoci gc --layout "$layout"
