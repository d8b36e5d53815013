# Shared settings for tests/lab/up, tests/lab/down and tests/lab/blocker.
# Sourced, not executed.

LAB_ROOT="${ALVIS_LAB_ROOT:-/var/lib/alvis-lab}"
LAB_CLIENT="$LAB_ROOT/client"
LAB_USER=pradas
LAB_HOME=/home/pradas
# A second cluster user, for isolation tests: someone else on the cluster.
LAB_USER2=kovacs
LAB_HOME2=/home/kovacs
# The cluster users of the further test streams (`pytest -n 2` on
# tests/integration: worker gw0 is LAB_USER, gw1 the first of these), each
# with its own home, SLURM associations and client dir $LAB_ROOT/client-USER.
LAB_STREAM_USERS="lindqvist"
LAB_ACCOUNT=naiss2025-22-1522
LAB_CLUSTER=alvis
LAB_LOGIN_HOST=alvis2
LAB_LOGIN_PORT=22022
LAB_NODE=alvis7-07
LAB_NODE_PORT=22023
LAB_NODE_GPU_TYPE=A40
LAB_NODE_GPU_GB=48
LAB_NODE_GPUS=4
# A second compute node of another GPU type (Alvis' A100fat nodes are alvis4-*),
# in the same partition: its own namespace, hostname, slurmd (port 6820) and sshd.
LAB_NODE2=alvis4-01
LAB_NODE2_PORT=22024
LAB_NODE2_SLURMD_PORT=6820
LAB_NODE2_GPU_TYPE=A100fat
LAB_NODE2_GPU_GB=80
LAB_NODE2_GPUS=4
LAB_MYSQL_PORT=33306
LAB_NODE_TMP_ROOT="$LAB_ROOT/node-local"
LAB_RUN="$LAB_ROOT/run"
LAB_LOG="$LAB_ROOT/log"
LAB_ETC="$LAB_ROOT/etc"
LAB_LOGIN_SSHD_LOG="$LAB_LOG/sshd-login.log"
LAB_NODE_SSHD_LOG="$LAB_LOG/sshd-node.log"
LAB_NODE2_SSHD_LOG="$LAB_LOG/sshd-node2.log"
# Each node's GPU facts (type, memory), on a small tmpfs private to the node's
# namespace: the vllm stand-in reads them there (tests/lab/bin/vllm).
LAB_NODE_INFO="$LAB_ROOT/node-info"
LAB_SLURMCTLD_LOG="$LAB_LOG/slurmctld.log"
# One slurmd per node: slurm.conf names its pid file, spool dir and log by %n.
LAB_SLURMD_LOG="$LAB_LOG/slurmd-$LAB_NODE.log"
LAB_NODE2_SLURMD_LOG="$LAB_LOG/slurmd-$LAB_NODE2.log"
LAB_SLURMDBD_LOG="$LAB_LOG/slurmdbd.log"
LAB_MUNGE_LOG="$LAB_LOG/munged.log"
LAB_MYSQL_LOG="$LAB_LOG/mariadb.log"
LAB_SLURM_CONF=/etc/slurm/slurm.conf
LAB_MODELS=/mimer/NOBACKUP/Datasets/LLM/huggingface/hub
# LoRA adapters of the lab models (tests/lab/realvllm/make_adapter.py), where
# a research group keeps shared files on Alvis; readable by every cluster user.
LAB_ADAPTERS=/mimer/NOBACKUP/groups/alvislab/adapters
LAB_IMAGE=/apps/containers/vLLM/vllm-0.11.0.sif
# The real vLLM (CPU build) for models marked real: outside the lab root, so
# `down --purge` keeps it; tests/lab/bin/apptainer names the same path.
LAB_REAL_VLLM=/opt/alvis-lab-vllm
LAB_REAL_VLLM_VERSION=0.11.0

log() { printf '[lab] %s\n' "$*" >&2; }

# pid_alive FILE: true when FILE holds the pid of a live process.
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(head -n1 "$1" 2>/dev/null | tr -dc 0-9)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    # a zombie (dead, not yet reaped by the machine's init) is not alive
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

pid_of() { head -n1 "$1" 2>/dev/null | tr -dc 0-9; }
