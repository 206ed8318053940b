#!/usr/bin/env bash
# `ldm fit` on several machines with torchrun, without a scheduler. Run it from the repository root on every
# node with the same options (they go to `ldm fit`), NODE_RANK 0 on the node at MASTER_ADDR:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 configs/cluster/torchrun.sh --config experiments/cifar10/dit_gpu.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 configs/cluster/torchrun.sh --config experiments/cifar10/dit_gpu.yaml
#
# NPROC_PER_NODE: processes (GPUs) per node, default every GPU nvidia-smi lists; MASTER_PORT: default 29500.
# CHECKPOINTS: the run's checkpoint folder, on storage that every node sees (default runs/torchrun/checkpoints).
# Every launch resumes from CHECKPOINTS/last.ckpt when there is one (`--ckpt_path last`), so after a crash, a
# kill -9 or a stop by SIGTERM/SIGUSR1, the same commands continue the run exactly: on as many nodes and
# processes per node as before (the checkpoint holds every rank's random states and stream position). On
# another number, the run continues elastically: the epoch's remaining samples are dealt over the new ranks.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK (0 on the MASTER_ADDR node)}" "${MASTER_ADDR:?set MASTER_ADDR}"
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
# the topology options come last: Lightning checks them against torchrun's (devices x num_nodes = world size)
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" \
    -m ldm.cli fit "$@" --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" \
    --checkpoint.dirpath "${CHECKPOINTS:-runs/torchrun/checkpoints}" --ckpt_path last
