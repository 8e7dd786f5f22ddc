#!/usr/bin/env bash
# One device call of docs/GPU.md, run from the checkout's root:
#   bash device/call.sh <sections> <seconds the command may take> [more mimae-bench gpu options]
# installs the carried bundle (.device_bundle/, or $MIMAE_BUNDLE) and then runs
# `mimae-bench gpu` (as python -m mimae_scale.bench gpu) on the sections, writing each result straight into $OUT as it
# finishes, so that whatever finished comes back even when the call is cut off. An install that
# fails is recorded ($OUT/install.log and the JSON's "install") and the sections run anyway: env,
# kernels and kernel-time need only the image's torch and Triton and this checkout.
set -uo pipefail
out=${OUT:?OUT: the folder whose files come back from the device call}
sections=${1:?sections, e.g. env,kernels,step,kernel-time} limit=${2:?seconds the command may take}
shift 2
bundle=${MIMAE_BUNDLE:-.device_bundle}
py=${PYTHON:-python3}
began=$SECONDS
# today's results of an earlier call, committed to bench/results/ and so carried: this call adds to them
cp bench/results/"$(date -u +%F)"-*.json "$out"/ 2>/dev/null || true
if [[ -f $bundle/install.sh ]]; then
  bash "$bundle/install.sh" >"$out/install.log" 2>&1
  status=$?
else
  echo "device/call.sh: $bundle/install.sh was not carried" >"$out/install.log"
  status=127
fi
echo "install.sh exit status $status" >>"$out/install.log"
tail -n 4 "$out/install.log"
# 10 s of the limit stay for the last write and the copy back; the bench knows its deadline
left=$((limit - (SECONDS - began) - 10))
((left > 30)) || { echo "device/call.sh: ${left} s left of ${limit} s after install.sh: no section started" >&2; exit 1; }
PYTHONUNBUFFERED=1 timeout -k 5 "$left" "$py" -m mimae_scale.bench gpu --only "$sections" --out "$out" \
  --install-log "$out/install.log" --deadline-s "$left" "$@"
