#!/usr/bin/env bash
# Submit `synergen tokenize` to a Ray cluster as a job, with this repository as the working directory
# (uploaded by Ray, .gitignore'd paths left out). Decoding runs on CPU workers, VQ encoding in GPU
# actors; token shards and _catalog.parquet go under --out.
#
#   infra/launch/submit_tokenize.sh --raw URL --out URL --task und|gen --vq VQ --tokenizer PATH [...]
#   infra/launch/submit_tokenize.sh --raw s3://BUCKET/raw/laion_aesthetics --out s3://BUCKET/tokens/gen/laion_aesthetics \
#       --task gen --vq /models/emu3-vq --tokenizer /models/internlm2-1_8b --gpus-per-actor 1 --concurrency 16
#
# Environment:
#   RAY_ADDRESS   the head's dashboard / job API; default http://127.0.0.1:8265 (after
#                 `ray dashboard infra/ray/cluster.yaml` or `kubectl port-forward svc/synergen-head-svc 8265:8265`)
#   RAY_AUTH_TOKEN or ~/.ray/auth_token: the cluster's token when it runs with token auth (the default)
#   SUBMIT_OPTS   extra `ray job submit` options, e.g. "--no-wait" or "--submission-id tokenize-laion-en"
# Paths in the arguments are read on the cluster: use s3:// URLs, or paths that exist on the head.
# S3 credentials are the cluster nodes' own (instance profile, secret); none are sent with the job.
# The command waits and streams the job's log; its exit status is the job's (1 if it failed).
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: infra/launch/submit_tokenize.sh --raw URL --out URL --task und|gen --vq VQ --tokenizer PATH [...]" >&2; exit 2; }
cd "$(dirname "$0")/../.."
# shellcheck disable=SC2086  # SUBMIT_OPTS is a list of options
exec "${RAY:-ray}" job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . ${SUBMIT_OPTS:-} \
    -- synergen tokenize "$@"
