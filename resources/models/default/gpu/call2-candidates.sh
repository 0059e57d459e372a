#!/bin/bash
# DosePilot GPU call 2 (after call 1, same machine, $DP persists): restore the physics plans,
# finish the volume + latent caches, then three `train dose` candidates from the same bundle, on
# the same data, seeds and step count, side by side on one GPU (latents held in memory):
#   single  - the current recipe (batch 32 single plans)
#   pairs0  - batch 16 pairs of plans of one patient, no pair loss (isolates the sampling)
#   pairs2  - the same pairs with the dose-difference loss, weight 2
# Each is stopped by SIGTERM at a deadline if it has not reached STEPS, then exported.
T0=$(date +%s)
CALL=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd); G=$(dirname "$CALL")
DRY=${DRY:-0}; DP=${DP:-/root/dp}; OUT=${OUT:?OUT must be set}
DEV=cuda; [ "$DRY" = 1 ] && DEV=cpu
PREP_END=${PREP_END:-140}; STOP=${STOP:-470}; END=${END_S:-550}
STEPS=${STEPS:-2000}; BATCH=${BATCH:-32}; LR=${LR:-3e-4}; WARMUP=${WARMUP:-50}; PAIR_W=${PAIR_W:-2.0}
if [ "$DRY" = 1 ]; then BATCH=2; STEPS=${DRY_STEPS:-4}; fi
export DRY DP OUT DEV T0 G; source "$G/common/lib.sh"
log "call 2 start (DRY=$DRY, DP=$DP, STEPS=$STEPS)"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null | tee -a "$LOGS/steps.log"
[ -d "$DP/data/train" ] && [ -f "$DP/vae/vae.safetensors" ] || { log "FATAL: $DP from call 1 is missing"; cp "$LOGS/steps.log" "$OUT/"; exit 1; }
setup_env || { cp "$LOGS/steps.log" "$OUT/"; exit 1; }
mkdir -p "$DP/bundle" && cp "$CALL"/bundle/* "$DP/bundle/" && cp "$DP/vae/vae.safetensors" "$DP/bundle/"
(cd "$DP/bundle" && sha256sum -c --quiet "$CALL/bundle/SHA256SUMS" 2>&1) && log "start bundle verified" || log "WARNING: bundle checksum mismatch"
rm -f "$DP/bundle/SHA256SUMS"
common_sets
NAMES=(${CANDIDATES:-single pairs0 pairs2})   # any of the three; two DiTs return in one call
for r in "${NAMES[@]}"; do [ -d "$DP/runs/$r" ] && mv "$DP/runs/$r" "$DP/runs/$r.old.$T0"; done

extract_chunks
unpack_physics 90
build_volumes $(left $((PREP_END - 60)))
build_latents $(left $PREP_END)
rm -rf "$DP/data_train"; n=$(make_subset "$DP/data" "$DP/cache" "$DP/data_train" | tail -1)
log "training cases with latents: $n of $(find -L "$DP/data" -name 'pt_*.npz' | wc -l)"
DATA="$DP/data_train"
(cd "$PROJ" && timeout 120 $PY -m engine.cli train cache "${S[@]}" --data "$DATA" --out "$DP/runs/cache-call2-index" \
    --set "run.device=\"$DEV\"" > "$LOGS/latents_index.log" 2>&1); log "index cache rc=$?"

args() {   # the trainer arguments of candidate $1
    local a=("${S[@]}" --data "$DATA" --out "$DP/runs/$1" --set "run.device=\"$DEV\"" --set run.threads=4
        --set "model.init_from=\"$DP/bundle\"" --set optim.lr=$LR --set data.latents_in_memory=true
        --set optim.warmup_steps=$WARMUP --set optim.grad_clip=0.1 --set run.log_every=10
        --set run.eval_every=250 --set run.checkpoint_every=100 --set run.keep_checkpoints=2)
    case $1 in
        single) a+=(--set data.batch_size=$BATCH) ;;
        pairs0) a+=(--set data.batch_size=$((BATCH / 2)) --set beam_pairs.enabled=true --set beam_pairs.weight=0.0) ;;
        pairs2) a+=(--set data.batch_size=$((BATCH / 2)) --set beam_pairs.enabled=true --set beam_pairs.weight=$PAIR_W) ;;
    esac
    printf '%s\n' "${a[@]}"
}
t=$(date +%s); log "candidates start: ${NAMES[*]} ($STEPS steps, $BATCH samples per step) until +${STOP}s"
for r in "${NAMES[@]}"; do
    mapfile -t A < <(args $r)
    train_until $((T0 + STOP)) "$LOGS/${r}_train.log" 45 $PY -m engine.cli train dose "${A[@]}" --set run.max_steps=$STEPS &
done
wait
for r in "${NAMES[@]}"; do log "$r: rc in log tail: $(tail -2 "$LOGS/${r}_train.log" | tr '\n' ' ' | cut -c1-200)"; done
phase candidates $(( $(date +%s) - t ))
for r in "${NAMES[@]}"; do
    step=$(latest_step "$DP/runs/$r"); log "$r: checkpoint step $step"
    if [ ! -f "$DP/runs/$r/model/dit.safetensors" ] && [ "$step" -gt 0 ]; then
        mapfile -t A < <(args $r)
        (cd "$PROJ" && timeout $(left $END) $PY -m engine.cli train dose "${A[@]}" --set run.max_steps=$step --resume) \
            > "$LOGS/${r}_export.log" 2>&1 &
    fi
done
wait
# package: each candidate's dit.safetensors + bundle.json + events, one tar split in 15 MB parts
mkdir -p "$DP/ret"; rm -rf "$DP/ret"/*
for r in "${NAMES[@]}"; do
    M="$DP/runs/$r/model"; [ -f "$M/bundle.json" ] || { log "$r: no exported model"; continue; }
    mkdir -p "$DP/ret/$r"; cp "$M/bundle.json" "$M/dit.safetensors" "$DP/ret/$r/"
    tail -c 2000000 "$DP/runs/$r/events.jsonl" > "$DP/ret/$r/events.jsonl"
    (cd "$DP/ret/$r" && sha256sum dit.safetensors bundle.json > SHA256SUMS)
done
tar -C "$DP/ret" -cf - . | split -b 15M - "$OUT/candidates.tar.part-"
tar -C "$DP" -cJf "$OUT/logs.tar.xz" logs 2>/dev/null
ls -la "$OUT"; du -sh "$OUT"
log "call 2 end"
tail -40 "$LOGS/steps.log"
