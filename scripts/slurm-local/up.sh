#!/usr/bin/env bash
# Start a local Slurm 22.05 cluster of 2 emulated nodes (n1, n2) on this machine, for tests.
#   scripts/slurm-local/up.sh [STATE_DIR]      (default ${MESHBAKE_SLURM_DIR:-/tmp/meshbake-slurm})
#   source STATE_DIR/env.sh                    (SLURM_CONF for sbatch/squeue/scontrol)
#   scripts/slurm-local/down.sh [STATE_DIR]
# Each node advertises 8 fake GPUs (gres files are symlinks to /dev/null) and 16 CPUs
# (SlurmdParameters=config_overrides lets a node claim more than the host has). The two
# slurmd run in their own UTS + mount namespace with a private /etc/hosts, so each has its
# own hostname and n1 -> 127.0.0.11, n2 -> 127.0.0.12 (both loopback) resolve for the jobs.
set -euo pipefail

DIR="${1:-${MESHBAKE_SLURM_DIR:-/tmp/meshbake-slurm}}"
for bin in slurmctld slurmd munged sbatch scontrol sinfo unshare; do
  command -v "${bin}" >/dev/null || { echo "slurm-local: ${bin} not found; run make install (apt: slurmctld slurmd slurm-client munge)" >&2; exit 1; }
done
if [[ -f "${DIR}/slurmctld.pid" ]] && kill -0 "$(cat "${DIR}/slurmctld.pid")" 2>/dev/null; then
  echo "slurm-local: already up in ${DIR} (source ${DIR}/env.sh)"
  exit 0
fi
mkdir -p "${DIR}"/{state,spool/n1,spool/n2,log,fakegpu,munge}
DIR="$(cd "${DIR}" && pwd)"
CTL_PORT="${MESHBAKE_SLURM_PORT:-16817}"

# munge: own key, socket, pid and log
if [[ ! -f "${DIR}/munge/munge.key" ]]; then
  dd if=/dev/urandom of="${DIR}/munge/munge.key" bs=1 count=1024 status=none
  chmod 400 "${DIR}/munge/munge.key"
fi
chmod 700 "${DIR}/munge"
munged --force --socket="${DIR}/munge/munge.socket" --key-file="${DIR}/munge/munge.key" \
  --pid-file="${DIR}/munge/munged.pid" --log-file="${DIR}/munge/munged.log" --seed-file="${DIR}/munge/munge.seed"

for i in 0 1 2 3 4 5 6 7; do ln -sf /dev/null "${DIR}/fakegpu/nvidia${i}"; done
cat > "${DIR}/gres.conf" <<GRES
Name=gpu File=${DIR}/fakegpu/nvidia[0-7] Flags=no_gpu_env
GRES

cat > "${DIR}/slurm.conf" <<CONF
ClusterName=meshbake-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=${CTL_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${DIR}/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
EnforcePartLimits=ALL
SchedulerParameters=batch_sched_delay=0
MinJobAge=2
ReturnToService=2
JobRequeue=1
MpiDefault=none
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/%n
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd-%n.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
NodeName=n1 NodeAddr=127.0.0.11 Port=16818 CPUs=16 Gres=gpu:8 RealMemory=8000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.12 Port=16819 CPUs=16 Gres=gpu:8 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF

printf 'export SLURM_CONF=%q\n' "${DIR}/slurm.conf" > "${DIR}/env.sh"
export SLURM_CONF="${DIR}/slurm.conf"

slurmctld -f "${SLURM_CONF}"
for node in n1 n2; do
  cat > "${DIR}/hosts-${node}" <<HOSTS
127.0.0.1 localhost
127.0.0.11 n1
127.0.0.12 n2
HOSTS
  # own hostname and /etc/hosts for this node; slurmd daemonizes inside the namespaces
  # shellcheck disable=SC2016  # expanded by the inner bash
  unshare --uts --mount --propagation private bash -c \
    'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -f "$3" -N "$1"' \
    _ "${node}" "${DIR}/hosts-${node}" "${SLURM_CONF}"
done

for _ in $(seq 1 150); do
  idle="$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle"' | wc -l)"
  if [[ "${idle}" == 2 ]]; then
    echo "slurm-local: 2 nodes idle (state in ${DIR}; source ${DIR}/env.sh)"
    exit 0
  fi
  sleep 0.2
done
echo "slurm-local: nodes did not become idle in 30 s:" >&2
sinfo -N -l >&2 || true
tail -n 20 "${DIR}"/log/*.log >&2 || true
exit 1
