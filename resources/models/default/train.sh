#!/usr/bin/env bash
# Retrain the shipped default model (resources/models/default) with DosePilot's own trainer.
#
#   resources/models/default/train.sh RUNS_DIR
#
# Stages, in order (resources/presets/default-cpu.toml; each stage's config is written into
# RUNS_DIR/configs/ with the weights of the earlier stages filled in):
#   vae -> cache -> distill -> any2any (Stage A) -> dose (Stage B)
# Resumable: run the same command again after an interruption; a stage with checkpoints is
# continued with --resume, a finished stage (its export exists) is skipped. To stop a stage
# early and still export it, rerun with that stage's *_STEPS set to its last checkpoint step
# (RUNS_DIR/STAGE/checkpoints/step_N.safetensors): the trainer resumes, has nothing left to
# do and writes the export.
#
# Environment (defaults = the shipped model's run):
#   OPENKBP=/work/shared/data/openkbp   the OpenKBP dataset (train/ and validation/ of pt_*.npz)
#   N_TRAIN=8  N_VAL=2                  first N cases (by patient number) of each split
#   VAE_STEPS=6 DISTILL_STEPS=6 A_STEPS=150 B_STEPS=150
#   NICE=10                             niceness of the training processes
# Run from the repository root with the project's environment active.
set -euo pipefail

RUNS=$(mkdir -p "${1:?usage: train.sh RUNS_DIR}" && cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
OPENKBP=${OPENKBP:-/work/shared/data/openkbp}
N_TRAIN=${N_TRAIN:-8}
N_VAL=${N_VAL:-2}
VAE_STEPS=${VAE_STEPS:-6}
DISTILL_STEPS=${DISTILL_STEPS:-6}
A_STEPS=${A_STEPS:-150}
B_STEPS=${B_STEPS:-150}
NICE=${NICE:-10}
PRESET="$REPO/resources/presets/default-cpu.toml"
DATA="$RUNS/data"

# The case subset: symlinks to the first N cases of each split, in patient-number order.
link_split() {  # SPLIT N
    mkdir -p "$DATA/$1"
    find "$OPENKBP/$1" -maxdepth 1 -name 'pt_*.npz' | sort -V | head -n "$2" |
        while read -r f; do ln -sfn "$f" "$DATA/$1/"; done
}
if [ ! -d "$DATA" ]; then
    link_split train "$N_TRAIN"
    link_split validation "$N_VAL"
fi

# One config per stage: the preset with its step count and the earlier stages' weights.
stage_config() {  # NAME STEPS [MODEL_KEY=VALUE ...]
    local name=$1 steps=$2 out="$RUNS/configs/$1.toml" extra=""
    shift 2
    for kv in "$@"; do extra+="${kv%%=*} = \"${kv#*=}\"\n"; done
    mkdir -p "$RUNS/configs"
    sed -e "s/^max_steps = .*/max_steps = $steps/" -e "s|^\[model\]|[model]\n$extra|" \
        "$PRESET" > "$out"
    echo "$out"
}

train() {  # STAGE RUN_NAME CONFIG
    local resume=()
    if compgen -G "$RUNS/$2/checkpoints/*.safetensors" > /dev/null; then resume=(--resume); fi
    nice -n "$NICE" python -m engine.cli train "$1" --config "$3" --data "$DATA" \
        --out "$RUNS/$2" "${resume[@]}"
}

VAE_W="$RUNS/vae/vae.safetensors"
CODEC_W="$RUNS/distill/tiny_codec.safetensors"

[ -f "$VAE_W" ] || train vae vae "$(stage_config vae "$VAE_STEPS")"
# The latent cache lives in RUNS_DIR/cache (shared by the later stages); it skips cached cases.
nice -n "$NICE" python -m engine.cli train cache --data "$DATA" --out "$RUNS/cache-build" \
    --config "$(stage_config cache 1 vae_weights="$VAE_W")"
[ -f "$CODEC_W" ] || train distill distill \
    "$(stage_config distill "$DISTILL_STEPS" vae_weights="$VAE_W")"
[ -f "$RUNS/stage-a/model/bundle.json" ] || train any2any stage-a \
    "$(stage_config any2any "$A_STEPS" vae_weights="$VAE_W" codec_weights="$CODEC_W")"
[ -f "$RUNS/stage-b/model/bundle.json" ] || train dose stage-b \
    "$(stage_config dose "$B_STEPS" vae_weights="$VAE_W" codec_weights="$CODEC_W" \
        init_from="$RUNS/stage-a/model")"
echo "model bundle: $RUNS/stage-b/model"
