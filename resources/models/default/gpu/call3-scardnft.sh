#!/bin/bash
# DosePilot GPU call 3 (a fresh machine): ScardNFT post-training (seed §B.5) of the bundle in
# call3/bundle on the OpenKBP cases of call3/data: volume + latent caches, then `train scardnft`
# (rank-64 LoRA, group of 4 rollouts per case) until a deadline, exported by a --resume rerun;
# the merged DiT comes back split in 15 MB parts.
T0=$(date +%s)
CALL=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd); G=$(dirname "$CALL")
DRY=${DRY:-0}; DP=${DP:-/root/dp}; OUT=${OUT:?OUT must be set}
DEV=cuda; [ "$DRY" = 1 ] && DEV=cpu
STOP=${STOP:-170}; END=${END_S:-200}; BATCH=${BATCH:-8}; LR=${LR:-1e-4}; RANK=${RANK:-64}
MAX=100000; if [ "$DRY" = 1 ]; then BATCH=2; MAX=2; fi
export DRY DP OUT DEV T0 G; source "$G/common/lib.sh"
log "call 3 start (DRY=$DRY, DP=$DP)"
setup_env || { cp "$LOGS/steps.log" "$OUT/"; exit 1; }
mkdir -p "$DP/vae" "$DP/bundle" && cp "$CALL/bundle/vae.safetensors" "$CALL/bundle/bundle.json" "$DP/vae/"
cp "$CALL"/bundle/* "$DP/bundle/"
(cd "$DP/bundle" && sha256sum -c --quiet SHA256SUMS 2>&1) && log "start bundle verified" || log "WARNING: bundle checksum mismatch"
extract_chunks
build_volumes 60
build_latents 100
common_sets
A=("${S[@]}" --data "$DP/data" --out "$DP/runs/nft" --set "run.device=\"$DEV\"" --set run.threads=8
   --set "model.init_from=\"$DP/bundle\"" --set data.batch_size=$BATCH --set optim.lr=$LR
   --set optim.warmup_steps=5 --set lora.rank=$RANK --set lora.alpha=$RANK --set run.log_every=1
   --set run.eval_every=20 --set run.checkpoint_every=5 --set run.keep_checkpoints=2)
t=$(date +%s); log "scardnft starts until +${STOP}s"
train_until $((T0 + STOP)) "$LOGS/nft_train.log" 20 $PY -m engine.cli train scardnft "${A[@]}" --set run.max_steps=$MAX
step=$(latest_step "$DP/runs/nft"); log "scardnft stopped, checkpoint step $step ($(( $(date +%s) - t )) s)"
if [ "$step" -gt 0 ]; then
    (cd "$PROJ" && timeout $(left $END) $PY -m engine.cli train scardnft "${A[@]}" --set run.max_steps=$step --resume) \
        > "$LOGS/nft_export.log" 2>&1; log "export rc=$?"
fi
M="$DP/runs/nft/model"
if [ -f "$M/dit.safetensors" ]; then
    (cd "$M" && sha256sum dit.safetensors bundle.json > "$OUT/SHA256SUMS"); cp "$M/bundle.json" "$OUT/"
    split -b 15M "$M/dit.safetensors" "$OUT/dit.safetensors.part-"
fi
tail -c 3000000 "$DP/runs/nft/events.jsonl" > "$OUT/nft_events.jsonl" 2>/dev/null
tail -c 20000 "$LOGS/nft_train.log" > "$OUT/nft_train.log"
ls -la "$OUT"; log "call 3 end"; tail -20 "$LOGS/steps.log"
