#!/usr/bin/env bash
# Write the Prometheus file_sd targets of one training job: every node of the job, one exporter per
# rank on PORT_BASE + local rank, labelled with the job and the node.
#
#   launch/monitoring/write_targets.sh TARGETS_DIR JOB_NAME PORT_BASE RANKS_PER_NODE
#
# Nodes: `scontrol show hostnames "$SLURM_JOB_NODELIST"`, or MIMAE_TARGET_HOSTS (host names
# separated by spaces or commas) when set, for runs without Slurm. Writes TARGETS_DIR/JOB_NAME.json
# through a temporary file and a rename, so Prometheus never reads half a file. Remove that file
# when the job ends (its targets would otherwise show as down).
set -euo pipefail

usage() {
  echo "usage: $0 TARGETS_DIR JOB_NAME PORT_BASE RANKS_PER_NODE" >&2
  exit 2
}
fail() {
  echo "write_targets.sh: $*" >&2
  exit 2
}

[ "$#" -eq 4 ] || usage
targets_dir=$1
job=$2
port_base=$3
ranks_per_node=$4

# the job name becomes a label value and a file name; host names go into JSON strings unescaped
name_re='^[A-Za-z0-9_.:-]+$'
[[ $job =~ $name_re ]] || fail "JOB_NAME '$job': use letters, digits and _ . : - only"
[[ $port_base =~ ^[0-9]+$ ]] && [ "$port_base" -ge 1 ] || fail "PORT_BASE '$port_base': not a port number"
[[ $ranks_per_node =~ ^[0-9]+$ ]] && [ "$ranks_per_node" -ge 1 ] || fail "RANKS_PER_NODE '$ranks_per_node': not a positive integer"
[ $((port_base + ranks_per_node - 1)) -le 65535 ] || fail "PORT_BASE + RANKS_PER_NODE - 1 exceeds 65535"

if [ -n "${MIMAE_TARGET_HOSTS:-}" ]; then
  read -r -a hosts <<<"${MIMAE_TARGET_HOSTS//,/ }"
else
  [ -n "${SLURM_JOB_NODELIST:-}" ] || fail "neither SLURM_JOB_NODELIST nor MIMAE_TARGET_HOSTS is set"
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
fi
[ "${#hosts[@]}" -ge 1 ] || fail "no hosts in the node list"

groups=()
for host in "${hosts[@]}"; do
  [[ $host =~ $name_re ]] || fail "host name '$host': unexpected characters"
  targets=()
  for ((r = 0; r < ranks_per_node; r++)); do
    targets+=("\"$host:$((port_base + r))\"")
  done
  joined=$(IFS=,; echo "${targets[*]}")
  groups+=("  {\"targets\": [$joined], \"labels\": {\"job\": \"$job\", \"node\": \"$host\"}}")
done

mkdir -p "$targets_dir"
tmp=$(mktemp "$targets_dir/.$job.XXXXXX")  # not *.json: Prometheus ignores it until the rename
trap 'rm -f "$tmp"' EXIT
{
  echo "["
  last=$((${#groups[@]} - 1))
  for i in "${!groups[@]}"; do
    if [ "$i" -lt "$last" ]; then echo "${groups[$i]},"; else echo "${groups[$i]}"; fi
  done
  echo "]"
} >"$tmp"
chmod 0644 "$tmp"
mv -f "$tmp" "$targets_dir/$job.json"
trap - EXIT
