#!/bin/bash
# Fine-tune the Qwen2.5-Omni-7B Thinker with omni_fast on one or more Ascend nodes, launched by msrun.
# The shape of MindSpeed-MM's examples/mindspore/qwen2.5omni/finetune_qwen2_5_omni_7b.sh; run it from the
# repository root: bash examples/qwen2.5omni/finetune_qwen2_5_omni_7b.sh
# Before: convert the weights (mm-convert Qwen2_5_OmniConverter hf_to_mm with the pipeline layout of model_7b.json,
# here vit/audio [32,0] and llm [11,17]) and prepare the data (examples/qwen2.5omni/DATA.md).
# Never run on Ascend hardware: see "Parallelism" in README.md for what to check first.

# Ascend toolkit environment (adjust to your installation).
[ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ] && source /usr/local/Ascend/ascend-toolkit/set_env.sh
[ -f /usr/local/Ascend/nnal/atb/set_env.sh ] && source /usr/local/Ascend/nnal/atb/set_env.sh --cxx_abi=0

# Environment variables of the guide ("环境变量声明"), with their meaning:
export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 # the NPU indices this node uses
export ASCEND_SLOG_PRINT_TO_STDOUT=0             # 0: CANN logs not printed to the screen, 1: printed
export ASCEND_GLOBAL_LOG_LEVEL=3                 # CANN log level: 0 DEBUG, 1 INFO, 2 WARNING, 3 ERROR, 4 NULL
export HCCL_CONNECT_TIMEOUT=1200                 # seconds allowed for building the device links, [120, 7200]
export HCCL_EXEC_TIMEOUT=1800                    # seconds a device waits for the others inside a collective
export ASCEND_LAUNCH_BLOCKING=0                  # 0: operators run asynchronously, 1: synchronously (debugging)
export MS_DEV_HOST_BLOCKING_RUN=0                # 0: PyNative operators dispatched by several threads, 1: one
export MS_DEV_LAUNCH_BLOCKING=0                  # 0: asynchronous dispatch, 1: one thread and stream sync
export ACLNN_CACHE_LIMIT=100000                  # operator infos cached on the host for single-operator execution
export TOKENIZERS_PARALLELISM=false              # Hugging Face tokenizers: no threads of their own in the workers
export TASK_QUEUE_ENABLE=2                       # the reference script's remaining Ascend settings
export COMBINED_ENABLE=1
export CPU_AFFINITY_CONF=1
export NPU_ASD_ENABLE=0

NPUS_PER_NODE=8          # devices (msrun workers) per node
MASTER_ADDR=localhost    # the node that runs msrun's scheduler (node 0's address on a cluster)
MASTER_PORT=6000
NNODES=1
NODE_RANK=0              # this node's index, 0 .. NNODES-1
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))
export LOCAL_WORLD_SIZE=8
export MS_NODE_TIMEOUT=1800  # seconds msrun's scheduler waits for a silent worker before ending the job

MM_DATA="./examples/qwen2.5omni/data.json"
MM_MODEL="./examples/qwen2.5omni/model_7b.json"
LOAD_PATH="ckpt/mm_path/Qwen2.5-Omni-7B"  # mm-convert's output (or a Hugging Face directory, or a SAVE_PATH)
SAVE_PATH="save_dir"

TP=1
PP=2                     # pipeline stages: model.json's pipeline_num_layers lists must have PP entries
CP=1
MBS=1
GRAD_ACC_STEP=48
DP=$(($WORLD_SIZE/$TP/$PP/$CP))
GBS=$(($MBS*$GRAD_ACC_STEP*$DP))

GPT_ARGS="
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --context-parallel-size ${CP} \
    --tokenizer-type NullTokenizer \
    --vocab-size 152064 \
    --seq-length 3072 \
    --make-vocab-size-divisible-by 1 \
    --normalization RMSNorm \
    --use-fused-rmsnorm \
    --swiglu \
    --use-fused-swiglu \
    --no-masked-softmax-fusion \
    --lr 1.0e-5 \
    --lr-decay-style cosine \
    --weight-decay 0 \
    --train-iters 10000 \
    --lr-warmup-fraction 0.1 \
    --clip-grad 0.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --no-gradient-accumulation-fusion \
    --seed 42 \
    --bf16 \
    --load $LOAD_PATH \
    --variable-seq-lengths \
    --use-distributed-optimizer \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
    --num-workers 8 \
    --distributed-timeout-minutes 600 \
    --use-flash-attn
"
# A stage whose parameters are all frozen (e.g. vision_encoder [30,2,0,0] with text_decoder [0,11,10,7] and the ViT
# frozen) needs --enable-dummy-optimizer in GPT_ARGS.

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval 10000 \
    --eval-interval 10000 \
    --eval-iters 5000 \
    --save $SAVE_PATH \
    --ckpt-format torch \
    --log-tps
"

mkdir -p logs
logfile=logs/train_$(date +%Y%m%d)_$(date +%H%M%S).log
msrun --local_worker_num $NPUS_PER_NODE \
    --worker_num $WORLD_SIZE \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT \
    --log_dir msrun_log \
    --bind_core=True \
    --join True \
    python -m omni_fast.train \
    $GPT_ARGS \
    $MM_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    --ai-framework mindspore \
    2>&1 | tee $logfile
status=${PIPESTATUS[0]}
chmod 440 $logfile
[ -d $SAVE_PATH ] && chmod -R u=rwX,g=rX,o= $SAVE_PATH
exit $status
