#!/bin/bash
#SBATCH --job-name=otpo
#SBATCH --nodes=2                 # override on the command line: sbatch --nodes=4 ...
#SBATCH --ntasks-per-node=1       # one `accelerate launch` per node, which starts one process per GPU
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --partition=gpu           # adjust for your cluster
#SBATCH --output=out/%x-%j.log    # out/ must exist when the job starts (mkdir -p out)
#SBATCH --time=2-00:00:00
#
# Multi-node training with SLURM: every node runs `accelerate launch` with its rank; node 0 is the rendezvous host.
#
#   sbatch --nodes=2 scripts/slurm_train.sh configs/llama-3-8b-instruct/otpo_full.yaml deepspeed_zero3 \
#       --gradient_accumulation_steps 4 --output_dir out/otpo-8b-2nodes
#
# Arguments: the recipe, the accelerate config name in configs/accelerate/ (default deepspeed_zero3), then any
# flags for scripts/train.py. The effective batch is nodes x GPUS_PER_NODE x per_device_train_batch_size x
# gradient_accumulation_steps: with 16 GPUs, halve the recipes' gradient_accumulation_steps to keep 128.
# Submit from the repository root, in its environment: `mkdir -p out && source .venv/bin/activate && sbatch ...`.

set -euo pipefail

if [[ $# -lt 1 || "$1" == "--help" ]]; then
    sed -n '10,19p' "$0"
    exit 0
fi
RECIPE=$1
shift
ACCELERATE_CONFIG=configs/accelerate/deepspeed_zero3.yaml
if [[ $# -gt 0 && "$1" != --* ]]; then
    ACCELERATE_CONFIG=configs/accelerate/$1.yaml
    shift
fi

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NUM_NODES=$SLURM_NNODES
# The first node hosts the rendezvous. (`sed -n 1p` reads all the names: `head` could leave scontrol writing into a
# closed pipe, which `set -o pipefail` turns into a failed job.)
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}

echo "START $(date) on $NUM_NODES nodes x $GPUS_PER_NODE GPUs: $RECIPE with $ACCELERATE_CONFIG $*"

# `$SLURM_PROCID` is escaped: each node expands it to its own rank.
LAUNCHER="accelerate launch \
    --config_file $ACCELERATE_CONFIG \
    --num_machines $NUM_NODES \
    --num_processes $((NUM_NODES * GPUS_PER_NODE)) \
    --main_process_ip $MAIN_PROCESS_IP \
    --main_process_port $MAIN_PROCESS_PORT \
    --machine_rank \$SLURM_PROCID \
    --rdzv_backend c10d \
    --tee 3"
CMD="scripts/train.py --config $RECIPE $*"

# --kill-on-bad-exit: one failing node stops them all, instead of the others hanging in a collective.
srun --nodes="$NUM_NODES" --ntasks="$NUM_NODES" --kill-on-bad-exit=1 --wait=60 bash -c "$LAUNCHER $CMD"

echo "END $(date)"
