#!/usr/bin/env bash
# Installs ONNX Runtime's shared library (CPU build, from the PyPI wheel onnxruntime==1.31.1)
# where vlmserve looks for it: $VLMSERVE_HOME/onnxruntime/1.31.1 (default ~/.local/share/vlmserve).
# Idempotent; needs python3 with pip. For CUDA, `pip install onnxruntime-gpu==1.31.1` instead:
# vlmserve finds it through python3.
set -euo pipefail
VERSION=1.31.1
home=${VLMSERVE_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/vlmserve}
dest="$home/onnxruntime/$VERSION"
if [ -f "$dest/libonnxruntime.so.$VERSION" ]; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "installing ONNX Runtime $VERSION into $dest" >&2
python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "onnxruntime==$VERSION"
python3 - "$tmp" "$dest" <<'PY'
import glob, os, sys, zipfile
src, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(src, "onnxruntime-*.whl"))[0]
os.makedirs(dest + ".tmp", exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("onnxruntime/capi/libonnxruntime"):
            with open(os.path.join(dest + ".tmp", os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
os.replace(dest + ".tmp", dest)
PY
