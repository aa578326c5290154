"""reproduce.py: the helpers of the reproduction study (reproduce.sh): export the shipped
checkpoint, draw the paper's figures on procedural test identities, and collect the tables of
RESULTS.md.

  export SRC DST            fp16 generator-side copy of an fctfg checkpoint (what infer.py ships
                            with)
  figures CKPT OUT          Fig. 5 (canonical space: inputs vs G(E_can(E_inv(x)))), a Fig. 4-style
                            cross-identity strip (source | driving | ground truth | generated) and
                            the attribute-transfer sheet (one attribute per row triple)
  tables RUNS               the attribute table and Table 1 / 3 / 4 analogues from the evaluate.py
                            results under RUNS (markdown)
  trend PNG STEP=DIR ...    attribute correlations along training, from evaluate.py results
  cost [--preset paper]     FLOPs per training sample of every stage (the paper-scale cost estimate)

Paper map: Fig. 4 (reenactment comparison), Fig. 5 (canonical space), Fig. 6 (pose spread of the
canonical space, reported in the tables as canon_pose_std), Tables 1, 3 and 4 (Sec. 4.2-4.4).
Everything runs on the procedural TEST split (procedural.TEST_IDS), which no training stage sees.
The study's layer, at the top of the import graph: it uses the public functions of train.py (the
FLOP count runs the real training step) and attributes.py (the attribute clips, the table format);
nothing imports it.
"""
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import files
import fusion
import procedural
import stages
import train
from attributes import attribute_pair, cell, format_attribute_table


def export(src, dst):
    """Keep what infer.py needs (the FCTFG state dict, cfg, step) in float16; the discriminator and
    the optimiser states stay behind. HyperStyle's shared hypernetwork appears under several keys
    that share storage: convert (and store) each storage once, or the file doubles."""
    ck = files.load_checkpoint(src)
    if ck.get("stage") != "fctfg":
        raise ValueError(f"{src} is a {ck.get('stage')!r} checkpoint; export needs an fctfg one")
    halves = {}

    def half(v):
        if not v.is_floating_point():
            return v
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape),
               tuple(v.stride()))
        return halves.setdefault(key, v.half())

    slim = {"stage": "fctfg", "step": ck["step"], "cfg": ck["cfg"], "run": ck.get("run", {}),
            "fctfg": {k: half(v) for k, v in ck["fctfg"].items()}}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    files.save_checkpoint(dst, slim)
    return dst.stat().st_size


