#!/usr/bin/env bash
# onnxruntime's C API headers, which rsedge's kernels are compiled against (rsedge/kernels/build.py) and which no
# onnxruntime wheel carries: taken from Debian's libonnxruntime-dev package (trixie: onnxruntime 1.21, C API 21; the
# kernels ask for API 17, so any onnxruntime >= 1.17 loads them), unpacked into the per-user folder the build looks
# in. Needs apt-get and dpkg-deb (Debian, Ubuntu, JetPack); nothing is installed system-wide.
#   scripts/fetch_ort_headers.sh [DEST]   (default: ${XDG_CACHE_HOME:-~/.cache}/rsedge/ort-include)
set -euo pipefail
dest=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/rsedge/ort-include}
if [ -f "$dest/onnxruntime_c_api.h" ]; then
  echo "onnxruntime headers already in $dest"
  exit 0
fi
for tool in apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "fetch_ort_headers: $tool not found (Debian/Ubuntu tools)" >&2; exit 1; }
done
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
if [ ! -f "$keyring" ]; then  # Ubuntu (JetPack) does not carry Debian's archive key
  echo "fetch_ort_headers: $keyring missing; install it (apt-get install debian-archive-keyring)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/parts"
# A private apt state naming only Debian trixie's main archive: the system's sources and lists are not touched. The
# amd64 package on every machine: its headers are the same for every architecture.
cat > "$work/parts/trixie.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: $keyring
SRC
apt_opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/parts" -o "Dir::State::Lists=$work/lists"
  -o "Dir::Cache::Archives=$work/archives" -o APT::Architecture=amd64 -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" update -qq
(cd "$work" && apt-get "${apt_opts[@]}" download -qq libonnxruntime-dev)
dpkg-deb -x "$work"/libonnxruntime-dev_*.deb "$work/x"
mkdir -p "$dest"
cp "$work"/x/usr/include/onnxruntime/*.h "$dest/"
echo "onnxruntime headers ($(ls "$dest" | wc -l) files, from $(basename "$work"/libonnxruntime-dev_*.deb)) in $dest"
