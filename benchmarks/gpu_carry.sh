#!/usr/bin/env bash
# What the device machine lacks, packed into as few parts as one device call each can
# carry: DALI for CUDA 13 (the device's CUDA; the cuda130 wheel is 199 MB against the
# cuda120 build's 424 MB), the nvImageCodec and nvJPEG it decodes JPEGs with,
# webdataset, simplejpeg, and the four Fashion-MNIST files for the quality stage.
#
# usage: benchmarks/gpu_carry.sh [OUT_DIR [PART_MIB]]     (default .gpu/carry 60)
#
# Versions come from requirements.lock, so the device runs the DALI the CPU suite
# pins; only the CUDA-13 builds (DALI, nvImageCodec, nvJPEG) are named here. The
# wheels are unpacked rather than carried whole: the other Pythons' builds of the
# compiled modules are dropped (the device runs 3.12) and xz over the unpacked files
# is about a third smaller than the wheels' zip. Left out on purpose: nvCOMP,
# nvJPEG2000 and nvTIFF (DALI opens them only for those formats, and says so if one
# is asked for). The device's own python3 already holds torch, numpy, pillow, pyyaml,
# six and packaging (../.library/device/KINDS.md).
#
# On the device, with every part in OUT_DIR (benchmarks/gpu_session.sh's install
# stage runs this itself):   bash OUT_DIR/assemble.sh /tmp/site .gpu/fmnist
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/.gpu/carry}; mib=${2:-60}
fmnist=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
# OUT_DIR is emptied first: refuse one that holds anything this script did not write.
if [ -d "$out" ] && find "$out" -mindepth 1 ! -name 'part-*' ! -name SHA256SUMS ! -name assemble.sh | grep -q .; then
  echo "gpu_carry: $out holds other files; give an empty or new folder" >&2; exit 2
fi
# One pin per name; the lock may list a name twice (one version per Python): then the first.
pin() {
  local line; line=$(grep -E "^$1==" "$repo/requirements.lock" | sed 's/ .*//' | head -1 || true)
  [ -n "$line" ] || { echo "gpu_carry: $1 is not pinned in requirements.lock" >&2; exit 2; }
  echo "$line"
}
dali=$(pin nvidia-dali-cuda120); dali_version=${dali#*==}
codec=$(pin nvidia-nvimgcodec-cu12); codec_version=${codec#*==}
# nvJPEG of CUDA 13.0, the driver's own minor version: nothing relies on minor-version
# compatibility.
reqs=("nvidia-dali-cuda130==$dali_version" "nvidia-nvimgcodec-cu13==$codec_version" "nvidia-nvjpeg==13.0.4.44")
for name in astunparse gast optree nvtx makefun libcst webdataset braceexpand simplejpeg; do
  line=$(pin "$name")
  reqs+=("$line")
done
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  [ -f "$fmnist/$f.gz" ] || { echo "gpu_carry: $fmnist/$f.gz missing (set FASHION_MNIST_DIR)" >&2; exit 2; }
done

tmp=$(mktemp -d /tmp/gpu-carry.XXXXXX); trap 'rm -rf "$tmp"' EXIT
plat=(); for n in 17 24 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp/wheels" "${reqs[@]}"
mkdir -p "$tmp/bundle/site" "$tmp/bundle/fmnist"
for wheel in "$tmp"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$tmp/bundle/site"; done
find "$tmp/bundle/site" -name '*.cpython-3*.so' ! -name '*.cpython-312-*' -delete
# Raw IDX files: xz packs them tighter than their gzip; assemble.sh gzips them back.
for f in "$fmnist"/*-ubyte.gz; do gzip -dc "$f" > "$tmp/bundle/fmnist/$(basename "$f" .gz)"; done
printf '%s\n' "${reqs[@]}" > "$tmp/bundle/site/CARRIED.txt"

rm -rf "$out"; mkdir -p "$out"
tar -C "$tmp/bundle" -cf - site fmnist | xz -9 -T0 > "$tmp/bundle.tar.xz"
split -b "${mib}M" -d -a 2 "$tmp/bundle.tar.xz" "$out/part-"
( cd "$out" && sha256sum part-* ) > "$out/SHA256SUMS"
cat > "$out/assemble.sh" <<'EOS'
#!/usr/bin/env bash
# Check the parts beside this script, join them, unpack the packages into SITE and the
# Fashion-MNIST files, gzipped again, into FMNIST_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
site=${1:?usage: assemble.sh SITE_DIR [FMNIST_DIR]}; fmnist=${2:-}
( cd "$here" && sha256sum -c --quiet SHA256SUMS )
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# The parts SHA256SUMS lists, in its order: a stray part left on a warm machine is not read.
parts=(); while read -r _ name; do parts+=("$here/$name"); done < "$here/SHA256SUMS"
if command -v xz >/dev/null; then cat "${parts[@]}" | xz -dc -T0 | tar -C "$tmp" -xf -
else cat "${parts[@]}" | python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)' | tar -C "$tmp" -xf -; fi
mkdir -p "$site" && cp -a "$tmp/site/." "$site/"
if [ -n "$fmnist" ]; then mkdir -p "$fmnist"; for f in "$tmp"/fmnist/*; do gzip -1 -c "$f" > "$fmnist/$(basename "$f").gz"; done; fi
echo "installed into $site: $(tr '\n' ' ' < "$site/CARRIED.txt")"
EOS
chmod +x "$out/assemble.sh"
echo "$(ls "$out"/part-* | wc -l) parts of at most $mib MiB in $out:"
ls -l "$out"