@torch.no_grad()
def figures(ckpt, out, n=6, frames=(0, 6, 12, 18, 24, 30)):
    """Fig. 5, a Fig. 4-style strip and the attribute-transfer sheet on procedural test identities.
    -> list of written PNG paths."""
    model, cfg = fusion.FCTFG.load(ckpt, "cpu")
    size, hs, sel = model.G.size, int(cfg.get("hyper_steps", 1)), list(frames)
    ds = data.SyntheticTalkingFaces("test", n_identities=n, clips_per_identity=1,
                                    n_frames=max(frames) + 1, size=size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(name, rows, nrow):
        written.append(out / name)
        files.save_image_grid(torch.cat(rows), out / name, nrow=nrow)
    # Fig. 5a: one frame of each of n people (all with their own pose) and its canonical image
    x = torch.stack([ds[i]["frames"][frames[i % len(frames)]] for i in range(n)])
    z = model.E_inv(x)
    save("fig5_canonical_space.png", [x, model.G.synthesis(z), model.canonical(z)], n)
    # Fig. 5b: every listed frame of ONE clip, and each one taken to canonical space
    clip = ds[0]["frames"][sel]
    save("fig5b_one_video_canonical.png", [clip, model.canonical(model.E_inv(clip))], len(sel))
    # Fig. 4-style: person A (source frame 0) driven by person B's clip (pose, eyes, audio)
    rows = []
    for a, b in ((0, 1), (2, 3)):
        src, drv, gt = ds[a], ds[b], ds.cross(a, b)
        gen = model.generate(src["frames"][0], drv["frames"], drv["mel"], hs)["x_g"]
        rows += [torch.cat([src["frames"][:1], f[sel]]) for f in (drv["frames"], gt["frames"], gen)]
    save("fig4_cross_identity.png", rows, len(sel) + 1)
    save("fig_window_seam.png", seam_strip(model, ds, hs), 8)
    # The attribute-transfer table as pictures (its first pair of the 'report' split): for each
    # attribute, the driving clip of person B (only that attribute moves; lips: B's mouth stays
    # shut, the audio speaks), the ground truth (A doing it) and FC-TFG (A's neutral still + B's
    # clip + the audio)
    x_s, _, clips = attribute_pair(0, "report", 32, size)
    rows, sel = [], list(range(0, 32, 3))
    for _, _, x_d, gt, _, _ in clips:
        gen = model.generate(x_s, x_d["frames"], x_d["mel"], hs)["x_g"]
        rows += [x_d["frames"][sel], gt[sel], gen[sel]]
    save("fig_attributes.png", rows, len(sel))
    return written


def seam_strip(model, ds, hs, pair=(4, 5), gain=4):
    """Eight consecutive frames across the second temporal-window border (Sec. 4.4.2) of person A
    driven by person B (`pair`: indices into ds) -> image rows: A's truth; FC-TFG with the paper's
    non-overlapping windows and raw renders; windows that see their neighbours, raw; the same with
    fusion.Deflicker (the default); then each row's frame-to-frame change |x_t - x_{t-1}| x gain
    (black = none). A seam is invisible in one still; in the change rows it shows at the border
    (between the 4th and 5th frames), the shimmer of the backdrop and skin everywhere."""
    W = model.fusion.temporal.window or 5
    sel = list(range(2 * W - 4, 2 * W + 4))
    src, drv, gt = ds[pair[0]], ds[pair[1]], ds.cross(*pair)
    clip = slice(0, max(sel) + 1)
    x_s, x_d, mel = src["frames"][0], drv["frames"][clip], drv["mel"][clip]
    drive = lambda continuous, deflicker: model.generate(x_s, x_d, mel, hs, continuous=continuous,
                                                         deflicker=deflicker)["x_g"]
    outs = [gt["frames"][clip], drive(False, 0), drive(True, 0), drive(True, fusion.DEFLICKER_TAU)]
    change = [((x[sel] - x[[t - 1 for t in sel]]).abs() * gain).clamp(0, 2) - 1 for x in outs]
    return [x[sel] for x in outs] + change


# --------------------------------------------------------------------------------------------------
# Cost of the paper-scale recipe: FLOPs of one real training step of each stage, counted by torch
# --------------------------------------------------------------------------------------------------

def _fake_batch(stage_name, cfg, B):
    """Random inputs of the shape each stage's step() receives (values do not change the FLOPs)."""
    S, W = cfg["size"], cfg["window"]
    if stage_name in ("stylegan2", "inversion"):
        return {"image": torch.rand(B, 3, S, S) * 2 - 1}
    if stage_name == "syncnet":
        return {"frames": torch.rand(B, 5, 3, S, S) * 2 - 1,
                "mel_expert": torch.randn(B, 1, 80, 16),
                "y": torch.tensor([1.0, 0.0] * (B // 2) + [1.0] * (B % 2))}
    return {"frames": torch.rand(B, W, 3, S, S) * 2 - 1, "mel": torch.randn(B, W, 1, 80, 16),
            "source": torch.rand(B, 3, S, S) * 2 - 1}


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                         transposed, _output_padding, _groups, output_mask, out_shape=None,
                         **kwargs):
    """FLOPs of aten.convolution_backward that respect groups: each of grad_input and grad_weight
    costs what the forward conv costs, 2 * (output or input elements) * (weight elements per output
    channel). torch's own formula drops `groups` for grad_weight, which overcounts the grouped
    (batch-as-groups) modulated convs of StyleGAN2 by a factor of the batch size (measured: 1.76 vs
    0.71 GFLOP per image at batch 4 vs 1)."""
    per_out = math.prod(w_shape[1:])  # (C_in / groups) * kh * kw, or C_out/groups for transposed
    fwd = 2 * math.prod(x_shape if transposed else grad_out_shape) * per_out
    return fwd * (int(output_mask[0]) + int(output_mask[1]))


def step_flops(stage_name, preset="paper", batch=2, **overrides):
    """FLOPs of one optimiser step of train.py's `stage_name` stage per training sample (image for
    stylegan2/inversion, 5-frame window for syncnet/fctfg), counted with torch.utils.flop_counter on
    CPU (convolutions and matmuls: >99 % of the work). The step counted is step 1, one without the
    lazy R1 / path-length terms (their autograd.grad does not run under the counter's module hooks;
    amortised over 16 and 4 steps they add roughly 10-20 %). Pre-trained judges that need downloaded
    weights (ArcFace, VGG19, the lip-sync expert) are not in the count: L_id, L_LPIPS and L_sync add
    their forward and input-gradient passes on top. Returns (flops per sample, seconds per sample on
    this CPU)."""
    args, cfg = train.parse_args(["--preset", preset, "--stage", stage_name, "--batch", str(batch),
                                  *[a for k, v in overrides.items() for a in (f"--{k}", str(v))]])
    torch.manual_seed(0)
    stage = stages.stage_class(stage_name, cfg)(cfg, torch.device("cpu"), args)
    mb = _fake_batch(stage_name, cfg, batch)
    counter = FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    t = time.perf_counter()
    with counter:
        stage.step(1, [mb], 1, lambda: torch.autocast("cpu", enabled=False))
    return counter.get_total_flops() / batch, (time.perf_counter() - t) / batch


def cost(preset="paper"):
    """FLOPs per sample of every stage at `preset` -> dict name -> (flops, cpu seconds per
    sample)."""
    out = {}
    for name, stage, kw in (("syncnet", "syncnet", {}),
                            ("stylegan2 (no R1/PL step)", "stylegan2", {}),
                            ("pSp", "inversion", {}),
                            ("HyperStyle", "inversion", {"hyper_from": 0.0}),
                            ("fctfg", "fctfg", {})):
        batch = 4 if stage in ("stylegan2", "fctfg") else 2   # D's minibatch-stddev group is 4
        out[name] = step_flops(stage, preset, batch=batch, **kw)
        print(f"{name:28s} {out[name][0] / 1e9:10.1f} GFLOP per sample | "
              f"{out[name][1]:.2f} s per sample on this CPU")
    return out


def trend(points, png):
    """Attribute correlations along training: points = [(step, folder of an evaluate.py --protocol
    attributes run of that step's checkpoint)] -> one panel per attribute in png
    (files.plot_losses; the numbers beside it as .jsonl)."""
    rows = []
    for step, folder in sorted(points):
        res = json.loads((Path(folder) / "results.json").read_text())["attributes"]["model"]
        corr = {a: res[a]["corr"] for a in procedural.ATTRIBUTE_CLIPS}
        rows.append(json.dumps(dict(step=step, **corr)))
    log = Path(png).with_suffix(".jsonl")
    files.write_text(log, "\n".join(rows) + "\n")
    return files.plot_losses(log, png, smooth=1)


# --------------------------------------------------------------------------------------------------
# Tables: read evaluate.py's results.json files (RUNS/eval/<name>/results.json)
# --------------------------------------------------------------------------------------------------
F2, F3 = "{:.2f}", "{:.3f}"
T1_COLS = (("ssim", F3), ("psnr", F2), ("lmd_vs_renderer", F2), ("lmd", F2), ("lse_c_ours", F3),
           ("lse_d_ours", F3))
ABL_COLS = (("ssim", F3), ("psnr", F2), ("lmd_vs_renderer", F2), ("lse_c_ours", F3),
            ("flicker_px_ratio", F3), ("canon_pose_std", F2))


def _results(runs, name, part="summary"):
    """One part of RUNS/eval/<name>/results.json ('summary', or 'attributes' of --protocol
    attributes), or None."""
    p = Path(runs) / "eval" / name / "results.json"
    return json.loads(p.read_text())[part] if p.is_file() else None


def _cells(s, cols):
    return " | ".join(cell(s.get(k), fmt) for k, fmt in cols)


def tables(runs):
    """Markdown of every table from whatever evaluations exist under RUNS/eval: the
    attribute-transfer table first, Table 1, then the ablations (RUNS/ablations.tsv, written by
    reproduce.sh: Tables 3 and 4 and one row per tiny-scale deviation), each ablation row with the
    attribute correlations beside the cross-protocol metrics."""
    lines, attr = [], _results(runs, "attributes_model", "attributes")
    if attr:
        lines += ["### Attribute transfer (held-out people, 'report' split)", "",
                  format_attribute_table(attr), ""]
    lines += ["### Table 1 analogue (procedural test identities, 64 px)", "",
              "| protocol | method | SSIM ↑ | PSNR ↑ | LMD vs renderer ↓ | LMD probe ↓ | "
              "LSE-C (ours) ↑ | LSE-D (ours) ↓ |", "|---|---|---|---|---|---|---|---|"]
    for proto in ("cross", "pcavs"):
        recon = ("G(E_inv(x_d)) (FC-TFG's upper bound)" if proto == "pcavs" else
                 "G(E_inv(x_d)) (the DRIVER's face: identity test)")
        for name, label in (("model", "FC-TFG (ours)"), ("copy_source", "copy source"),
                            ("encoder_recon", recon)):
            s = _results(runs, f"{proto}_{name}")
            if s:
                lines.append(f"| {proto} | {label} | {_cells(s, T1_COLS)} |")
        s = _results(runs, f"{proto}_model")
        if s and s.get("lse_c_ours_real") is not None:
            lines.append(f"| {proto} | real driving frames (sync reference) | | | | | "
                         f"{cell(s['lse_c_ours_real'])} | {cell(s['lse_d_ours_real'])} |")
    titles = {"3": "Table 3 analogue (temporal layer x discriminator)",
              "4": "Table 4 analogue (orthogonality loss; plain and residual E_can)",
              "dev": "Tiny-scale deviations (each one undone)"}
    attrs = procedural.ATTRIBUTE_CLIPS
    head = ("| run | " + " | ".join(f"{a} corr ↑" for a in attrs) + " | SSIM ↑ | PSNR ↑ | LMD vs "
            "renderer ↓ | LSE-C (ours) ↑ | flicker px border/inside | canonical pose std (deg) ↓ |")
    tsv = Path(runs) / "ablations.tsv"   # name | tables | label | flags
    abl = [line.split("\t") for line in tsv.read_text().splitlines()
           if line.strip()] if tsv.is_file() else []
    for key, title in titles.items():
        rows = [(r[0], r[2]) for r in abl if key in r[1].split(",")]
        if not rows:
            continue
        lines += ["", f"### {title}; ablation runs, cross protocol + attribute table", "", head,
                  "|---|" + "---|" * (len(attrs) + 6)]
        seeds = [(n + sfx, label + note) for n, label in rows
                 for sfx, note in (("", ""), ("_s1", ", seed 1"))
                 if not sfx or _results(runs, f"abl_{n}{sfx}")]
        for name, label in seeds:
            recipe = name == "recipe"   # the main run (reproduce.sh trains it once, as fctfg/)
            s = _results(runs, "cross_model" if recipe else f"abl_{name}") or {}
            a = _results(runs, "attributes_model" if recipe else f"abl_{name}_attr",
                         "attributes") or {}
            b, i = s.get("flicker_px_border"), s.get("flicker_px_inside")
            s = dict(s, flicker_px_ratio=None if b is None or not i else b / i)
            corr = [cell((a.get("model", {}).get(c) or {}).get("corr"), F2) for c in attrs]
            lines.append(f"| {label} | " + " | ".join(corr) + f" | {_cells(s, ABL_COLS)} |")
    return "\n".join(lines) + "\n"


def run(args):
    """The command main() parsed."""
    if args.cmd == "export" and Path(args.dst).resolve() == Path(args.src).resolve():
        raise ValueError(f"export {args.src} onto itself would replace the full checkpoint; "
                         f"give another DST")
    if args.cmd == "export":
        print(f"wrote {args.dst} ({export(args.src, args.dst) / 2 ** 20:.1f} MiB)")
    elif args.cmd == "figures":
        for p in figures(args.checkpoint, args.out):
            print(f"wrote {p}")
    elif args.cmd == "trend":
        points = [(int(p.split("=", 1)[0]), p.split("=", 1)[1])
                  for p in args.points if "=" in p]
        if len(points) != len(args.points):
            raise ValueError("trend: every point must be STEP=FOLDER")
        trend(points, args.out)
        print(f"wrote {args.out}")
    elif args.cmd == "cost":
        cost(args.preset)
    else:
        md = tables(args.runs)
        print(md)
        if args.out:
            files.write_text(args.out, md)


def main(argv=None):
    ap = files.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export",
                       help="fp16 generator-side copy of an fctfg checkpoint (infer.py's default)")
    e.add_argument("src", help="train.py fctfg checkpoint")
    e.add_argument("dst", help="where the slim copy goes")
    f = sub.add_parser("figures", help="Fig. 4 / Fig. 5 analogues and the attribute-transfer sheet")
    f.add_argument("checkpoint", help="train.py fctfg checkpoint")
    f.add_argument("out", help="folder for the PNGs")
    c = sub.add_parser("cost",
                       help="FLOPs per training sample of every stage (Sec. 4.1.2 at paper scale)")
    c.add_argument("--preset", default="paper", help="train.py preset to count")
    r = sub.add_parser("trend", help="attribute correlations along training, a PNG")
    r.add_argument("out", help="the PNG (its .jsonl holds the numbers)")
    r.add_argument("points", nargs="+",
                   help="STEP=FOLDER, FOLDER the output of evaluate.py --protocol attributes")
    t = sub.add_parser("tables", help="markdown of every table from RUNS/eval/*/results.json")
    t.add_argument("runs", help="the reproduce.sh output folder")
    t.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args(argv)
    return files.run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
