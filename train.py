"""train.py: the settings and the loop that train each stage of FC-TFG, in paper order (Sec. 4.1.2).

  --stage judges     E_id and φ of Eq. (5) and (7) at the tiny preset  (Sec. 3.3.3, 3.3.5; the
                     paper downloads both)
  --stage stylegan2  "We first train StyleGAN2 generator"             (Sec. 4.1.2; stylegan2.py)
  --stage syncnet    the lip-sync expert behind L_sync, Eq. (4)        (Sec. 3.3.2; audio.py)
  --stage inversion  "then train HyperStyle ... with pSp encoder"     (Sec. 4.1.2; inversion.py)
  --stage fctfg      E_can, E_m, temporal fusion with Eq. (3)-(9)     (Sec. 3; fusion.py, losses.py)

What one step of each stage computes is in stages.py (the FC-TFG step reads as Eq. 8 and Eq. 9);
here: the settings of both presets, the loop (data, lr schedule, logs, samples, checkpoints,
--resume, signals) and the set-up of several processes. Each stage reads the previous stage's
checkpoint with --init; the FC-TFG stage fine-tunes the pre-trained parts as the paper says ("the
pre-trained models are fine-tuned during training"), unless --freeze_pretrained.

Run:  python train.py --stage stylegan2 --preset tiny --out runs/sg2    (1 process, CPU or GPU)
      torchrun --nproc_per_node 8 train.py --stage stylegan2 --preset paper --data /vox   (8 GPUs)

Distributed training, the nanoGPT way but without the DDP wrapper: every rank computes gradients on
its own shard of the batch and `stages.step_optimizer` averages them with ONE explicit all-reduce
per optimiser step: DDP's arithmetic, but unchanged with the double-backward of R1 / path length and
with several forward passes per step, where DDP's hooks need extra care. Only rank 0 (`is_main`)
prints and writes files.
"""
import argparse
import ast
import json
import math
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data
import files
import fusion
import losses
import stages
import stylegan2
import stylegan2_ops as ops

