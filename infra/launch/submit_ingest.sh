#!/usr/bin/env bash
# Submit `synergen ingest` to a Ray cluster as a job, with this repository as the working directory
# (uploaded by Ray, .gitignore'd paths left out). Downloads run as Ray tasks on the CPU workers; raw shards are published under --out.
#
#   infra/launch/submit_ingest.sh MANIFEST --out URL [--shard-size N] [--allow-private-network]
#   infra/launch/submit_ingest.sh s3://BUCKET/manifests/sources/laion_aesthetics.yaml --out s3://BUCKET/raw/laion_aesthetics
#
# Environment:
#   RAY_ADDRESS   the head's dashboard / job API; default http://127.0.0.1:8265 (after
#                 `ray dashboard infra/ray/cluster.yaml` or `kubectl port-forward svc/synergen-head-svc 8265:8265`)
#   RAY_AUTH_TOKEN or ~/.ray/auth_token: the cluster's token when it runs with token auth (the default)
#   SUBMIT_OPTS   extra `ray job submit` options, e.g. "--no-wait" or "--submission-id ingest-laion-en"
# Paths in the arguments are read on the cluster: use s3:// URLs, or paths that exist on the head.
# S3 credentials are the cluster nodes' own (instance profile, secret); none are sent with the job.
# The command waits and streams the job's log; its exit status is the job's (1 if it failed).
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: infra/launch/submit_ingest.sh MANIFEST --out URL [--shard-size N] [--allow-private-network]" >&2; exit 2; }
cd "$(dirname "$0")/../.."
# shellcheck disable=SC2086  # SUBMIT_OPTS is a list of options
exec "${RAY:-ray}" job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . ${SUBMIT_OPTS:-} \
    -- synergen ingest "$@"
