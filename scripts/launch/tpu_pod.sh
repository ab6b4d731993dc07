#!/bin/bash
# jds on a Cloud TPU pod slice (e.g. v5p-32, v4-32): copy this repository to every worker,
# install it, and run `jds train` on all workers at once. One JAX process per worker; JAX finds
# the pod by itself (jds.init_distributed needs no variables), so no `jds launch` here.
#
# The TPU VM must exist already; this script creates nothing. For example:
#
#   gcloud compute tpus tpu-vm create my-pod --zone=us-central2-b \
#       --accelerator-type=v4-32 --version=tpu-ubuntu2204-base
#
# Usage, from the repository root (every step, or one of copy / install / train):
#
#   TPU_NAME=my-pod ZONE=us-central2-b bash scripts/launch/tpu_pod.sh
#   TPU_NAME=my-pod ZONE=us-central2-b CONFIG=my_ds_config.json bash scripts/launch/tpu_pod.sh train
#
# The commands it runs, spelled out:
#
#   tar -czf /tmp/jds.tar.gz --exclude=.git --exclude=runs .
#   gcloud compute tpus tpu-vm scp /tmp/jds.tar.gz my-pod:~/jds.tar.gz --zone=ZONE --worker=all
#   gcloud compute tpus tpu-vm ssh my-pod --zone=ZONE --worker=all \
#       --command='mkdir -p ~/jds && tar -xzf ~/jds.tar.gz -C ~/jds'
#   gcloud compute tpus tpu-vm ssh my-pod --zone=ZONE --worker=all \
#       --command='cd ~/jds && pip install -U "jax[tpu]" && pip install -e .'
#   gcloud compute tpus tpu-vm ssh my-pod --zone=ZONE --worker=all \
#       --command='cd ~/jds && jds train --config configs/ds_config_example.json --out runs/pod'

set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME to the TPU VM name (gcloud compute tpus tpu-vm list)}"
ZONE="${ZONE:?set ZONE to the zone of the TPU, e.g. us-central2-b}"
PROJECT="${PROJECT:-}"                            # default: gcloud's configured project
CONFIG="${CONFIG:-configs/ds_config_example.json}"  # path inside the repository
OUT="${OUT:-runs/pod}"                            # run folder on each worker
REMOTE_DIR="${REMOTE_DIR:-jds}"                   # under the workers' home directories
STEP="${1:-all}"

gcloud_tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... on every worker
    local sub="$1"
    shift
    gcloud compute tpus tpu-vm "${sub}" "$@" --zone="${ZONE}" --worker=all \
        ${PROJECT:+--project="${PROJECT}"}
}

on_all() {  # run one shell line on every worker, at the same time
    gcloud_tpu ssh "${TPU_NAME}" --command="$1"
}

copy() {
    local archive
    archive="$(mktemp -d)/jds.tar.gz"
    tar -czf "${archive}" --exclude=.git --exclude=runs --exclude='*.egg-info' .
    gcloud_tpu scp "${archive}" "${TPU_NAME}:~/jds.tar.gz"
    on_all "mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/jds.tar.gz -C ~/${REMOTE_DIR}"
}

install() {
    on_all "cd ~/${REMOTE_DIR} && pip install -U 'jax[tpu]' && pip install -e ."
}

train() {
    # Every worker runs the same command; stdout of all workers arrives here. A failure on
    # one worker ends the others through JAX's heartbeat (JDS_FAILURE_TIMEOUT seconds).
    on_all "cd ~/${REMOTE_DIR} && JDS_FAILURE_TIMEOUT=120 jds train \
--config $(printf '%q' "${CONFIG}") --out $(printf '%q' "${OUT}") --no-progress"
}

case "${STEP}" in
    all) copy && install && train ;;
    copy) copy ;;
    install) install ;;
    train) train ;;
    *) echo "usage: $0 [all|copy|install|train]" >&2; exit 2 ;;
esac
