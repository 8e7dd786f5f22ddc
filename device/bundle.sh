#!/usr/bin/env bash
# make device-bundle: what a fresh GPU machine needs and cannot download, in pieces small enough to
# carry (docs/GPU.md). BUNDLE_PYTHON (default 3.12, the GPU image's) picks the CPython the binary
# wheels are for; BUNDLE_DIR (default .device_bundle, git-ignored) is where it goes.
#
#   wheels/                the project, DeepSpeed, webdataset and what they need beyond the image (~8 MB)
#   parts/dali.tar.xz.NN   DALI and its NVIDIA libraries (wheels slimmed to one CPython), xz, in parts
#   install.sh, MANIFEST   the installer (docs/GPU.md) and the parts' sizes and sha256
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${BUNDLE_PYTHON:-3.12}
out=${BUNDLE_DIR:-.device_bundle}
python=${PYTHON:-python3}
# One call carries 64 MiB together with the working tree (1.0 MiB in 2026-12): 60 MiB for bundle files
# (a part, or wheels/ with part 00) leave the tree 4 MiB, 2 MiB more than it needs today
# (tests/unit/test_device.py holds the two together).
budget_mib=60
budget=$((budget_mib * 1024 * 1024))
plat=(--only-binary=:all: --python-version "$py" --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# What the GPU image lacks (its package list: docs/GPU.md), at the versions CI tests with.
PY_WHEELS=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
           webdataset==1.0.2 braceexpand==0.1.7 prometheus-client==0.26.0
           typing-extensions==4.16.0)  # pydantic 2.14 needs >= 4.16; the image's version is not known
DALI_WHEELS=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16
             nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82
             astunparse==1.6.3 gast==0.7.0 libcst==1.9.0 makefun==1.16.0 nvtx==0.2.17 optree==0.20.0)
DEEPSPEED=deepspeed==0.19.8

rm -rf "$out" && mkdir -p "$out/wheels" "$out/parts" "$out/tmp/dl" "$out/tmp/dali"
echo "== project wheel, DeepSpeed (no ops built: DS_BUILD_OPS=0), webdataset and their needs (CPython $py)"
"$python" -m pip wheel -q --no-deps -w "$out/wheels" .
DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps -w "$out/wheels" "$DEEPSPEED"
"$python" -m pip download -q --no-deps "${plat[@]}" -d "$out/wheels" "${PY_WHEELS[@]}"
echo "== DALI and its libraries, slimmed to CPython $py"
"$python" -m pip download -q --no-deps "${plat[@]}" -d "$out/tmp/dl" "${DALI_WHEELS[@]}"
for w in "$out"/tmp/dl/*.whl; do "$python" device/slim_wheel.py --python "$py" "$w" "$out/tmp/dali"; done
tar -C "$out/tmp" -cf - dali | xz -"${BUNDLE_XZ_LEVEL:-6}" -T0 > "$out/tmp/dali.tar.xz"
wheels_bytes=$(du -cb "$out"/wheels/*.whl | tail -1 | cut -f1)
"$python" - "$out" "$budget" "$wheels_bytes" "$py" <<'PY'
import hashlib, sys
from pathlib import Path
out, budget, wheels, py = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
data = (out / "tmp" / "dali.tar.xz").read_bytes()
sizes, left = [], len(data)
while left > 0:  # the first part travels beside wheels/, the others alone
    sizes.append(min(left, budget - (wheels if not sizes else 0)))
    left -= sizes[-1]
lines, at = [f"python {py}"], 0
for i, size in enumerate(sizes):
    chunk, at = data[at:at + size], at + size
    name = f"dali.tar.xz.{i:02d}"
    (out / "parts" / name).write_bytes(chunk)
    lines.append(f"part {name} {len(chunk)} {hashlib.sha256(chunk).hexdigest()}")
(out / "MANIFEST").write_text("\n".join(lines) + "\n")
print(f"DALI: {len(data) / 1e6:.1f} MB in {len(sizes)} parts; wheels/: {wheels / 1e6:.1f} MB")
if len(sizes) > 3:
    sys.exit("the bundle needs more than three calls (docs/GPU.md): raise BUNDLE_XZ_LEVEL")
PY
cp device/install.sh "$out/install.sh"
rm -rf "$out/tmp"
ls -la "$out/wheels" "$out/parts"
