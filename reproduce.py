"""reproduce.py: the helpers of the reproduction study (reproduce.sh): export the shipped checkpoint,
draw the paper's figures on procedural test identities, and collect the tables of RESULTS.md.

  export SRC DST            fp16 generator-side copy of an fctfg checkpoint (what infer.py ships with)
  figures CKPT OUT          Fig. 5 (canonical space: inputs vs G(E_can(E_inv(x)))), a Fig. 4-style
                            cross-identity strip (source | driving | ground truth | generated) and the
                            attribute-transfer sheet (one attribute per row triple)
  tables RUNS               the attribute table and Table 1 / 3 / 4 analogues from the evaluate.py
                            results under RUNS (markdown)
  cost [--preset paper]     FLOPs per training sample of every stage (the paper-scale cost estimate)

Paper map: Fig. 4 (reenactment comparison), Fig. 5 (canonical space), Fig. 6 (pose spread of the
canonical space, reported in the tables as canon_pose_std), Tables 1, 3 and 4 (Sec. 4.2-4.4).
Everything runs on the procedural TEST split (procedural.TEST_IDS), which no training stage sees.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import stylegan2
import data
import procedural


def _f(v, fmt="{:.3f}"):
    """A table cell: '-' for a missing number."""
    return "-" if v is None else fmt.format(v)


def export(src, dst):
    """Keep what infer.py needs (the FCTFG state dict, cfg, step) in float16; the discriminator and the
    optimiser states stay behind. HyperStyle's shared hypernetwork appears under several keys that
    share storage: convert (and store) each storage once, or the file doubles."""
    ck = stylegan2.load_checkpoint(src)
    if ck.get("stage") != "fctfg":
        raise ValueError(f"{src} is a {ck.get('stage')!r} checkpoint; export needs an fctfg one")
    halves = {}

    def half(v):
        if not v.is_floating_point():
            return v
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        return halves.setdefault(key, v.half())

    slim = {"stage": "fctfg", "step": ck["step"], "cfg": ck["cfg"], "run": ck.get("run", {}),
            "fctfg": {k: half(v) for k, v in ck["fctfg"].items()}}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    stylegan2.save_checkpoint(dst, slim)
    return dst.stat().st_size


@torch.no_grad()
def figures(ckpt, out, n=6, frames=(0, 6, 12, 18, 24, 30), seed=0):
    """Fig. 5, a Fig. 4-style strip and the attribute-transfer sheet on procedural test identities.
    -> list of written PNG paths."""
    import numpy as np
    import fusion
    model, cfg = fusion.FCTFG.load(ckpt, "cpu")
    size = model.G.size
    ds = data.SyntheticTalkingFaces("test", n_identities=n, clips_per_identity=1,
                                    n_frames=max(frames) + 1, size=size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    # Fig. 5a: one frame of each of n people (all with their own pose) and its canonical image
    x = torch.stack([ds[i]["frames"][frames[i % len(frames)]] for i in range(n)])
    z = model.E_inv(x)
    canon, recon = model.canonical(z), model.G.synthesis(z)
    p = out / "fig5_canonical_space.png"
    stylegan2.save_image_grid(torch.cat([x, recon, canon]), p, nrow=n)
    written.append(p)
    # Fig. 5b: every listed frame of ONE clip, and each one taken to canonical space
    clip = ds[0]["frames"][list(frames)]
    canon_t = model.canonical(model.E_inv(clip))
    p = out / "fig5b_one_video_canonical.png"
    stylegan2.save_image_grid(torch.cat([clip, canon_t]), p, nrow=len(frames))
    written.append(p)
    # Fig. 4-style: person A (source frame 0) driven by person B's clip (pose, eyes, audio)
    hs = int(cfg.get("hyper_steps", 1))
    rows = []
    for a, b in ((0, 1), (2, 3)):
        src, drv, gt = ds[a], ds[b], ds.cross(a, b)
        gen = model.generate(src["frames"][0], drv["frames"], drv["mel"], hs)["x_g"]
        sel = list(frames)
        rows += [torch.cat([src["frames"][:1], drv["frames"][sel]]),
                 torch.cat([src["frames"][:1], gt["frames"][sel]]),
                 torch.cat([src["frames"][:1], gen[sel]])]
    p = out / "fig4_cross_identity.png"
    stylegan2.save_image_grid(torch.cat(rows), p, nrow=len(frames) + 1)
    written.append(p)
    # The attribute-transfer table as pictures: for each attribute, the driving clip of person B (only
    # that attribute moves; lips: B's mouth stays shut, the audio speaks), the ground truth (A doing it)
    # and FC-TFG (A's neutral still + B's clip + the audio); the first two people of the 'report' split
    base = procedural.ATTRIBUTE_SPLITS["report"]
    A, B = (procedural.make_identity(procedural.TEST_IDS[base + k]) for k in (0, 1))
    x_s = data.clip_sample(procedural.render(A, np.zeros(len(procedural.MOTION_KEYS), np.float32), size)[None],
                           np.zeros(data.SPF, np.float32))["frames"][0]
    T, rows = 32, []
    sel = list(range(0, T, 3))
    for attr in procedural.ATTRIBUTE_CLIPS:
        drive, full, audio = procedural.attribute_motion(attr, base, T)
        x_d = data.clip_sample(procedural.render_clip(B, drive, size), audio)
        gt = data.clip_sample(procedural.render_clip(A, full, size), audio)["frames"]
        gen = model.generate(x_s, x_d["frames"], x_d["mel"], hs)["x_g"]
        rows += [x_d["frames"][sel], gt[sel], gen[sel]]
    p = out / "fig_attributes.png"
    stylegan2.save_image_grid(torch.cat(rows), p, nrow=len(sel))
    written.append(p)
    return written


# ----------------------------------------------------------------------------------------------------
# Cost of the paper-scale recipe: FLOPs of one real training step of each stage, counted by torch
# ----------------------------------------------------------------------------------------------------

def _fake_batch(stage_name, cfg, B):
    """Random inputs of the shape each stage's step() receives (values do not change the FLOPs)."""
    S, W = cfg["size"], cfg["window"]
    if stage_name in ("stylegan2", "inversion"):
        return {"image": torch.rand(B, 3, S, S) * 2 - 1}
    if stage_name == "syncnet":
        return {"frames": torch.rand(B, 5, 3, S, S) * 2 - 1, "mel_expert": torch.randn(B, 1, 80, 16),
                "y": torch.tensor([1.0, 0.0] * (B // 2) + [1.0] * (B % 2))}
    return {"frames": torch.rand(B, W, 3, S, S) * 2 - 1, "mel": torch.randn(B, W, 1, 80, 16),
            "source": torch.rand(B, 3, S, S) * 2 - 1}


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs):
    """FLOPs of aten.convolution_backward that respect groups: each of grad_input and grad_weight costs
    what the forward conv costs, 2 * (output or input elements) * (weight elements per output channel).
    torch's own formula drops `groups` for grad_weight, which overcounts the grouped (batch-as-groups)
    modulated convs of StyleGAN2 by a factor of the batch size (measured: 1.76 vs 0.71 GFLOP per
    image at batch 4 vs 1)."""
    import math
    per_out = math.prod(w_shape[1:])                     # (C_in / groups) * kh * kw, or C_out/groups for transposed
    fwd = 2 * math.prod(x_shape if transposed else grad_out_shape) * per_out
    return fwd * (int(output_mask[0]) + int(output_mask[1]))


def step_flops(stage_name, preset="paper", batch=2, **overrides):
    """FLOPs of one optimiser step of train.py's `stage_name` stage per training sample (image for
    stylegan2/inversion, 5-frame window for syncnet/fctfg), counted with torch.utils.flop_counter on
    CPU (convolutions and matmuls: >99 % of the work). The step counted is step 1, one without the
    lazy R1 / path-length terms (their autograd.grad does not run under the counter's module hooks;
    amortised over 16 and 4 steps they add roughly 10-20 %). Pre-trained judges that need downloaded weights (ArcFace,
    VGG19, the lip-sync expert) are not in the count: L_id, L_LPIPS and L_sync add their forward and
    input-gradient passes on top. Returns (flops per sample, seconds per sample on this CPU)."""
    import time
    from torch.utils.flop_counter import FlopCounterMode
    import train
    args, cfg = train.parse_args(["--preset", preset, "--stage", stage_name, "--batch", str(batch),
                                  *[a for k, v in overrides.items() for a in (f"--{k}", str(v))]])
    torch.manual_seed(0)
    stage = train.STAGE_CLASSES[stage_name](cfg, torch.device("cpu"), args)
    mb = _fake_batch(stage_name, cfg, batch)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    t = time.perf_counter()
    with counter:
        stage.step(1, [mb], 1, lambda: torch.autocast("cpu", enabled=False))
    return counter.get_total_flops() / batch, (time.perf_counter() - t) / batch


def cost(preset="paper", log=print):
    """FLOPs per sample of every stage at `preset` -> dict name -> (flops, cpu seconds per sample)."""
    out = {}
    for name, stage, kw in (("syncnet", "syncnet", {}), ("stylegan2 (no R1/PL step)", "stylegan2", {}),
                            ("pSp", "inversion", {}), ("HyperStyle", "inversion", {"hyper_from": 0.0}),
                            ("fctfg", "fctfg", {})):
        batch = 4 if stage in ("stylegan2", "fctfg") else 2   # D's minibatch-stddev group is 4
        out[name] = step_flops(stage, preset, batch=batch, **kw)
        log(f"{name:28s} {out[name][0] / 1e9:10.1f} GFLOP per sample | {out[name][1]:.2f} s per sample on this CPU")
    return out


# ----------------------------------------------------------------------------------------------------
# Tables: read evaluate.py's results.json files (RUNS/eval/<name>/results.json)
# ----------------------------------------------------------------------------------------------------

def _load(runs, name):
    p = Path(runs) / "eval" / name / "results.json"
    return json.loads(p.read_text())["summary"] if p.is_file() else None


def _div(a, b):
    return None if a is None or not b else a / b


def _ratio(s, kind):
    b, i = s.get(f"flicker_{kind}_border"), s.get(f"flicker_{kind}_inside")
    return None if b is None or not i else b / i


ATTR_COLS = procedural.ATTRIBUTE_CLIPS


def _attr(runs, name):
    p = Path(runs) / "eval" / name / "results.json"
    return json.loads(p.read_text())["attributes"] if p.is_file() else None


def ablations(runs):
    """The recipe's ablation list (reproduce.sh writes RUNS/ablations.tsv): [(name, tables, label)]."""
    p = Path(runs) / "ablations.tsv"
    if not p.is_file():
        return []
    rows = [line.split("\t") for line in p.read_text().splitlines() if line.strip()]
    return [(r[0], r[1].split(","), r[2]) for r in rows]


def tables(runs):
    """Markdown of every table from whatever evaluations exist under RUNS/eval: the attribute-transfer
    table first, Table 1, then the ablations (Tables 3 and 4 and one row per tiny-scale deviation),
    each ablation row with the attribute correlations beside the cross-protocol metrics."""
    lines = []
    md = Path(runs) / "eval" / "attributes_model" / "results.md"   # evaluate.py wrote the table there
    if md.is_file():
        table = [line for line in md.read_text().splitlines() if line.startswith("|")]
        lines += ["### Attribute transfer (held-out people, 'report' split)", "", *table, ""]
    lines += ["### Table 1 analogue (procedural test identities, 64 px)", "",
              "| protocol | method | SSIM ↑ | PSNR ↑ | LMD vs renderer ↓ | LMD probe ↓ | LSE-C (ours) ↑ | LSE-D (ours) ↓ |",
              "|---|---|---|---|---|---|---|---|"]
    for proto in ("cross", "pcavs"):
        recon = ("G(E_inv(x_d)) (FC-TFG's upper bound)" if proto == "pcavs" else
                 "G(E_inv(x_d)) (the DRIVER's face: identity test)")
        for name, label in (("model", "FC-TFG (ours)"), ("copy_source", "copy source"), ("encoder_recon", recon)):
            s = _load(runs, f"{proto}_{name}")
            if s:
                lines.append(f"| {proto} | {label} | {_f(s.get('ssim'))} | {_f(s.get('psnr'), '{:.2f}')} | "
                             f"{_f(s.get('lmd_vs_renderer'), '{:.2f}')} | {_f(s.get('lmd'), '{:.2f}')} | "
                             f"{_f(s.get('lse_c_ours'))} | {_f(s.get('lse_d_ours'))} |")
        s = _load(runs, f"{proto}_model")
        if s and s.get("lse_c_ours_real") is not None:
            lines.append(f"| {proto} | real driving frames (sync reference) | | | | | "
                         f"{_f(s['lse_c_ours_real'])} | {_f(s['lse_d_ours_real'])} |")
    titles = {"3": "Table 3 analogue (temporal layer x discriminator)",
              "4": "Table 4 analogue (orthogonality loss; plain and residual E_can)",
              "dev": "Tiny-scale deviations (each one undone)"}
    head = ("| run | " + " | ".join(f"{a} corr ↑" for a in ATTR_COLS) + " | SSIM ↑ | PSNR ↑ | LMD vs renderer ↓ | "
            "LSE-C (ours) ↑ | flicker px border/inside | canonical pose std (deg) ↓ |")
    abl = ablations(runs)
    for key, title in titles.items():
        rows = [(n, label) for n, tabs, label in abl if key in tabs]
        if not rows:
            continue
        lines += ["", f"### {title}; ablation runs, cross protocol + attribute table", "", head,
                  "|---|" + "---|" * (len(ATTR_COLS) + 6)]
        seeds = [(n + sfx, label + note) for n, label in rows
                 for sfx, note in (("", ""), ("_s1", ", seed 1")) if not sfx or _load(runs, f"abl_{n}{sfx}")]
        for name, label in seeds:
            # the "recipe" row is the main run (reproduce.sh trains it once, as fctfg/)
            cross, attr = ("cross_model", "attributes_model") if name == "recipe" else (f"abl_{name}", f"abl_{name}_attr")
            s, a = _load(runs, cross) or {}, _attr(runs, attr) or {}
            corr = [_f((a.get("model", {}).get(c) or {}).get("corr"), "{:.2f}") for c in ATTR_COLS]
            lines.append(f"| {label} | " + " | ".join(corr) + f" | {_f(s.get('ssim'))} | {_f(s.get('psnr'), '{:.2f}')} | "
                         f"{_f(s.get('lmd_vs_renderer'), '{:.2f}')} | {_f(s.get('lse_c_ours'))} | "
                         f"{_f(_ratio(s, 'px'))} | {_f(s.get('canon_pose_std'), '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="fp16 generator-side copy of an fctfg checkpoint (infer.py's default)")
    e.add_argument("src", help="train.py fctfg checkpoint")
    e.add_argument("dst", help="where the slim copy goes")
    f = sub.add_parser("figures", help="Fig. 4 / Fig. 5 analogues and the attribute-transfer sheet")
    f.add_argument("checkpoint", help="train.py fctfg checkpoint")
    f.add_argument("out", help="folder for the PNGs")
    c = sub.add_parser("cost", help="FLOPs per training sample of every stage (Sec. 4.1.2 at paper scale)")
    c.add_argument("--preset", default="paper", help="train.py preset to count")
    t = sub.add_parser("tables", help="markdown of every table from RUNS/eval/*/results.json")
    t.add_argument("runs", help="the reproduce.sh output folder")
    t.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "export":
            print(f"wrote {args.dst} ({export(args.src, args.dst) / 2 ** 20:.1f} MiB)")
        elif args.cmd == "figures":
            for p in figures(args.checkpoint, args.out):
                print(f"wrote {p}")
        elif args.cmd == "cost":
            cost(args.preset)
        else:
            md = tables(args.runs)
            print(md)
            if args.out:
                stylegan2.write_atomic(args.out, lambda tmp: Path(tmp).write_text(md))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
