#!/usr/bin/env bash
# gpu_check.sh: the GPU path of this reference, verified in one call (~8 min on one GPU).
#
#   bash gpu_check.sh [OUT]        (default OUT=gpu_check; everything it prints is also in OUT/log.txt)
#
# 1. builds the fused CUDA ops (stylegan2_ops.cu) and runs the CUDA parity tests against the pure path;
# 2. prints CUDA-vs-pure ratios for upfirdn2d, bias_act and a G+D step with R1 (python bench.py);
# 3. runs `torchrun --nproc_per_node 1` for 3 paper-preset steps of every stage (bf16 autocast, the
#    paper preset's default; --grad_ckpt 1), printing each step's peak memory (torch.cuda.max_memory_allocated);
# 4. times paper-size inference (256 px, bf16, after the one-time source inversion; goal >= 100 fps).
# Numbers for BENCHMARKS.md: copy the lines marked ==> with the GPU name printed first.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU visible to torch')"
python -c "import torch; print('==> GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
T0=$(date +%s)
stamp() { echo "==> [$(( $(date +%s) - T0 )) s] $*"; }

stamp "1. build the CUDA ops and run the parity tests"
python -c "import stylegan2_ops; assert stylegan2_ops.cuda_ops(); print('CUDA ops built')"
python -m pytest -q -p no:cacheprovider -m cuda tests/

stamp "2. CUDA vs pure: ops and a G+D step"
python bench.py --device cuda

stamp "3. paper preset, 3 steps of each stage, torchrun 1 process, bf16, activation checkpointing"
STEPS="--preset paper --max_steps 3 --log_every 1 --sample_every 0 --ckpt_every 3 --workers 2 --n_identities 4"
STEPS="$STEPS --clips_per_identity 2 --clip_frames 16 --frame_pool 32 --amp bf16 --grad_ckpt 1"
RUN="torchrun --standalone --nproc_per_node 1 train.py"
$RUN --stage stylegan2 $STEPS --out "$OUT/stylegan2"
$RUN --stage syncnet   $STEPS --out "$OUT/syncnet"
$RUN --stage inversion $STEPS --out "$OUT/inversion" --init "$OUT/stylegan2/last.pt"
$RUN --stage fctfg     $STEPS --out "$OUT/fctfg" --init "$OUT/inversion/last.pt" --syncnet "$OUT/syncnet/last.pt"
for s in stylegan2 syncnet inversion fctfg; do
    python -c "import json,sys; l=[json.loads(x) for x in open('$OUT/$s/log.jsonl')][-1]; \
print(f'==> $s: peak {l[\"peak_mem_gb\"]:.2f} GiB, {l[\"img_per_s\"]:.1f} img/s (batch of the paper preset)')"
done

stamp "4. paper-size inference, bf16"
python infer.py --bench --preset paper --bf16 --device cuda --seconds 8
stamp "done"