# ==== Presets =====================================================================================
# One row per setting: name=(tiny, paper, meaning). --preset picks a column (tiny: the CPU
# reproduction; paper: Sec. 4.1.2); every row is then also a flag --name of the value's type. TINY:
# not the paper's, see RESULTS.md.
TINY = "tiny-scale deviation, see RESULTS.md"
_csv = lambda ints: ",".join(map(str, ints))   # fusion.PRESETS' layer tuples as --layers text
SETTINGS = dict(
    # keys of each module's PRESETS
    model=("tiny", "paper", "architecture preset of every network (tiny | paper)"),
    size=(64, 256, "image side in pixels (paper: 256, Sec. 4.1.2)"),
    batch=(8, 4,
           "per-process batch: images (image stages) or windows of `window` frames (clip stages)"),
    accum=(1, 1,
           "gradient-accumulation micro-batches per step (same effective batch on fewer GPUs)"),
    max_steps=(2000, 800_000, "optimiser steps of the stage"),
    seed=(0, 0, "seed of initialisation and data order"),
    lr=(0.002, 0.002, "StyleGAN2 stage: Adam lr of G and D (StyleGAN2's 0.002)"),
    lr_fctfg=(1e-3, 1e-4, f"FC-TFG stage: Adam lr (Sec. 4.1.2: 1e-4; tiny: 1e-3, {TINY})"),
    lr_syncnet=(1e-3, 1e-4, "syncnet stage: Adam lr of the lip-sync expert (Wav2Lip: 1e-4)"),
    lr_inversion=(1e-3, 1e-4,
                  "inversion stage (and the jointly trained encoder of --recon_weight): Adam lr"),
    lr_judges=(3e-4, 3e-4,
               "judges stage: Adam lr of E_id and φ (the plain 16-conv VGG19 stalls at 1e-3)"),
    r1_gamma=(1.0, 10.0, "R1 weight of the D step (Eq. 8's regulariser, StyleGAN2 App. C)"),
    r1_every=(16, 16, "lazy R1: every N D steps (0: off)"),
    pl_weight=(2.0, 2.0, "StyleGAN2 stage: path-length regularisation weight"),
    pl_every=(4, 4, "StyleGAN2 stage: lazy path length every N G steps (0: off)"),
    pl_batch_shrink=(2, 2, "StyleGAN2 stage: path-length batch = batch / N"),
    mixing=(0.9, 0.9, "StyleGAN2 stage: style-mixing probability"),
    ema_kimg=(1.0, 10.0,
              "StyleGAN2 stage: G_ema half-life in thousands of images (10 in StyleGAN2's recipe)"),
    n_identities=(200, 5994,
                  "procedural data: people in the training split (VoxCeleb2: 5,994, Sec. 4.1.1)"),
    clips_per_identity=(5, 10, "procedural data: clips per person"),
    clip_frames=(16, 32, "frames per clip (25 fps)"),
    window=(5, 5, "temporal-fusion window in frames, non-overlapping (Sec. 4.4.2)"),
    frame_pool=(512, 0,
                "image stages: procedural frames rendered once and reused (0: render every batch)"),
    log_every=(10, 100, "steps between log lines"),
    sample_every=(100, 5000, "steps between sample grids (0: none)"),
    ckpt_every=(100, 5000, "steps between checkpoints"),
    workers=(0, 4, "background threads assembling the next step's batch (0: none)"),
    amp=("none", "bf16", "bf16 autocast on GPUs (none | bf16)"),
    temporal=("conv", "conv", "FC-TFG temporal fusion (Table 3): conv (the paper's) | lstm | none"),
    disc=("image", "image", "FC-TFG discriminator (Table 3): image (the paper's) | video"),
    ortho=("cosine", "hadamard_abs",
           f"Eq. (3) form (Table 4; tiny: cosine, {TINY}): hadamard_abs (the paper column: "
           "|z_s->c ⊙ z_c->d|, not the "
           "printed signed sum, see losses.orthogonality_loss) | signed | squared | cosine | none"),
    ortho_weight=(*(losses.LAMBDA["ortho"],) * 2,
                  "λ_ortho of Eq. (9) (losses.LAMBDA: the paper's)"),
    sync_weight=(*(losses.LAMBDA["sync"],) * 2, "λ_sync of Eq. (9) (losses.LAMBDA: the paper's)"),
    hyper_steps=(1, 3,
                 "HyperStyle refinement steps (inversion stage training; FC-TFG's source "
                 "inversion)"),
    hyper_from=(0.5, 0.5,
                "inversion stage: fraction of the steps that train pSp before HyperStyle trains"),
    mbstd_group=(4, 4, "D's minibatch-stddev group (a divisor of the images D sees per call)"),
    recon_weight=(10.0, 0.0,
                  f"StyleGAN2 stage: L1 of G(E_inv(x)) vs x with E_inv trained jointly ({TINY})"),
    expert_loss=("nce", "bce", f"syncnet stage: bce (Wav2Lip's) | nce (InfoNCE; {TINY})"),
    gan_every=(1, 1,
               f"StyleGAN2 stage with --recon_weight: D step and adversarial term every N steps "
               f"({TINY})"),
    lr_rampdown=(0, 0,
                 f"every stage: lr falls to 0 along a half cosine over the last N steps ({TINY})"),
    feature_weight=(0.0, 0.0,
                    f"StyleGAN2 and FC-TFG stages: extra L1 weight on eyes, brows and mouth "
                    f"({TINY})"),
    latent_weight=(1.0, 0.0,
                   f"FC-TFG stage: weight of |z_s->d - E_inv(x_d)|, not in Eq. (9) ({TINY})"),
    source_from=("identity", "clip",
                 f"FC-TFG stage: x_s from the same clip (clip) | any clip of the person (identity; "
                 f"{TINY})"),
    canonical=("plain", "plain",
               "FC-TFG stage: E_can a plain 2-layer MLP (Sec. 3.1) | residual (identity at init; "
               "an ablation)"),
    drive_mouth=("swap", "own",
                 f"FC-TFG stage: driving frames keep their own mouth | swap: another clip's "
                 f"({TINY})"),
    drive_colour=(0.0, 0.0,
                  f"FC-TFG stage: recolour the driving frames E_m sees, per-channel gain and "
                  f"offset up to +-this ({TINY})"),
    layers=(*(_csv(fusion.PRESETS[p]["layers"]) for p in ("tiny", "paper")),
            "FC-TFG stage: manipulated w indices (Sec. 4.1.2; tiny adds w0, see fusion.py)"),
    audio_layers=(*(_csv(fusion.PRESETS[p]["audio_layers"]) for p in ("tiny", "paper")),
                  f"FC-TFG stage: manipulated w indices whose E_m also sees z_a (Sec. 4.1.2: 7, 8; "
                  f"tiny: all, {TINY})"),
    grad_ckpt=(0, 1,
               "1: activation checkpointing of the G, D, E_inv, HyperStyle and ArcFace blocks, "
               "recomputed in backward (memory for ~1/3 more compute; not in the paper: it lets "
               "the paper preset's fine-tuned FC-TFG step fit, BENCHMARKS.md); 0: off"),
)
PRESETS = {name: {k: row[i] for k, row in SETTINGS.items()}
           for i, name in enumerate(("tiny", "paper"))}
