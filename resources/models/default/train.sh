#!/usr/bin/env bash
# Retrain the shipped default model (resources/models/default) with DosePilot's own trainer.
#
#   resources/models/default/train.sh RUNS_DIR
#
# Stages, in order (preset resources/presets/default-cpu.toml, per-stage values with --set):
#   vae -> cache -> distill -> any2any (Stage A)         on the OpenKBP cases   (RUNS_DIR/data-a)
#   cache -> dose (Stage B, from Stage A)                 on the OpenKBP cases plus the
#                                                         physics-generated plans (RUNS_DIR/data-b)
#   cache -> dose (Stage C, from Stage B)                 the physics plans weighted up: all of
#                                                         them plus the first N_C OpenKBP cases
#                                                         (RUNS_DIR/data-c), so that moving a
#                                                         beam moves the dose; C_STEPS=0 skips it
#   cache -> distill + dose (Stage D, from Stage C)       on a GPU: the Stage B data mirrored
#                                                         left/right, preset default-gpu (batch
#                                                         32, latents in memory, its own cache
#                                                         RUNS_DIR/cache-gpu) and a new preview
#                                                         codec distilled on 33 x 128 x 128
#                                                         crops; D_STEPS=0 (the default) skips it
#   cache -> dose-decoder (Stage E, from Stage D)        on the CPU: the VAE decoder refined on
#                                                         the true dose of the first N_E_CLINICAL
#                                                         OpenKBP cases and the first N_E_PHYSICS
#                                                         v2 physics plans (RUNS_DIR/data-e);
#                                                         encoder and DiT unchanged; E_STEPS=0
#                                                         (the default) skips it
#   cache -> [dose-decoder] -> codec-decoder (Stage F,   on the CPU: both decoders refined on the
#            from Stage E)                                first N_F_CLINICAL OpenKBP cases and
#                                                         N_F_PHYSICS v2 plans (RUNS_DIR/data-f):
#                                                         the VAE's further (F_STEPS, 0 = keep
#                                                         Stage E's), then the preview codec's
#                                                         (F_CODEC_STEPS); F_CODEC_STEPS=0 (the
#                                                         default) skips Stage F
#   dose-refiner (Stage G, from Stage F)                 on the CPU: the correction of the
#                                                         decoded dose around the targets, fitted
#                                                         on Stage F's own previews of every
#                                                         OpenKBP training case ($OPENKBP/train,
#                                                         its val split for the loss curve);
#                                                         G_STEPS=0 (the default) skips it
#   dose-refiner (Stage H, from Stage F)                 on the CPU: Stage G's refiner reading
#                                                         the plan's beam plate too, fitted on
#                                                         Stage F's previews of the first
#                                                         N_H_CLINICAL OpenKBP training cases and
#                                                         the first N_H_PHYSICS v2 physics plans
#                                                         (RUNS_DIR/data-h; patients weigh the
#                                                         same); H_STEPS=0 (the default) skips it
#   dose-refiner (Stage J, from Stage F)                 on the CPU: Stage H's refiner reading
#                                                         the plan's quick plan too (engine/
#                                                         physics/quick_plan.py), Stage H's
#                                                         settings but a wider refiner
#                                                         (J_HIDDEN), on the first N_H_CLINICAL
#                                                         OpenKBP cases and the first
#                                                         N_J_PHYSICS v2 plans (RUNS_DIR/data-j),
#                                                         with the clinical-style input and
#                                                         beam pairs (weight 1, fitted in the
#                                                         clinical style; needs a patient with
#                                                         two physics plans), the DiT shown the
#                                                         nine-field class solution (the plan's
#                                                         beams reach the dose through the
#                                                         refiner only) and the lr falling to 0
#                                                         over the last J_DECAY steps;
#                                                         J_STEPS=0 (the default) skips it
#   cache -> scardnft (Stage I, from Stage H)            ScardNFT post-training (seed §B.5):
#                                                         LoRA on the DiT, rewarded by the
#                                                         scorecard and the MAE of the dose the
#                                                         engine shows (refiner included), on
#                                                         the first N_I OpenKBP training cases
#                                                         (RUNS_DIR/data-i, its own cache); the
#                                                         export keeps Stage H's codec and
#                                                         refiner; I_STEPS=0 (the default) skips it
# Resumable: run the same command again after an interruption; a stage with checkpoints is
# continued with --resume, a finished stage (its export exists) is skipped, and the latent
# cache (RUNS_DIR/cache) skips the cases it already holds. To stop a stage early and still
# export it, rerun with that stage's *_STEPS set to its last checkpoint step
# (RUNS_DIR/STAGE/checkpoints/step_N.safetensors): the trainer resumes, has nothing left to do
# and writes the export.
#
# Environment (defaults = the shipped model's run):
#   OPENKBP=/work/shared/data/openkbp   the OpenKBP dataset (train/ and validation/ of pt_*.npz)
#   PHYSICS=RUNS_DIR/physics            plans of `dosepilot physics generate` (pt_N_planK.npz);
#                                       by default restored from the plans packed in the
#                                       repository (datasets/openkbp-physics-plans, see its
#                                       README) with `dosepilot physics unpack`; a missing
#                                       folder means Stage B sees OpenKBP only
#   N_TRAIN=169 N_VAL=2 N_PHYSICS=400   first N files (in name order) of each (the validation
#                                       cases here only give the stages' loss curves; the
#                                       model card scores all 33 with predict + evaluate)
#   N_C=100                             OpenKBP cases in Stage C (with all the physics plans)
#   VAE_STEPS=800 DISTILL_STEPS=300 A_STEPS=300 B_STEPS=550 C_STEPS=600
#   D_STEPS=0 D_DISTILL_STEPS=1000      Stage D (the shipped model: 2139 dose steps, see its card)
#   GPU_PRESET=.../default-gpu.toml D_CROP="33, 128, 128"
#   E_STEPS=0 N_E_CLINICAL=76 N_E_PHYSICS=185 E_CROP="97, 64, 80"   Stage E (the shipped model:
#                                       574 steps); PHYSICS_V2=RUNS_DIR/physics-v2 restored from
#                                       datasets/openkbp-physics-plans-v2 when missing
#   F_STEPS=0 F_CODEC_STEPS=0 N_F_CLINICAL=120 N_F_PHYSICS=130   Stage F (the shipped model:
#                                       F_CODEC_STEPS=6000 with F_STEPS=0; 900 more VAE decoder
#                                       steps scored worse, see its card); crops E_CROP
#   G_STEPS=0                           Stage G (3000 for the model shipped before Stage H, run
#                                       as 2 torchrun processes of 1 thread; one process computes
#                                       the same)
#   H_STEPS=0 N_H_CLINICAL=169 N_H_PHYSICS=236   Stage H (the shipped model: H_STEPS=3000 with
#                                       G_STEPS=0, 2 torchrun processes of 1 thread, on the 236
#                                       v2 plans packed then; the set grows: in the grown set the
#                                       first 236 are those but for pt_54_plan5, computed later,
#                                       in pt_55_plan0's place)
#   J_STEPS=0 J_HIDDEN=64 N_J_PHYSICS=396 J_DECAY=J_STEPS/4   Stage J (the shipped model:
#                                       J_STEPS=40000 THREADS=1 with G_STEPS=0 H_STEPS=0, on the
#                                       396 v2 plans packed then; its samples were made by 2
#                                       torchrun processes, the same samples as one process
#                                       makes: each case's seed is its patient; width and steps
#                                       from a comparison on one set of samples in
#                                       benchmarks/RESULTS.md; band 100 mm, the quick plan on
#                                       pyRadPlan's kernel, since 2026-12-07 night; style input
#                                       and beam pairs since 2026-12-08; the class solution
#                                       shown to the DiT and the lr decay since 2026-12-08
#                                       night, fitted as 30,000 constant-lr steps resumed to
#                                       40,000 with the decay, which the trainer makes the
#                                       same as one 40,000-step run)
#   I_STEPS=0 N_I=40                    Stage I (not in the shipped model: see its card)
#   NICE=10 THREADS=2                   niceness and CPU threads of the training processes
#   PRESET=.../default-cpu.toml CROP="33, 64, 64"   the preset and the volume stages' crop
#                                       (tests run the whole recipe with test-tiny and "5, 16, 16")
# Run from the repository root with the project's environment active.
set -euo pipefail

