#!/bin/bash
# The 7B script's tiny CPU twin: 2 msrun workers on this machine, the generated demo data, a tiny random Thinker
# (omni_fast/config/presets/model_tiny.json). Run from anywhere with omni_fast installed:
#   bash examples/qwen2.5omni/finetune_qwen2_5_omni_tiny_cpu.sh            # 2 pipeline stages (PP=2)
#   PP=1 bash examples/qwen2.5omni/finetune_qwen2_5_omni_tiny_cpu.sh       # data parallel 2, sharded optimizer
set -euo pipefail

export TOKENIZERS_PARALLELISM=false  # Hugging Face tokenizers: no threads of their own in the workers
export MS_DEV_LAUNCH_BLOCKING=1      # 1: one dispatch thread and synchronous ops, faster in PyNative on few cores
export MS_NODE_TIMEOUT=1800          # seconds msrun's scheduler waits for a silent worker before ending the job
export GLOG_v=3                      # MindSpore's own (C++) log level: 3 = errors only

NPUS_PER_NODE=2          # here: CPU worker processes on this node
MASTER_ADDR=127.0.0.1
MASTER_PORT=${MASTER_PORT:-29561}
NNODES=1
NODE_RANK=0
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

OUT=${OUT:-outputs/omni_fast_demo}
MM_DATA=$(python -c "from omni_fast.data import ensure_demo_data; print(ensure_demo_data('$OUT/data') / 'data.json')")
PRESET=$(python -c "from omni_fast.train.setup import PRESETS; print(PRESETS / 'model_tiny.json')")
SAVE_PATH=$OUT/run_tiny_cpu

PP=${PP:-2}
MBS=1
GRAD_ACC_STEP=4
DP=$(($WORLD_SIZE/$PP))
GBS=$(($MBS*$GRAD_ACC_STEP*$DP))

if [ "$PP" -gt 1 ]; then
    # The preset puts every layer on one stage; for two stages: both encoders and the first text layer on stage 0,
    # the second text layer (final norm, lm_head, loss) on stage 1, as model_7b.json's [32,0] + [11,17].
    MM_MODEL=$OUT/model_tiny_pp2.json
    python - "$PRESET" "$MM_MODEL" <<'EOF'
import json, sys
spec = json.load(open(sys.argv[1]))
spec["image_encoder"]["vision_encoder"]["pipeline_num_layers"] = [2, 0]
spec["audio_encoder"]["audio_encoder"]["pipeline_num_layers"] = [2, 0]
spec["text_decoder"]["pipeline_num_layers"] = [1, 1]
json.dump(spec, open(sys.argv[2], "w"), indent=2)
EOF
    PARALLEL_ARGS="--pipeline-model-parallel-size $PP"
else
    MM_MODEL=$PRESET
    PARALLEL_ARGS="--pipeline-model-parallel-size 1 --use-distributed-optimizer"
fi

GPT_ARGS="
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --seq-length 1024 \
    --lr 5.0e-4 \
    --lr-decay-style cosine \
    --lr-warmup-iters 3 \
    --weight-decay 0 \
    --train-iters 20 \
    --clip-grad 1.0 \
    --seed 42 \
    --no-jit \
    $PARALLEL_ARGS
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval 20 \
    --save $SAVE_PATH \
    --log-tps
"

mkdir -p logs
logfile=logs/train_$(date +%Y%m%d)_$(date +%H%M%S).log
msrun --local_worker_num $NPUS_PER_NODE \
    --worker_num $WORLD_SIZE \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT \
    --log_dir $OUT/msrun_log \
    --join True \
    python -m omni_fast.train \
    $GPT_ARGS \
    $MM_ARGS \
    $OUTPUT_ARGS \
    2>&1 | tee $logfile
exit ${PIPESTATUS[0]}