# The tiny recipe stage by stage: where a stage's value differs from the tiny column above. With
# these, `train.py --stage S --preset tiny` IS the recipe reproduce.sh runs (it adds only paths, the
# seed and --resume); why each value: RESULTS.md, sections 3-4. The paper preset has one value per
# setting. freeze_pretrained is a run flag (recorded under 'run', not 'cfg').
STAGE_PRESETS = dict(
    tiny=dict(
        syncnet=dict(batch=32, max_steps=600),
        # the image stages see one frame each of 2000 people (a fixed pool of 4096 frames): with the
        # clip stages' 200 people the decoder learned its training faces (RESULTS.md, section 8)
        stylegan2=dict(max_steps=12000, n_identities=2000, frame_pool=4096, pl_every=0, gan_every=4,
                       feature_weight=100.0, lr_rampdown=2000),
        inversion=dict(max_steps=500, n_identities=2000, frame_pool=4096),
        fctfg=dict(batch=4, max_steps=200, feature_weight=10.0, freeze_pretrained=True)),
    paper={})
CHOICES = dict(  # the keys with a fixed set of values (argparse refuses others in one line)
    amp=("none", "bf16"), temporal=("conv", "lstm", "none"), disc=("image", "video"),
    ortho=("hadamard_abs", "signed", "squared", "cosine", "none"), expert_loss=("bce", "nce"),
    source_from=("clip", "identity"), canonical=("plain", "residual"),
    drive_mouth=("own", "swap", "closed"))
# The values a numeric setting accepts (checked once, in parse_args): at least 1 | a fraction in
# [0, 1] | above 0; every other number: finite and >= 0. Upper bounds: what one process can hold
# (batch) or a 0/1 switch.
AT_LEAST_1 = ("batch", "accum", "max_steps", "n_identities", "clips_per_identity", "clip_frames",
              "window", "log_every", "ckpt_every", "gan_every", "mbstd_group", "pl_batch_shrink",
              "size")
FRACTION = ("mixing", "hyper_from", "drive_colour", "grad_ckpt")
ABOVE_0 = ("lr", "lr_fctfg", "lr_syncnet", "lr_inversion", "lr_judges", "ema_kimg")
AT_MOST = dict(batch=4096, accum=4096, grad_ckpt=1, frame_pool=10 ** 6, workers=64,
               clip_frames=10_000, hyper_steps=100, mbstd_group=4096)
STAGES = tuple(stages.STAGE_CLASSES)  # in paper order (stages.py)
# the run flags only some stages read: given to another stage they would do nothing, so they
# are refused
STAGE_FLAGS = dict(init=("inversion", "fctfg"), arcface=("stylegan2", "inversion", "fctfg"),
                   vgg=("stylegan2", "inversion", "fctfg"),
                   syncnet=("fctfg",), audio_encoder=("fctfg",), freeze_pretrained=("fctfg",),
                   freeze_audio=("fctfg",))


