#!/bin/bash
# Stage the next GPU run (issue 15: the DiT on the clinical cases + the v2 physics plans) in
# REPO/.gpu, ready to send: the kit of ../shared/gpu (read-only there) copied, its pack.py pointed
# at datasets/openkbp-physics-plans-v2 (the kit packs the v1 set), call2-candidates.sh as
# call2/run.sh, the data and the start bundle packed. The kit's pack.py copies only the DiT, codec
# and VAE, so the bundle's other weight files (Stage H's refiner) are added to call2/bundle here:
# `train dose` refuses an init_from bundle that misses a listed weight file.
#   bash resources/models/default/gpu/prepare.sh             the real thing (a few minutes)
#   DRY=1 bash resources/models/default/gpu/prepare.sh       6 patients, then both calls run on
#                                                            this CPU (DRY=1) into /tmp/dp-dry
# Environment: KIT (../shared/gpu), OPENKBP (../shared/data/openkbp), BUNDLE (the shipped one).
# .gpu/ is untracked so that it travels with a device call: never commit it, and before the call
# take what it does not need out of the index (see README.md next to this file).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../../.." && pwd)
KIT=$(cd "${KIT:-$REPO/../shared/gpu}" && pwd)
OPENKBP=${OPENKBP:-$REPO/../shared/data/openkbp}
BUNDLE=${BUNDLE:-$REPO/resources/models/default}
DRY=${DRY:-0}
G=$REPO/.gpu
PY=${PY:-python}

rm -rf "$G" && cp -r "$KIT" "$G" && chmod -R u+w "$G"
sed -i 's#"datasets/openkbp-physics-plans"#"datasets/openkbp-physics-plans-v2"#' "$G/pack.py"
grep -q '"datasets/openkbp-physics-plans-v2"' "$G/pack.py" || {
    echo "prepare.sh: the kit's pack.py no longer names datasets/openkbp-physics-plans; adapt this script" >&2
    exit 1
}
cp "$REPO/resources/models/default/gpu/call2-candidates.sh" "$G/call2/run.sh"

LIMIT=(); [ "$DRY" = 1 ] && LIMIT=(--limit 6)
(cd "$G" && $PY pack.py --project "$REPO" --openkbp "$OPENKBP" --bundle "$BUNDLE" "${LIMIT[@]}")

# the weight files bundle.json lists beyond the three pack.py copies
mapfile -t EXTRA < <($PY - "$BUNDLE/bundle.json" <<'EOF'
import json, sys
parts = json.load(open(sys.argv[1]))["components"].values()
print("\n".join(p["weights"] for p in parts
                if p["weights"] not in ("dit.safetensors", "tiny_codec.safetensors", "vae.safetensors")))
EOF
)
for f in "${EXTRA[@]}"; do
    cp "$BUNDLE/$f" "$G/call2/bundle/"
    (cd "$BUNDLE" && sha256sum "$f") >> "$G/call2/bundle/SHA256SUMS"
done
echo "call2/bundle: $(ls "$G/call2/bundle" | tr '\n' ' ')"
du -sh "$G/call1" "$G/call2" "$G/common"

if [ "$DRY" = 1 ]; then
    DP=/tmp/dp-dry
    rm -rf "$DP" /tmp/dp-dry-out1 /tmp/dp-dry-out2
    (cd "$REPO" && DRY=1 DP=$DP OUT=/tmp/dp-dry-out1 PY=$(command -v $PY) bash .gpu/call1/run.sh > /tmp/dp-dry-call1.log 2>&1)
    (cd "$REPO" && DRY=1 DP=$DP OUT=/tmp/dp-dry-out2 PY=$(command -v $PY) bash .gpu/call2/run.sh > /tmp/dp-dry-call2.log 2>&1)
    tail -12 /tmp/dp-dry-call2.log
    want=$(echo ${CANDIDATES:-single pairs0 pairs2} | wc -w)
    n=$(ls "$DP"/runs/*/model/dit.safetensors 2>/dev/null | wc -l)
    echo "dry run: $n of $want candidates exported (logs /tmp/dp-dry-call{1,2}.log)"
    [ "$n" = "$want" ]
fi