RUNS=$(mkdir -p "${1:?usage: train.sh RUNS_DIR}" && cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
OPENKBP=${OPENKBP:-/work/shared/data/openkbp}
PACKED=$REPO/datasets/openkbp-physics-plans
N_TRAIN=${N_TRAIN:-169}
N_VAL=${N_VAL:-2}
N_PHYSICS=${N_PHYSICS:-400}
VAE_STEPS=${VAE_STEPS:-800}
DISTILL_STEPS=${DISTILL_STEPS:-300}
A_STEPS=${A_STEPS:-300}
B_STEPS=${B_STEPS:-550}
C_STEPS=${C_STEPS:-600}
N_C=${N_C:-100}
NICE=${NICE:-10}
THREADS=${THREADS:-2}
PRESET=${PRESET:-$REPO/resources/presets/default-cpu.toml}
CROP=${CROP:-33, 64, 64}
D_STEPS=${D_STEPS:-0}
D_DISTILL_STEPS=${D_DISTILL_STEPS:-1000}
GPU_PRESET=${GPU_PRESET:-$REPO/resources/presets/default-gpu.toml}
D_CROP=${D_CROP:-33, 128, 128}
E_STEPS=${E_STEPS:-0}
N_E_CLINICAL=${N_E_CLINICAL:-76}
N_E_PHYSICS=${N_E_PHYSICS:-185}
E_CROP=${E_CROP:-97, 64, 80}
F_STEPS=${F_STEPS:-0}
F_CODEC_STEPS=${F_CODEC_STEPS:-0}
N_F_CLINICAL=${N_F_CLINICAL:-120}
N_F_PHYSICS=${N_F_PHYSICS:-130}
G_STEPS=${G_STEPS:-0}
H_STEPS=${H_STEPS:-0}
N_H_CLINICAL=${N_H_CLINICAL:-169}
N_H_PHYSICS=${N_H_PHYSICS:-236}
J_STEPS=${J_STEPS:-0}
J_HIDDEN=${J_HIDDEN:-64}
J_DECAY=${J_DECAY:-$((J_STEPS / 4))}
N_J_PHYSICS=${N_J_PHYSICS:-396}
I_STEPS=${I_STEPS:-0}
N_I=${N_I:-40}

# The case subsets: symlinks to the first N files of a folder, in name order.
link_first() {  # FROM_DIR TO_DIR N
    mkdir -p "$2"
    find "$1" -maxdepth 1 -name 'pt_*.npz' | sort -V | head -n "$3" |
        while read -r f; do ln -sfn "$f" "$2/"; done
}
if [ ! -d "$RUNS/data-a" ]; then
    link_first "$OPENKBP/train" "$RUNS/data-a/train" "$N_TRAIN"
    link_first "$OPENKBP/validation" "$RUNS/data-a/validation" "$N_VAL"
fi

train() {  # STAGE RUN_NAME DATA [--set K=V ...]; USE_PRESET / CACHE override the CPU ones
    local stage=$1 name=$2 data=$3 resume=() extra=(--set "run.threads=$THREADS")
    shift 3
    if compgen -G "$RUNS/$name/checkpoints/*.safetensors" > /dev/null; then resume=(--resume); fi
    if [ -n "${USE_PRESET:-}" ]; then extra=(); fi   # the GPU preset's own threads
    nice -n "$NICE" python -m engine.cli train "$stage" --config "${USE_PRESET:-$PRESET}" \
        --data "$data" --out "$RUNS/$name" --set "data.cache_dir=\"${CACHE:-$RUNS/cache}\"" \
        "${extra[@]}" "$@" "${resume[@]}"
}

VAE_W="$RUNS/vae/vae.safetensors"
CODEC_W="$RUNS/distill/tiny_codec.safetensors"
FITTED=(--set "model.vae_weights=\"$VAE_W\"")
CROPS=(--set "data.crop=[$CROP]" --set data.batch_size=4)

[ -f "$VAE_W" ] || train vae vae "$RUNS/data-a" --set "run.max_steps=$VAE_STEPS" "${CROPS[@]}"
train cache cache-a "$RUNS/data-a" "${FITTED[@]}"
[ -f "$CODEC_W" ] || train distill distill "$RUNS/data-a" "${FITTED[@]}" \
    --set "run.max_steps=$DISTILL_STEPS" "${CROPS[@]}"
[ -f "$RUNS/stage-a/model/bundle.json" ] || train any2any stage-a "$RUNS/data-a" "${FITTED[@]}" \
    --set "model.codec_weights=\"$CODEC_W\"" --set "run.max_steps=$A_STEPS"

if [ -z "${PHYSICS:-}" ]; then
    PHYSICS="$RUNS/physics"
    if [ -d "$PACKED" ] && [ ! -d "$RUNS/data-b" ]; then
        python -m engine.cli physics unpack "$PACKED" "$OPENKBP/train" "$PHYSICS"
    fi
fi

# Stage B data: the OpenKBP cases plus the generated plans present when Stage B first starts
# (fixed from then on, so that a resumed Stage B sees the same data).
if [ ! -d "$RUNS/data-b" ]; then
    mkdir -p "$RUNS/data-b"
    cp -a "$RUNS/data-a/train" "$RUNS/data-a/validation" "$RUNS/data-b/"
    if [ -d "$PHYSICS" ]; then link_first "$PHYSICS" "$RUNS/data-b/train/physics" "$N_PHYSICS"; fi
fi
train cache cache-b "$RUNS/data-b" "${FITTED[@]}"
[ -f "$RUNS/stage-b/model/bundle.json" ] || train dose stage-b "$RUNS/data-b" "${FITTED[@]}" \
    --set "model.codec_weights=\"$CODEC_W\"" --set "model.init_from=\"$RUNS/stage-a/model\"" \
    --set "run.max_steps=$B_STEPS"
if [ "$C_STEPS" -eq 0 ]; then echo "model bundle: $RUNS/stage-b/model"; exit 0; fi

# Stage C data: the same latents as Stage B's (one shared cache), fewer OpenKBP cases.
if [ ! -d "$RUNS/data-c" ]; then
    link_first "$OPENKBP/train" "$RUNS/data-c/train" "$N_C"
    cp -a "$RUNS/data-a/validation" "$RUNS/data-c/"
    if [ -d "$RUNS/data-b/train/physics" ]; then
        cp -a "$RUNS/data-b/train/physics" "$RUNS/data-c/train/"
    fi
fi
train cache cache-c "$RUNS/data-c" "${FITTED[@]}"
[ -f "$RUNS/stage-c/model/bundle.json" ] || train dose stage-c "$RUNS/data-c" "${FITTED[@]}" \
    --set "model.codec_weights=\"$CODEC_W\"" --set "model.init_from=\"$RUNS/stage-b/model\"" \
    --set "run.max_steps=$C_STEPS"
if [ "$D_STEPS" -eq 0 ]; then echo "model bundle: $RUNS/stage-c/model"; exit 0; fi

# Stage D (GPU): the Stage B data with flip_lr, in its own cache (other latent variants).
CODEC_D="$RUNS/distill-d/tiny_codec.safetensors"
gpu() { USE_PRESET=$GPU_PRESET CACHE=$RUNS/cache-gpu train "$@"; }
gpu cache cache-d "$RUNS/data-b" "${FITTED[@]}"
[ -f "$CODEC_D" ] || gpu distill distill-d "$RUNS/data-b" "${FITTED[@]}" \
    --set "run.max_steps=$D_DISTILL_STEPS" --set "data.crop=[$D_CROP]" --set data.batch_size=8 \
    --set optim.lr=5e-4
[ -f "$RUNS/stage-d/model/bundle.json" ] || gpu dose stage-d "$RUNS/data-b" "${FITTED[@]}" \
    --set "model.codec_weights=\"$CODEC_D\"" --set "model.init_from=\"$RUNS/stage-c/model\"" \
    --set "run.max_steps=$D_STEPS"
if [ "$E_STEPS" -eq 0 ]; then echo "model bundle: $RUNS/stage-d/model"; exit 0; fi

# Stage E (CPU): the decoder of Stage D's VAE refined on true doses (the cached dose latents of
# the frozen encoder); v2 physics plans (objectives version 2) and OpenKBP cases.
physics_v2() {  # the v2 plans: PHYSICS_V2, else restored from the packed set
    if [ -z "${PHYSICS_V2:-}" ]; then
        PHYSICS_V2="$RUNS/physics-v2"
        [ -d "$PHYSICS_V2" ] || python -m engine.cli physics unpack \
            "$REPO/datasets/openkbp-physics-plans-v2" "$OPENKBP/train" "$PHYSICS_V2"
    fi
}
mixed_data() {  # DIR N_CLINICAL N_PHYSICS: OpenKBP cases + v2 plans, Stage A's validation
    if [ ! -d "$1" ]; then
        physics_v2
        link_first "$OPENKBP/train" "$1/train" "$2"
        link_first "$PHYSICS_V2" "$1/train/physics" "$3"
        cp -a "$RUNS/data-a/validation" "$1/"
    fi
}
mixed_data "$RUNS/data-e" "$N_E_CLINICAL" "$N_E_PHYSICS"
CACHE=$RUNS/cache-e train cache cache-e "$RUNS/data-e" "${FITTED[@]}"
[ -f "$RUNS/stage-e/model/bundle.json" ] || CACHE=$RUNS/cache-e train dose-decoder stage-e \
    "$RUNS/data-e" "${FITTED[@]}" --set "model.init_from=\"$RUNS/stage-d/model\"" \
    --set "run.max_steps=$E_STEPS" --set "data.crop=[$E_CROP]" --set optim.lr=2e-4
if [ "$F_CODEC_STEPS" -eq 0 ]; then echo "model bundle: $RUNS/stage-e/model"; exit 0; fi

# Stage F (CPU): more cases for the decoders. The cache is of Stage E's bundle (its encoder is
# the one every latent came from; the preset's VAE weights would bring back the old decoder).
mixed_data "$RUNS/data-f" "$N_F_CLINICAL" "$N_F_PHYSICS"
FROM=$RUNS/stage-e/model
F_CROPS=(--set "data.crop=[$E_CROP]")
CACHE=$RUNS/cache-f train cache cache-f "$RUNS/data-f" --set "model.init_from=\"$FROM\""
if [ "$F_STEPS" -gt 0 ]; then
    [ -f "$RUNS/stage-f/model/bundle.json" ] || CACHE=$RUNS/cache-f train dose-decoder stage-f \
        "$RUNS/data-f" --set "model.init_from=\"$FROM\"" --set "run.max_steps=$F_STEPS" \
        "${F_CROPS[@]}" --set optim.lr=2e-4
    FROM=$RUNS/stage-f/model
fi
# the codec's decoder reads only the encoder's latents: the VAE decoder it ships with is FROM's
[ -f "$RUNS/stage-f-codec/model/bundle.json" ] || CACHE=$RUNS/cache-f train codec-decoder \
    stage-f-codec "$RUNS/data-f" --set "model.init_from=\"$FROM\"" \
    --set "run.max_steps=$F_CODEC_STEPS" "${F_CROPS[@]}" --set optim.lr=3e-4
if [ "$G_STEPS" -eq 0 ] && [ "$H_STEPS" -eq 0 ] && [ "$J_STEPS" -eq 0 ]; then
    echo "model bundle: $RUNS/stage-f-codec/model"; exit 0
fi

# Stages G and H (CPU): a dose refiner on the previews of Stage F's bundle (the stage makes them
# itself with the engine, resumable; no latent cache)
REFINER=(--set "model.init_from=\"$RUNS/stage-f-codec/model\"" --set data.batch_size=16
         --set optim.lr=1e-3 --set run.eval_every=250 --set run.checkpoint_every=250)
if [ "$G_STEPS" -gt 0 ]; then
    [ -f "$RUNS/stage-g/model/bundle.json" ] || train dose-refiner stage-g "$OPENKBP/train" \
        "${REFINER[@]}" --set "run.max_steps=$G_STEPS"
    if [ "$H_STEPS" -eq 0 ] && [ "$J_STEPS" -eq 0 ]; then
        echo "model bundle: $RUNS/stage-g/model"; exit 0
    fi
fi
# Stage H: the refiner reads the beam plate; the v2 plans (several arrangements per patient)
# teach it what a beam does
mixed_data "$RUNS/data-h" "$N_H_CLINICAL" "$N_H_PHYSICS"
LAST=$RUNS/stage-h/model
if [ "$H_STEPS" -gt 0 ]; then
    [ -f "$LAST/bundle.json" ] || train dose-refiner stage-h "$RUNS/data-h" \
        "${REFINER[@]}" --set "run.max_steps=$H_STEPS" --set refiner.beam_plate=true
fi
# Stage J: the refiner reads the plan's quick plan too, which carries the optimiser's response
# to the arrangement that no beam plate holds
if [ "$J_STEPS" -gt 0 ]; then
    mixed_data "$RUNS/data-j" "$N_H_CLINICAL" "$N_J_PHYSICS"
    LAST=$RUNS/stage-j/model
    [ -f "$LAST/bundle.json" ] || train dose-refiner stage-j "$RUNS/data-j" \
        "${REFINER[@]}" --set "run.max_steps=$J_STEPS" --set refiner.beam_plate=true \
        --set refiner.quick_plan=true --set "refiner.hidden=$J_HIDDEN" --set refiner.band_mm=100 \
        --set refiner.clinical_style=true --set beam_pairs.enabled=true --set beam_pairs.weight=1 \
        --set refiner.dit_class_solution=true --set "optim.decay_steps=$J_DECAY"
fi
if [ "$I_STEPS" -eq 0 ]; then echo "model bundle: $LAST"; exit 0; fi

# Stage I: ScardNFT post-training of Stage H's bundle, on latents of its own VAE
[ -d "$RUNS/data-i" ] || link_first "$OPENKBP/train" "$RUNS/data-i/train" "$N_I"
FROM_H=(--set "model.init_from=\"$RUNS/stage-h/model\"")
CACHE=$RUNS/cache-i train cache cache-i "$RUNS/data-i" "${FROM_H[@]}"
[ -f "$RUNS/stage-i/model/bundle.json" ] || CACHE=$RUNS/cache-i train scardnft stage-i \
    "$RUNS/data-i" "${FROM_H[@]}" --set "run.max_steps=$I_STEPS" --set optim.warmup_steps=5 \
    --set run.eval_every=10 --set run.checkpoint_every=2
echo "model bundle: $RUNS/stage-i/model"
