#!/usr/bin/env bash
# Reproduction recipe (issue 11): the whole FC-TFG pipeline on the procedural dataset, tiny preset,
# 2 CPU cores. Stages in paper order (Sec. 4.1.2): SyncNet expert, StyleGAN2, inversion (pSp +
# HyperStyle), FC-TFG. Every number is a seed or a step count; rerunning gives the same weights.
# Usage: bash reproduce.sh [OUT_DIR]   (default runs/repro)
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/repro}
SEED=${SEED:-0}
COMMON="--preset tiny --device cpu --seed $SEED --n_identities 200 --clips_per_identity 5 --clip_frames 16"
python train.py --stage syncnet   $COMMON --out "$OUT/syncnet"   --max_steps 1500 --batch 16 --sample_every 0
python train.py --stage stylegan2 $COMMON --out "$OUT/stylegan2" --max_steps 2000 --batch 8 --frame_pool 2048
python train.py --stage inversion $COMMON --out "$OUT/inversion" --max_steps 800  --batch 8 --frame_pool 2048 \
    --init "$OUT/stylegan2/last.pt"
python train.py --stage fctfg     $COMMON --out "$OUT/fctfg"     --max_steps 800  --batch 4 \
    --init "$OUT/inversion/last.pt" --syncnet "$OUT/syncnet/last.pt"
# The shipped default of infer.py: generator-side weights only, stored in fp16 (load_state_dict casts back).
mkdir -p checkpoints
python - "$OUT/fctfg/last.pt" checkpoints/fctfg_tiny.pt <<'PY'
import os, sys, torch
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
halves = {}  # HyperStyle's shared hypernetwork sits under several keys: convert (and store) it once
def half(v):
    if not v.is_floating_point():
        return v
    key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
    return halves.setdefault(key, v.half())
slim = {"stage": "fctfg", "step": ck["step"], "cfg": ck["cfg"],
        "fctfg": {k: half(v) for k, v in ck["fctfg"].items()}}
torch.save(slim, sys.argv[2] + ".tmp")
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
print(f"wrote {sys.argv[2]} ({os.path.getsize(sys.argv[2]) / 2**20:.1f} MiB)")
PY
echo "done: $OUT/fctfg/last.pt -> checkpoints/fctfg_tiny.pt"
