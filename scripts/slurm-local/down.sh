#!/usr/bin/env bash
# Stop the local Slurm cluster started by up.sh: the daemons by their pid files, then the dir.
set -euo pipefail

DIR="${1:-${MESHBAKE_SLURM_DIR:-/tmp/meshbake-slurm}}"
[[ -d "${DIR}" ]] || { echo "slurm-local: nothing in ${DIR}"; exit 0; }
pids=()
for f in "${DIR}"/slurmd-n1.pid "${DIR}"/slurmd-n2.pid "${DIR}"/slurmctld.pid "${DIR}"/munge/munged.pid; do
  if [[ -f "${f}" ]]; then
    pid="$(cat "${f}")"
    if kill -0 "${pid}" 2>/dev/null; then kill -TERM "${pid}" && pids+=("${pid}"); fi
  fi
done
for _ in $(seq 1 100); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "${pid}" 2>/dev/null && alive=1; done
  [[ "${alive}" == 0 ]] && break
  sleep 0.1
done
for pid in "${pids[@]}"; do kill -KILL "${pid}" 2>/dev/null || true; done
rm -rf "${DIR}"
echo "slurm-local: stopped ${#pids[@]} daemons, removed ${DIR}"
