#!/usr/bin/env bash
# Train one stage on one or more nodes with DeepSpeed's launcher: one `synergen train CONFIG` process
# per slot on every host of the hostfile.
#
#   infra/launch/train_multinode.sh infra/train/stage1.yaml              # stage 1
#   infra/launch/train_multinode.sh infra/train/stage2.yaml              # stage 2 (init from stage 1)
#   infra/launch/train_multinode.sh CONFIG [more `synergen train` options, e.g. --resume]
#
# Run it on the first host, from the repository root (in the image: /opt/synergen), so that relative
# paths in CONFIG (infra/deepspeed/*.json, manifests/) resolve the same on every node.
#
# Environment (all optional):
#   HOSTFILE       hostfile path; default /job/hostfile, DeepSpeed's default. Format: infra/launch/hostfile.example.
#                  On several nodes put it at /job/hostfile on the first host (or set HOSTFILE); on one
#                  machine a file with the single line "localhost slots=N" runs N local processes.
#   NUM_NODES      use the first NUM_NODES hosts (default: all hosts of the hostfile)
#   GPUS_PER_NODE  processes per node (default: each host's slots)
#   MASTER_ADDR    rendezvous address (default: the first host; 127.0.0.1 when that is localhost)
#   MASTER_PORT    rendezvous port (default 29500)
#   LAUNCHER       pdsh (default), openmpi, mpich, impi, slurm, mvapich: how the other nodes are reached
#   NODE_RANK      launch only this node, without ssh (Kubernetes, SLURM step per node): run the script on
#                  every node with its own NODE_RANK and the same hostfile and MASTER_ADDR
#   DEEPSPEED      the launcher executable (default: `deepspeed` on PATH)
# Variables the ranks on other nodes need (AWS_*, NCCL_*, HF_HOME) go in ./.deepspeed_env or
# ~/.deepspeed_env, one NAME=VALUE per line: pdsh does not forward the environment.
set -euo pipefail

usage() { echo "usage: $0 CONFIG [synergen train options]   (see the header of $0)" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
CONFIG=$1; shift
[[ -f $CONFIG || $CONFIG == *://* ]] || { echo "error: train config '$CONFIG' not found; pass one of infra/train/*.yaml" >&2; exit 2; }

HOSTFILE=${HOSTFILE:-/job/hostfile}
if [[ ! -f $HOSTFILE ]]; then
    echo "error: hostfile '$HOSTFILE' not found; copy infra/launch/hostfile.example to /job/hostfile and edit it, or set HOSTFILE=..." >&2
    exit 2
fi
mapfile -t HOSTS < <(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$HOSTFILE")
[[ ${#HOSTS[@]} -ge 1 ]] || { echo "error: hostfile '$HOSTFILE' names no host (expected lines like 'node-0 slots=8')" >&2; exit 2; }

NUM_NODES=${NUM_NODES:-${#HOSTS[@]}}
if (( NUM_NODES < 1 || NUM_NODES > ${#HOSTS[@]} )); then
    echo "error: NUM_NODES=$NUM_NODES but hostfile '$HOSTFILE' names ${#HOSTS[@]} host(s)" >&2
    exit 2
fi
FIRST=${HOSTS[0]}
is_local() { [[ $1 == localhost || $1 == 127.0.0.1 ]]; }
if is_local "$FIRST"; then DEFAULT_MASTER=127.0.0.1; else DEFAULT_MASTER=$FIRST; fi
MASTER_ADDR=${MASTER_ADDR:-$DEFAULT_MASTER}
MASTER_PORT=${MASTER_PORT:-29500}

ARGS=(--hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
      --launcher "${LAUNCHER:-pdsh}")
[[ -n ${GPUS_PER_NODE:-} ]] && ARGS+=(--num_gpus "$GPUS_PER_NODE")
# One local host needs no ssh; DeepSpeed would still probe `ssh localhost` because a hostfile is given.
if (( NUM_NODES == 1 )) && is_local "$FIRST"; then ARGS+=(--no_ssh_check); fi
[[ -n ${NODE_RANK:-} ]] && ARGS+=(--no_ssh --node_rank "$NODE_RANK")

# --no_local_rank: ranks read LOCAL_RANK from the environment; a `--local_rank` argument would land
# in front of the typer subcommand.
set -x
exec "${DEEPSPEED:-deepspeed}" "${ARGS[@]}" --no_local_rank --module synergen.cli train "$CONFIG" "$@"
