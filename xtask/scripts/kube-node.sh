#!/bin/sh
# What the real-node tests need besides the API server (kube-apiserver.sh
# runs first and leaves the Kubernetes v1.20.2 source tree and its Go cache
# in $SLUICE_KUBE_CACHE): Debian's containerd, runc, CNI plugins, buildah and
# busybox-static; kubelet, kube-scheduler, kube-controller-manager and
# kube-proxy built from the same source tree; and two images built offline
# from scratch with buildah: the pause image (from the tree's pause.c) and a
# busybox workload image (httpd, nc, wget, sh). All cached; reruns skip what
# is there.
set -eu
W=${SLUICE_KUBE_CACHE:-/var/cache/sluice-kube}
K=$W/kubernetes-1.20.2
export DEBIAN_FRONTEND=noninteractive
need=""
for p in containerd runc containernetworking-plugins buildah busybox-static conntrack socat gcc libc6-dev iptables nftables; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
  apt-get update -q
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends $need
fi
mkdir -p "$W/bin" "$W/images"
missing=""
for b in kubelet kube-scheduler kube-controller-manager kube-proxy; do
  [ -x "$W/bin/$b" ] || missing="$missing cmd/$b"
done
if [ -n "$missing" ]; then
  [ -d "$K" ] || { echo "kube-node: $K missing (run kube-apiserver.sh first)" >&2; exit 1; }
  cd "$K"
  export GOPATH="$K/.go" GOCACHE="$W/gocache" CGO_ENABLED=0 GOFLAGS= GOPROXY=off
  echo "kube-node: building$missing (about 2 minutes after the API server's build, 5 cold)"
  # shellcheck disable=SC2086
  make WHAT="$missing"
  for b in $missing; do
    b=${b#cmd/}
    cp "_output/bin/$b" "$W/bin/$b.tmp"
    mv "$W/bin/$b.tmp" "$W/bin/$b"
  done
fi
B="buildah --root $W/buildah/root --runroot $W/buildah/run --storage-driver vfs"
I=$W/images
if [ ! -f "$I/pause.tar" ]; then
  T=$(mktemp -d)
  gcc -Os -Wall -Werror -static -DVERSION=v3.4-sluice -o "$T/pause" "$K/build/pause/linux/pause.c"
  strip "$T/pause"
  c=$($B from scratch)
  $B copy "$c" "$T/pause" /pause
  $B config --entrypoint '["/pause"]' "$c"
  $B commit -q "$c" localhost/pause:3.4 >/dev/null
  $B push -q localhost/pause:3.4 "oci-archive:$I/pause.tar.tmp:localhost/pause:3.4"
  $B rm "$c" >/dev/null
  mv "$I/pause.tar.tmp" "$I/pause.tar"
  rm -rf "$T"
fi
if [ ! -f "$I/busybox.tar" ]; then
  T=$(mktemp -d)
  R=$T/root
  mkdir -p "$R/bin" "$R/etc" "$R/tmp" "$R/www" "$R/root"
  cp /bin/busybox "$R/bin/busybox"
  for a in $("$R/bin/busybox" --list); do
    [ "$a" = busybox ] || ln -s busybox "$R/bin/$a"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$R/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$R/etc/group"
  echo ok > "$R/www/healthz"
  echo "hello from busybox httpd" > "$R/www/index.html"
  chmod 1777 "$R/tmp"
  c=$($B from scratch)
  $B copy "$c" "$R/" /
  $B config --env PATH=/bin --workingdir / --cmd '["httpd","-f","-p","8080","-h","/www"]' "$c"
  $B commit -q "$c" localhost/busybox:1 >/dev/null
  $B push -q localhost/busybox:1 "oci-archive:$I/busybox.tar.tmp:localhost/busybox:1"
  $B rm "$c" >/dev/null
  mv "$I/busybox.tar.tmp" "$I/busybox.tar"
  rm -rf "$T"
fi
echo "kube-node: binaries in $W/bin, images in $I"