def parse_args(argv=None):
    """--preset (and --stage) pick the defaults, PRESETS with the stage's STAGE_PRESETS; every key
    of them can then be overridden as --key value."""
    pre = files.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                     help="defaults of every flag below: tiny (CPU reproduction) | paper "
                     "(Sec. 4.1.2)")
    pre.add_argument("--stage", default="stylegan2", choices=STAGES,
                     help="training stage, in paper order (Sec. 4.1.2)")
    known, _ = pre.parse_known_args(argv)
    defaults = {**PRESETS[known.preset], **STAGE_PRESETS[known.preset].get(known.stage, {})}
    ap = files.ArgumentParser(description=__doc__.split("\n")[0], parents=[pre])
    ap.add_argument("--data", default="synthetic",
                    help="'synthetic' or a folder prepared by data.py")
    ap.add_argument("--out", default="runs/default", help="checkpoints, log.jsonl, samples/")
    ap.add_argument("--init", help="checkpoint of the previous stage")
    ap.add_argument("--cache_dir", help="procedural data: render each clip once into this folder "
                    "and reuse it in later runs (speed only: the pixels are identical; the "
                    "recipe's ablations share one)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    ap.add_argument("--freeze_pretrained", action=argparse.BooleanOptionalAction,
                    default=defaults.get("freeze_pretrained", False),
                    help="FC-TFG stage: keep G/E_inv/HyperStyle fixed (the paper fine-tunes them, "
                    f"Sec. 4.1.2; the tiny recipe keeps them, {TINY})")
    ap.add_argument("--freeze_audio", action="store_true", help="FC-TFG stage: keep the audio "
                    "encoder E_a fixed "
                    "too (a pre-trained one; its BatchNorm then uses running statistics)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    # tests: NaN at step N
    ap.add_argument("--inject_nan", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--syncnet",
                    help="FC-TFG stage: lip-sync expert (our syncnet stage or a Wav2Lip "
                    "lipsync_expert.pth); without it L_sync (Eq. 4) is off")
    ap.add_argument("--audio_encoder", help="FC-TFG stage: a Wav2Lip generator checkpoint "
                    "(wav2lip.pth); its audio_encoder.* weights start E_a (Sec. 4.1.2, 'a "
                    "pre-trained audio encoder introduced in [7]')")
    ap.add_argument("--arcface", help="inversion/FC-TFG: InsightFace IR-SE50 weights; without them "
                    "L_id (Eq. 5) is off")
    ap.add_argument("--vgg", help="inversion/FC-TFG: torchvision-layout VGG19 weights; without "
                    "them Eq. (7) is off")
    for k in PRESETS[known.preset]:
        v = defaults[k]
        ap.add_argument(f"--{k}", type=type(v), default=v, choices=CHOICES.get(k),
                        help=f"{SETTINGS[k][2]} (default {v})")
    args = ap.parse_args(argv)
    for k in PRESETS[known.preset]:
        v = getattr(args, k)
        if isinstance(v, str) or isinstance(v, bool):
            continue
        lo = 1 if k in AT_LEAST_1 else 0
        if not (math.isfinite(v) and v >= lo and (v > 0 or k not in ABOVE_0) and v
                <= AT_MOST.get(k, math.inf)
                and (v <= 1 or k not in FRACTION)):
            rule = "> 0" if k in ABOVE_0 else "between 0 and 1" if k in FRACTION else f">= {lo}"
            ap.error(f"--{k} {v}: must be {rule}"
                     + (f" and <= {AT_MOST[k]}" if k in AT_MOST else ""))
    size = stylegan2.PRESETS[args.model]["size"]
    if args.size != size:
        ap.error(f"--size {args.size}: the {args.model!r} networks draw {size} px frames (--data "
                 f"clips of another size are resized to it)")
    idle = [f"--{k} (read by {' / '.join(st)})" for k, st in STAGE_FLAGS.items()
            if getattr(args, k) and args.stage not in st]
    if idle:
        raise SystemExit(f"error: the {args.stage} stage does not use {', '.join(idle)}: drop it")
    return args, {k: getattr(args, k) for k in PRESETS[known.preset]}


# ==== Distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python` runs one
# process) ====
def setup_distributed(device_arg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:  # NCCL between GPUs, gloo between CPU processes
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device



def batchnorm_across_ranks(stage, world, device):
    """BatchNorm (E_a, pSp, HyperStyle, the expert) under several ranks: SyncBatchNorm on GPUs
    (global-batch statistics, as one process); gloo has none, so on CPUs the running statistics are
    averaged after each step (each rank normalises by its shard). Parameters stay the same objects
    (no optimiser rebuild). -> the hook to call after each step."""
    if world > 1 and device.type == "cuda":
        for name in stage.models:
            setattr(stage, name,
                    torch.nn.SyncBatchNorm.convert_sync_batchnorm(getattr(stage, name)))
    stats = [t for name in stage.models for m in getattr(stage, name).modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             for t in (m.running_mean, m.running_var)] if device.type != "cuda" else []
    # a no-op for one process, on GPUs, or without BatchNorm
    return lambda: stages.all_reduce_mean(stats, world)


# ==== Learning-rate schedule (any stage; off in both presets) =====================================
def lr_factor(step, max_steps, rampdown):
    """Multiplier of every optimiser's lr at `step`: 1, then a half cosine from 1 down to 0 over the
    last `rampdown` steps (0: constant lr, the paper's recipe). Why, in the tiny StyleGAN2 stage: at
    2e-3 with beta1 = 0 the jointly trained decoder hovers around its optimum, and a ramp settles it
    (RESULTS.md). The steps before the ramp do not depend on it: --resume can add one."""
    if rampdown <= 0 or step < max_steps - rampdown:
        return 1.0
    return 0.5 + 0.5 * math.cos(math.pi * ((step - (max_steps - rampdown)) / rampdown))



# ==== Checkpoints: atomic, weights_only-loadable (tensors, dicts, lists, numbers, strings only)
# ====
def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": repr(random.getstate()),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         0, 0.0))
    random.setstate(ast.literal_eval(s["python"]))  # stored as its repr, a plain string
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_state(path, stage, args, cfg, step, rank, world):
    """Write everything --resume needs (atomic): networks, optimisers, extra state, every rank's RNG
    streams, the preset config and the other flags. Several ranks: also check that the replicas
    stayed identical (cheap)."""
    rngs = [rng_state()]
    if world > 1:  # gather every rank's RNG state so a resumed run continues all of them
        rngs, sums = [None] * world, [None] * world
        dist.all_gather_object(rngs, rng_state())
        dist.all_gather_object(sums, [float(t.double().sum()) for n in stage.models
                                      for t in getattr(stage,
                                                       n).state_dict().values()
                                      if t.is_floating_point()])
        if any(s_ != sums[0] for s_ in sums):
            raise StopTraining(f"ranks diverged at step {step}: parameters or buffers differ "
                               f"between processes")
        if rank == 0:
            print(f"checkpoint at step {step}: {world} ranks hold identical parameters and buffers")
    if rank != 0:
        return
    # the other run flags: how the checkpoint was made (infer.py reads run["data"] to flag
    # procedural-only models)
    run = {k: getattr(args, k) for k in ("data", "preset", *STAGE_FLAGS)}
    files.save_checkpoint(path, {
        "stage": args.stage, "step": step, "cfg": dict(cfg), "run": run, "world": world,
        "rng": rngs,
        "extra": {n: getattr(stage, n).detach().cpu() for n in stage.extra_state},
        **{n: {k: v.detach().cpu() for k, v in getattr(stage, n).state_dict().items()}
           for n in stage.models},
        **{n: getattr(stage, n).state_dict() for n in stage.optimizers}})



def resume(stage, ck, stage_name, rank, device):
    """Load a --resume checkpoint into `stage`: networks, optimisers, extra state, this rank's RNG
    streams.
    -> the step to continue from."""
    if not isinstance(ck, dict) or ck.get("stage") != stage_name:
        what = ck.get("stage") if isinstance(ck, dict) else type(ck).__name__
        raise SystemExit(f"error: the --resume checkpoint is a {what!r} checkpoint, not "
                         f"{stage_name!r}")
    try:
        for name in stage.models + stage.optimizers:
            getattr(stage, name).load_state_dict(ck[name])
        # an older checkpoint may lack one
        for name in [n for n in stage.extra_state if n in ck["extra"]]:
            setattr(stage, name, ck["extra"][name].to(device))
        set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        return int(ck["step"])
    # another run's settings, or a damaged file
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        msg = " ".join(str(e).split())[:300]
        raise SystemExit(f"error: --resume: the checkpoint in --out does not fit this run "
                         f"({type(e).__name__}: {msg}); resume with the flags it was made with, or "
                         f"use another --out") from None

# ==== The loop ====================================================================================
class StopTraining(Exception):
    """Ends the run cleanly with exit status 3 (the message goes to stderr; the last checkpoint
    stays)."""


# Activation GiB of a step, fixed + per sample (FC-TFG: a 5-frame window and its source), from a
# fine-tuned fp32 CPU step with lazy R1: 2.91 GiB above weights, grads, Adam at --batch 1, 4.97 at 2
# (BENCHMARKS.md, Paper-preset memory)
# (model, stage, grad_ckpt) -> (fixed, per sample)
ACTIVATION_GB = {("paper", "fctfg", 1): (0.85, 2.06)}


def stage_networks(stage):
    """Every network a stage holds (trained, frozen and judges): its nn.Module attributes."""
    return [v for v in vars(stage).values() if isinstance(v, torch.nn.Module)]


def memory_check(stage, stage_name, cfg, device):
    """Before the first step: fp32 weights of every network, gradients and Adam's two moments of
    those that train, + ACTIVATION_GB where measured, against the device's free memory -> the line
    to print (WARNING: won't fit)."""
    # shared ones once
    params = {id(p): p for net in stage_networks(stage) for p in net.parameters()}.values()
    n_train, n_all = sum(p.numel() for p in params
                         if p.requires_grad), sum(p.numel() for p in params)
    fixed = (4 * n_all + 12 * n_train) / 2 ** 30             # weights; grads + Adam m, v of trained
    act = ACTIVATION_GB.get((cfg["model"], stage_name, cfg["grad_ckpt"]))
    # --accum: micro-batches run one at a time
    est = fixed + (act[0] + act[1] * cfg["batch"] if act else 0.0)
    # free memory: the GPU's, or on a CPU the kernel's MemAvailable (in KiB); None where unknown
    try:
        free = torch.cuda.mem_get_info(device)[0] / 2 ** 30 if device.type == "cuda" else \
            int(re.search(r"MemAvailable:\s*(\d+)", Path("/proc/meminfo").read_text())[1]) / 2 ** 20
    except (OSError, TypeError):
        free = None
    acts = (f"{act[0]:.2f} + {act[1]:.2f} GiB activations x batch {cfg['batch']}" if act
            else "activations (not measured for this setting)")
    line = (f"memory estimate: {fixed:.1f} GiB weights, gradients and Adam moments "
            f"({n_train / 1e6:.1f} M of "
            f"{n_all / 1e6:.1f} M parameters train) + {acts} = {est:.1f} GiB"
            + (f"; {free:.1f} GiB available on {device.type}" if free is not None else ""))
    if free is not None and est > free:
        line += ("\nWARNING: this will not fit: the run will be killed for memory (CPU) or stop "
                 "with out of memory (GPU). Lower --batch (--accum keeps the effective batch), set "
                 "--grad_ckpt 1, or --freeze_pretrained (FC-TFG).")
    return line


def peak_memory_gb(device):
    """Peak memory so far: torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on a
    CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20     # Linux reports KiB


def print_start(stage, args, cfg, world, device, start, resumed):
    """Rank 0's start-up lines: the run, the stage's note, the memory estimate (paper preset or a
    GPU)."""
    if resumed:
        print(f"resumed from {Path(args.out) / 'last.pt'} at step {start}")
    print(f"stage {args.stage} | preset {args.preset} | {world} process(es) on {device} | batch "
          f"{cfg['batch']} x "
          f"{cfg['accum']} x {world} | steps {start}..{cfg['max_steps']} | out {Path(args.out)}")
    if stage.note:
        print(stage.note)
    if cfg["model"] == "paper" or device.type == "cuda":
        print(memory_check(stage, args.stage, cfg, device))


def log_step(log_file, step, vals, rate, eta_s, mem_gb):
    """One line of log.jsonl and of the console: the step's losses, throughput, peak memory and
    ETA."""
    print(json.dumps({"step": step, "time": time.time(), "img_per_s": rate, "peak_mem_gb": mem_gb,
                      **vals}),
          file=log_file, flush=True)
    print(f"step {step:7d} | " + " ".join(f"{k} {v:.4f}" for k, v in vals.items())
          + f" | {rate:.1f} img/s | peak mem {mem_gb:.1f} GiB | ETA {eta_s / 60:.1f} min",
          flush=True)


def check_paths(args, out):
    """--out must not be where an input lives: its last.pt would replace a checkpoint this run
    reads."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (checkpoints, log.jsonl, samples/ "
                         f"go there)")
    for flag in ("init", "syncnet", "audio_encoder", "arcface", "vgg"):
        src = getattr(args, flag)
        if src is not None and Path(src).resolve() == (out / "last.pt").resolve():
            raise ValueError(f"--out {out} holds the --{flag} checkpoint {src}: this run's last.pt "
                             f"would replace it; choose another --out")


def clean_leftovers(out, step):
    """A run killed mid-write leaves .*.tmp<pid>.* files (files.temp_path) and, resumed at `step`, a
    log whose lines past that step will be written again: drop both (rank 0, at start)."""
    files.remove_temporaries(out)
    log = out / "log.jsonl"
    if log.is_file():
        keep = [line for line in log.read_text().splitlines(keepends=True)
                if _logged_step(line) is not None and _logged_step(line) <= step]
        files.write_text(log, "".join(keep))


def _logged_step(line):
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None                               # a torn last line (killed mid-write)


def build_stage(args, cfg, rank, world, device):
    """The stage's networks (activation checkpointing as --grad_ckpt says), the hook that keeps
    BatchNorm statistics alike across ranks, and this rank's batches of the stage's dataset."""
    stage = stages.stage_class(args.stage, cfg)(cfg, device, args)
    ops.use_checkpointing(stage_networks(stage), bool(cfg["grad_ckpt"]))
    sync_bn = batchnorm_across_ranks(stage, world, device)
    clips = data.make_clip_dataset(cfg, args.data, cache_dir=args.cache_dir)
    batches = data.Batches(stage.dataset(clips), cfg["batch"], rank, world, cfg["seed"])
    return stage, sync_bn, batches


def set_lr(stage, step, max_steps, rampdown):
    """Every optimiser's lr = its base lr x lr_factor(...) when a ramp is set (--lr_rampdown). The
    base lr is kept in the param group, so it travels with the optimiser (--resume)."""
    if not rampdown:
        return
    factor = lr_factor(step, max_steps, rampdown)
    for group in (g for name in stage.optimizers for g in getattr(stage, name).param_groups):
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor


def finite_values(logs, step, inject_nan, last):
    """The step's logged values as floats; a non-finite one stops the run and the last checkpoint
    stays good (--inject_nan: the tests' NaN)."""
    vals = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in logs.items()}
    bad = [k for k, v in vals.items() if not math.isfinite(v)] + ["injected"] * (inject_nan == step)
    if bad:
        raise StopTraining(f"non-finite loss {bad} at step {step}; last good checkpoint: {last}")
    return vals


