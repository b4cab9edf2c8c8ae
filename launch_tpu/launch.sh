#!/usr/bin/env bash
# Creates a Cloud TPU VM slice (if missing), copies this repository to every host, installs it
# with jax[tpu], and runs the main job on all hosts at once (each host reads its own examples;
# the global batch is assembled from per-host data).
#
#   launch_tpu/launch.sh NAME ZONE ACCELERATOR -- --config=configs/default.py:gemma3_4b \
#       --config.model.checkpoint=/mnt/gemma-3-4b-it --workdir=gs://BUCKET/runs/gemma3_4b
#
# e.g. NAME=xmem ZONE=us-central2-b ACCELERATOR=v4-32. The workdir should be a gs:// path (every
# host writes its part of each Orbax checkpoint there); the checkpoint directory must exist on
# every host (copy it, or mount a bucket). Rerunning the same command resumes the run.
set -euo pipefail
if [ $# -lt 4 ] || [ "$4" != "--" ]; then
  echo "usage: $0 NAME ZONE ACCELERATOR -- MAIN_FLAGS..." >&2
  exit 2
fi
name=$1 zone=$2 accelerator=$3
shift 4
version=${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}
repo=$(cd "$(dirname "$0")/.." && pwd)

if ! gcloud compute tpus tpu-vm describe "$name" --zone="$zone" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
    --accelerator-type="$accelerator" --version="$version"
fi
tar -C "$repo" --exclude=.git --exclude=.venv --exclude=runs -czf /tmp/xmem-jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/xmem-jax.tgz "$name":~/ --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  set -e; mkdir -p ~/xmem-jax && tar -C ~/xmem-jax -xzf ~/xmem-jax.tgz && cd ~/xmem-jax &&
  python3 -m pip install -q 'jax[tpu]' -e . &&
  python3 -m xmem_jax.main --jax_distributed $(printf '%q ' "$@")"
