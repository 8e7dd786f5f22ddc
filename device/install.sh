#!/usr/bin/env bash
# Installs the offline bundle (make device-bundle) into this machine's python3, over as many device
# calls as the bundle has parts (docs/GPU.md); run it at the start of every call. What arrives is
# kept in $MIMAE_STAGE (default /tmp/mimae_stage), which lasts as long as the machine stays warm.
#   wheels/ carried (call 1): DeepSpeed, webdataset, prometheus-client and the project (no DALI yet)
#   every part of MANIFEST staged (last call): DALI, then an import of everything the project needs
# Nothing is fetched: pip runs with --no-index, from the bundle and what the image already has.
# A bundle built for another Python (MANIFEST's first line) is refused before anything is installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
stage=${MIMAE_STAGE:-/tmp/mimae_stage}
# The bundle's binary wheels (pydantic-core, DALI) are for one CPython: refuse any other, in one line.
[[ -f $here/MANIFEST ]] || { echo "install.sh: $here/MANIFEST missing: not a bundle of make device-bundle" >&2; exit 1; }
want=$(awk '$1 == "python" {print $2}' "$here/MANIFEST")
have=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ $want != "$have" ]]; then
  echo "install.sh: $here/MANIFEST says the bundle is for Python ${want:-?}, but $py is $have: rebuild with BUNDLE_PYTHON=$have make device-bundle" >&2
  exit 1
fi
mkdir -p "$stage/parts"
pip_offline() { "$py" -m pip install -q --no-index --no-cache-dir --disable-pip-version-check "$@"; }

for part in "$here"/parts/dali.tar.xz.*; do  # first: a failed install below must not lose the part
  if [[ -f $part ]]; then cp "$part" "$stage/parts/"; fi
done
if [[ -d $here/wheels ]]; then
  rm -rf "$stage/wheels" && cp -r "$here/wheels" "$stage/wheels"
  pip_offline --find-links "$stage/wheels" deepspeed webdataset prometheus-client
  pip_offline --no-deps --force-reinstall "$stage"/wheels/mimae_scale-*.whl
  echo "install.sh: DeepSpeed, webdataset, prometheus-client and mimae-scale installed (DALI not yet)"
fi
missing=()
while read -r kind name _ sha; do
  [[ $kind == part ]] || continue
  if [[ ! -f $stage/parts/$name ]] || [[ $(sha256sum "$stage/parts/$name" | cut -d' ' -f1) != "$sha" ]]; then
    missing+=("$name")
  fi
done < "$here/MANIFEST"
if (( ${#missing[@]} )); then
  echo "install.sh: DALI not installed, parts not here: ${missing[*]} (docs/GPU.md: DALI is not in the plan)"
elif ! "$py" -c "import nvidia.dali" 2>/dev/null; then
  [[ -d $stage/wheels ]] || { echo "install.sh: wheels/ never arrived (call 1 carries it)" >&2; exit 1; }
  rm -rf "$stage/dali"
  cat "$stage"/parts/dali.tar.xz.* | xz -d -T0 | tar -x -C "$stage"
  pip_offline --find-links "$stage/dali" --find-links "$stage/wheels" nvidia-dali-cuda130
  # the project itself went in with --no-deps (call 1): re-resolving its whole tree would make pip
  # re-judge the image's own packages (timm -> huggingface-hub -> ...); importing is the check
  "$py" -c "import nvidia.dali, deepspeed, webdataset, prometheus_client, timm, mimae_scale.kernels"
  echo "install.sh: DALI installed; DALI, DeepSpeed, webdataset, timm and the kernels import"
else
  echo "install.sh: DALI already installed"
fi