def train(argv=None):
    args, cfg = parse_args(argv)
    out, n_steps = Path(args.out), cfg["max_steps"]
    last = out / "last.pt"
    try:
        check_paths(args, out)
        # what --resume continues
        ck = files.load_checkpoint(last) if args.resume and last.is_file() else None
    except ValueError as e:
        print(f"error: {e}" + ("; delete it to start afresh" if "not a loadable" in str(e)
                               else ""), file=sys.stderr)
        return 2
    if isinstance(ck, dict) and ck.get("stage") == args.stage and ck.get("step", 0) >= n_steps:
        print(f"{last} is already at step {ck['step']} (--max_steps {n_steps}): nothing to do")
        return 0  # a finished stage: return before building its dataset
    rank, world, device = setup_distributed(args.device)
    # bf16 autocast on GPUs only
    is_main, use_amp = rank == 0, cfg["amp"] == "bf16" and device.type == "cuda"
    torch.manual_seed(cfg["seed"])  # the same seed everywhere: every rank builds identical networks
    try:
        stage, sync_bn, batches = build_stage(args, cfg, rank, world, device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # then per-rank seeds: different noise per shard
    for seed in (torch.manual_seed, np.random.seed, random.seed):
        seed(cfg["seed"] + rank)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)
    start = 0 if ck is None else resume(stage, ck, args.stage, rank, device)

    stop = []  # SIGTERM / SIGINT caught while training: finish the current step, save, exit
    handlers = {s: signal.signal(s, lambda sig, frame: stop.append(sig))
                for s in (signal.SIGTERM, signal.SIGINT)}
    if is_main:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        clean_leftovers(out, start)
        print_start(stage, args, cfg, world, device, start, resumed=ck is not None)
    log_file = open(out / "log.jsonl", "a") if is_main else None
    t0, n_img = time.time(), 0
    prefetch = data.Prefetch(batches, cfg["accum"], cfg["workers"], n_steps)
    try:
        for step in range(start, n_steps):
            try:
                micro = [{k: v.to(device) if torch.is_tensor(v) else v
                          for k, v in batch_cpu.items()} for batch_cpu in prefetch(step)]
            except (ValueError, OSError) as e:   # e.g. a prepared clip that no longer decodes
                raise StopTraining(f"training data at step {step}: {e}; last good checkpoint: "
                                   f"{last}") from None
            set_lr(stage, step, n_steps, cfg["lr_rampdown"])
            try:
                logs = stage.step(step, micro, world, autocast)
                sync_bn()
            except torch.cuda.OutOfMemoryError:
                raise StopTraining(f"out of GPU memory at batch {cfg['batch']}: lower --batch and "
                                   f"raise --accum to keep the same effective batch") from None
            vals = finite_values(logs, step, args.inject_nan, last)
            n_img += cfg["batch"] * cfg["accum"] * world * stage.frames_per_sample
            done = step + 1
            if is_main and (done % cfg["log_every"] == 0 or done == n_steps):
                log_step(log_file, done, vals, n_img / (time.time() - t0),
                         (n_steps - done) * (time.time() - t0) / (done - start),
                         peak_memory_gb(device))
            if is_main and cfg["sample_every"] and done % cfg["sample_every"] == 0:
                files.save_image_grid(stage.samples(micro[0], cfg["seed"]),
                                      out / "samples" / f"{done:07d}.png",
                                      nrow=stage.grid_nrow)
            if done % cfg["ckpt_every"] == 0 or done == n_steps or stop:
                save_state(last, stage, args, cfg, done, rank, world)
            if stop:
                if is_main:
                    print(f"signal {stop[-1]}: saved {last} at step {done}, exiting")
                break
        if is_main:  # every log line was flushed: the file is complete
            files.plot_losses(out / "log.jsonl", out / "loss.png")  # the run's loss curves, one PNG
    except StopTraining as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        prefetch.close()
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if log_file:
            log_file.close()
        if world > 1:
            dist.destroy_process_group()
    return 0


def main(argv=None):
    """The command line: train(), and Ctrl-C or SIGTERM before the loop has begun (while data are
    rendered) in one line (in the loop both save a checkpoint and stop)."""
    return files.run_command(lambda: train(argv),
                             "interrupted before the first step: nothing was saved")


if __name__ == "__main__":
    sys.exit(main())
