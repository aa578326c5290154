"""attributes.py: the paper's claim of FULL control, measured: does each controlled attribute (pose,
blinks, gaze, brows, lips) move the generated face as it moves the driver? The title's "fully
controllable" (Sec. 4.3.1: pose, eyes and expression from different videos, lips from audio) is
shown in the paper's figures, and no number there measures it: Table 1's metrics average over the
whole face, where a still copy of the source already scores well. Both measures below are ours,
not the paper's, on procedural frames, where the renderer knows the truth (results: RESULTS.md,
section 1).

Motion probe: a CNN reading procedural frames' pose, blink,  -> MotionProbe, train_probe,
          gaze, brow, mouth and 4 mouth landmarks, trained      load_probe, probe_frames,
          on rendered frames with the renderer's labels         attribute_errors, format_attrs
          its labels and its training / held-out frames      -> probe_target, probe_dataset
          the attributes it reports, with their units        -> ATTRIBUTES
          The detector the metrics need on cartoon heads, where dlib finds no face: the sibling of
          metrics.DlibLandmarker (68 points for LMD on real video); evaluate.py's cross protocol
          reads LMD and per-attribute errors with it. Trained by python evaluate.py --train-probe.
Attribute transfer: ONE attribute moves at a time (procedural.attribute_motion), scored by the
          temporal correlation of generated and ground-truth luminance over the pixels it moves
          one pair of people and their clips                 -> attribute_pair
          the score                                          -> transfer_correlation
          the table: FC-TFG, copy source and the decoder     -> attribute_transfer,
          ceilings, with fidelity vs the ground truth           format_attribute_table,
                                                                format_fidelity_table
          Run by python evaluate.py --protocol attributes (its command line); reproduce.py draws
          pair 0 and prints the table.
Numbers into table cells (cell: also evaluate.py's and       -> cell, mean_of_known, _se
          reproduce.py's tables; mean_of_known: evaluate.py's summary)

Not here: the metrics (metrics.py), the command line and the Table 1 protocols (evaluate.py), the
renderer and its one-attribute clips (procedural.py), FC-TFG or a baseline on one clip
(fusion.run_model)."""
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import files
import fusion
import metrics
import procedural

# ==== The motion probe: a small CNN reading the renderer's parameters back from a procedural frame
# Why: the procedural set (procedural.py) knows the exact pose / blink / gaze / mouth of every frame
# it renders, but nothing knows them for a *generated* frame: dlib finds no face in cartoon heads,
# and no pose estimator was trained on them. So we train one: a regressor from rendered frames to
# the 12 motion parameters and the 4 mouth landmarks, the renderer's values as labels. Its held-out
# error (in its checkpoint, printed with every result that uses it) is the resolution of every
# number it produces; generated frames are a different distribution from rendered ones, which adds
# an error it cannot measure on itself.
PROBE_SIZE = 64                               # frames are resized to this side before the probe
PROBE_MOUTH = (9, 10, 11, 12)                 # procedural.LANDMARK_NAMES: mouth_l, mouth_r,
                                              # mouth_top, mouth_bottom
N_MOTION = len(procedural.MOTION_KEYS)        # 12
N_OUT = N_MOTION + 2 * len(PROBE_MOUTH)       # 20 probe outputs
ATTRIBUTES = {                                # reported attribute: (MOTION_KEYS columns, unit
                                              # scale, unit)
    "yaw": ((0,), 180 / math.pi, "deg"), "pitch": ((1,), 180 / math.pi, "deg"),
    "roll": ((2,), 180 / math.pi, "deg"),
    # means over both eyes / over x and y
    "blink": ((5, 6), 1.0, "0..1"), "gaze": ((7, 8), 1.0, "-1..1"),
    "brow": ((9,), 1.0, "0..1"), "mouth_open": ((10,), 1.0, "0..1"),
}


class MotionProbe(nn.Module):
    """[B, 3, H, W] frames in [-1, 1] -> [B, 20]: the 12 motion parameters (procedural.MOTION_KEYS
    units), then (x, y) of the 4 mouth landmarks as fractions of the image side. Four stride-2 3x3
    convs with BatchNorm (64 -> 4 px), a 2-layer head; outputs de-standardised with the training
    targets' mean/std, kept as buffers so the checkpoint alone reproduces the predictions."""

    def __init__(self,
            width=32,   # channels of the first conv (then 2x, 3x, 4x)
            hidden=256, # width of the fully connected layer
        ):
        super().__init__()
        c = (3, width, 2 * width, 3 * width, 4 * width)
        layers = []
        for i in range(4):                                                     # 32, 16, 8, 4 px
            layers += [nn.Conv2d(c[i], c[i + 1], 3, stride=2, padding=1), nn.BatchNorm2d(c[i + 1]),
                       nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)                                 # [B, 4w, 4, 4]
        self.head = nn.Sequential(nn.Linear(4 * width * 16, hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(hidden, N_OUT))
        self.register_buffer("mean", torch.zeros(N_OUT))
        self.register_buffer("std", torch.ones(N_OUT))

    def forward_standardised(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"MotionProbe wants [B, 3, H, W] frames in [-1, 1], "
                             f"got {tuple(x.shape)}")
        if x.shape[-2:] != (PROBE_SIZE, PROBE_SIZE):
            x = F.interpolate(x, size=(PROBE_SIZE, PROBE_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.head(self.features(x).flatten(1))

    def forward(self, x):
        return self.forward_standardised(x) * self.std + self.mean              # [B, 20]


def probe_target(ident, motion_row):
    """Label of one rendered frame: motion [12] ++ mouth landmarks [4 x (x, y)] / image side ->
    [20]."""
    xy, _ = procedural.landmarks(ident, motion_row, PROBE_SIZE)
    return np.concatenate([np.asarray(motion_row, np.float64),
                           (xy[list(PROBE_MOUTH)] / PROBE_SIZE).reshape(-1)])


def probe_dataset(split, n, seed=0, ss=None):
    """n rendered 64 px frames with labels -> (frames uint8 [n, 3, 64, 64], targets float32
    [n, 20]).
    ss: the renderer's supersampling (None = its default, 3 at 64 px; training uses 2: ~2x cheaper
    and, box-averaged like 3, nearly the same picture). Identities and motion come from
    procedural.py's own generators (train or test ranges: the held-out set has unseen people), 8
    random rows of each 48-frame motion clip, one person per clip. Blinks are rare in real motion
    (~0.3/s), so for 40 % of the frames the lids are redrawn uniformly (15 % of those one eye only):
    otherwise the probe could score well by always answering 'open'."""
    test = split != "train"
    ids = procedural.TEST_IDS if test else procedural.TRAIN_IDS
    r = np.random.default_rng((seed, int(test)))
    frames, targets = [], []
    for k in range(n):
        # 8 frames per (person, clip): the slow parts (background, speech track) once per clip
        if k % 8 == 0:
            motion, _ = procedural.make_motion(
                procedural.MOTION_BASE[split] + int(r.integers(1 << 30)), 48, audio=False)
            ident = procedural.make_identity(ids[int(r.integers(min(len(ids), 100_000)))])
        row = motion[int(r.integers(48))].astype(np.float64)
        if r.random() < 0.4:
            b = r.uniform(0, 1)
            row[5:7] = (b, b) if r.random() > 0.15 else ((b, 0.0) if r.random() < 0.5 else (0.0, b))
        frames.append(procedural.render(ident, row, PROBE_SIZE, ss=ss))
        targets.append(probe_target(ident, row))
    return (torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(np.stack(targets)).float())


@torch.no_grad()
def probe_frames(probe, x255, chunk=64):
    """The probe on frames on the 0..255 grid (uint8, or to_255's floats: as saved) -> [N, 20] on
    the CPU."""
    dev = next(probe.parameters()).device
    return torch.cat([probe(data.to_unit(c.to(dev))) for c in x255.split(chunk)]).cpu()


def attribute_errors(pred, target):
    """Mean absolute error per ATTRIBUTES entry (in its unit) and the mouth LMD at 224 px
    (lmd_points convention) between [N, 20] probe-layout rows -> dict of floats."""
    pred, target = pred.double(), target.double()
    out = {name: float((pred[:, list(cols)] - target[:, list(cols)]).abs().mean() * scale)
           for name, (cols, scale, _) in ATTRIBUTES.items()}
    # px at 224
    mouth = [x[:, N_MOTION:].reshape(-1, len(PROBE_MOUTH), 2) * metrics.LMD_SIZE
             for x in (pred, target)]
    out["lmd"] = float(metrics.lmd_points(*mouth).mean())
    return out


def train_probe(out_path, n_train=20000, n_heldout=500, steps=1500, batch=64, lr=2e-3, seed=0,
                log=print):
    """Train MotionProbe on rendered frames (MSE on standardised targets, Adam, cosine decay) and
    save atomically {'kind': 'motion_probe', 'state_dict', 'width', 'hidden', 'heldout',
    'heldout_mean_predictor', 'heldout_mse', 'train_mse' and their values before training
    (*_init), 'n_train', 'steps'}; held-out = test-split identities and motion. -> the checkpoint
    dict. The default (20000 frames, 1500 steps) takes ~2-3 min on one busy CPU core; with fewer
    frames it memorises them (at 6000 frames: yaw error 2.8 deg on seen frames, 11 on unseen)."""
    torch.manual_seed(seed)
    t0 = time.time()
    x, y = probe_dataset("train", n_train, seed, ss=2)
    xh, yh = probe_dataset("test", n_heldout, seed)
    log(f"probe: rendered {n_train} + {n_heldout} frames in {time.time() - t0:.1f} s")
    probe = MotionProbe()
    probe.mean.copy_(y.mean(0))
    probe.std.copy_(y.std(0).clamp_min(1e-3))  # a constant column would otherwise divide by 0
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    yz, yhz = (y - probe.mean) / probe.std, (yh - probe.mean) / probe.std

    def mse(x, yz):  # mean squared error in standardised units: 1.0 = the 'always the mean' guess
        with torch.no_grad():
            return float(torch.cat([F.mse_loss(probe.forward_standardised(data.to_unit(c)), t,
                                               reduction="none")
                                    for c, t in zip(x.split(256), yz.split(256))]).mean())
    probe.eval()
    mse_init = dict(heldout_mse_init=mse(xh, yhz), train_mse_init=mse(x[:512], yz[:512]))
    probe.train()
    for step in range(steps):
        idx = torch.randint(n_train, (batch,), generator=g)
        loss = F.mse_loss(probe.forward_standardised(data.to_unit(x[idx])), yz[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"probe: step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    probe.eval()
    ck = {"kind": "motion_probe", "width": probe.features[0].out_channels,
          "hidden": probe.head[0].out_features,
          "n_train": n_train, "steps": steps, "state_dict": probe.state_dict(),
          "heldout": attribute_errors(probe_frames(probe, xh, 256), yh),
          "heldout_mse": mse(xh, yhz), "train_mse": mse(x[:512], yz[:512]), **mse_init,
          # context: 'knows nothing'
          "heldout_mean_predictor": attribute_errors(probe.mean.expand_as(yh), yh)}
    files.save_checkpoint(out_path, ck)
    log("probe: held-out error " + format_attrs(ck["heldout"]) + " | mean predictor " +
        format_attrs(ck["heldout_mean_predictor"]) + f" | saved {out_path}")
    return ck


def load_probe(path, device="cpu"):
    """-> (MotionProbe in eval mode, its held-out error dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"motion probe not found: {path} "
                                f"(train one: python evaluate.py --train-probe --out {path})")
    ck = files.load_checkpoint(path, "probe checkpoint")
    if not isinstance(ck, dict) or ck.get("kind") != "motion_probe":
        raise ValueError(f"{path}: not a motion-probe checkpoint (written by python evaluate.py "
                         f"--train-probe)")
    probe = MotionProbe(ck["width"], ck["hidden"])
    probe.load_state_dict(ck["state_dict"], strict=True)
    return probe.to(device).eval(), ck["heldout"]


def format_attrs(e):
    return " ".join(f"{k} {v:.3g}{'°' if k in ('yaw', 'pitch', 'roll') else ''}"
                    for k, v in e.items())


# ==== Attribute transfer: does each controlled attribute move the generated face? ===============
# The paper claims full control: pose, blinks, gaze, brows, lips. Table 1's metrics average over the
# whole face, where a still copy of the source already scores well, so they cannot show whether a
# blink transfers. This test changes ONE attribute at a time (procedural.attribute_motion): person
# B's driving clip moves only that attribute (silent audio), or, for the lips, B's frames stay
# neutral and synthesised speech drives the mouth. Source: person A's neutral still; ground truth:
# the renderer drawing A with the same motion. Score: temporal correlation of generated and
# ground-truth luminance, pooled over the pixels the attribute moves in the ground truth (each
# pixel's temporal mean removed first): 1 = the attribute is reproduced, 0 = a still image
# (copy-source), < 0 = moves the wrong way.
# ATTRIBUTES
ATTR_PROBE = dict(yaw="yaw", pitch="pitch", blink="blink", gaze="gaze", brow="brow",
                  lips="mouth_open")
# moving pixel: ground-truth luminance std over the clip above this, grey levels (rounding ~0.3)
ATTR_MOVE_THR = 4.0
ATTR_ROW_LABELS = {"model": "FC-TFG (ours)", "copy_source": "copy source",
                   "encoder_recon": "G(E_inv(x_d)), the driver's own codes (ceiling)",
                   "truth_recon": "G(E_inv(A's truth)), decoder + inversion redrawing A (ceiling)"}
# metrics.fidelity, metrics.steadiness
FIDELITY = ("sharpness", "background_err", "skin_err", "psnr", "jitter", "seam")


def transfer_correlation(gen255, ref255):
    """Pooled temporal correlation over the pixels that move in `ref`: [T, 3, H, W] x2 on 0..255 ->
    (corr, n_moving_pixels). Each pixel's temporal mean is removed from both clips, then corr =
    sum(g' y') / sqrt(sum g'^2 sum y'^2) over moving pixels and frames; a clip that does not move
    (g' = 0 everywhere) scores 0, not NaN. None when nothing moves in `ref`."""
    w = torch.tensor(metrics.LUMA, dtype=torch.float64, device=ref255.device).view(1, 3, 1, 1)
    g, y = (gen255.double() * w).sum(1), (ref255.double() * w).sum(1)   # BT.601 luminance [T, H, W]
    moving = y.std(0, unbiased=False) > ATTR_MOVE_THR                   # [H, W]
    if not moving.any():
        return None, 0
    g, y = g - g[0], y - y[0]  # first frame out first: a still clip then centres to exact zeros
    g, y = (g - g.mean(0))[:, moving], (y - y.mean(0))[:, moving]
    den = float((g * g).sum() * (y * y).sum()) ** 0.5
    return (float((g * y).sum()) / den if den > 0 else 0.0), int(moving.sum())


def attribute_pair(k, split="report", T=32, size=64, n_pairs=2):
    """The clips of pair k of the attribute table (reproduce.py's attribute sheet draws pair 0):
    A = test person k of procedural.ATTRIBUTE_SPLITS[split], B = the next one (cyclic over
    n_pairs), motion seed offset + k. -> (x_s, b_s, clips): A's and B's neutral stills [3, H, W]
    and, lazily, one (attr, full [T, 12], x_d = B's driving sample, gt = A's frames with `full`,
    b_full = B's frames with `full`, A's region masks with `full`) per attribute."""
    if split not in procedural.ATTRIBUTE_SPLITS:
        raise ValueError(f"split must be one of {sorted(procedural.ATTRIBUTE_SPLITS)}, "
                         f"got {split!r}")
    base = procedural.ATTRIBUTE_SPLITS[split]
    A, B = (procedural.make_identity(procedural.TEST_IDS[base + i])
            for i in (k, (k + 1) % max(n_pairs, 2)))

    def clip(person, motion, audio):  # the renderer's frames of `person` -> a data.py sample
        return data.clip_sample(procedural.render_clip(person, motion, size), audio)
    neutral, silence = np.zeros((1, N_MOTION), np.float32), np.zeros(data.SPF, np.float32)
    x_s, b_s = (clip(p, neutral, silence)["frames"][0] for p in (A, B))
    motions = ((a, *procedural.attribute_motion(a, base + k, T))
               for a in procedural.ATTRIBUTE_CLIPS)
    return x_s, b_s, ((a, full, clip(B, drive, audio), clip(A, full, audio)["frames"],
                       clip(B, full, audio)["frames"], procedural.region_masks(A, full, size))
                      for a, drive, full, audio in motions)


@torch.no_grad()
def attribute_transfer(model, n_pairs=10, split="report", T=32, probe=None, hyper_steps=0,
                       continuous=True, deflicker=fusion.DEFLICKER_TAU):
    """The attribute-transfer table over pairs attribute_pair(0 .. n_pairs-1); rows:
      model         FC-TFG(x_s = A neutral, x_d = B moving one attribute, x_a) vs A's ground truth
      copy_source   x_s repeated (0 by construction)
      encoder_recon G(E_inv(x_d)), the driver's own codes, with the attribute fully in its frames
                    (lips: B speaking), correlated with those frames: how much of the attribute
                    E_inv + G carry at all (FC-TFG's ceiling); its PSNR is against A's ground truth
                    (the identity test: it draws B)
      truth_recon   G(E_inv(gt)) with A's deltas: the decoder + inversion redrawing A's true frames,
                    the ceiling of every fidelity column
    -> {row: {attr: dict(corr, psnr, err, corr_se, sharpness, background_err, skin_err)}} means over
    pairs; err = probe error on the attribute's parameter (procedural.MOTION_KEYS units, degrees for
    pose) where a probe is given; the fidelity numbers (metrics.fidelity) are against A's ground
    truth in every row."""
    dev, window = next(model.parameters()).device, model.fusion.temporal.window or 5
    acc = {row: {a: {k: [] for k in ("corr", "err") + FIDELITY} for a in procedural.ATTRIBUTE_CLIPS}
           for row in ATTR_ROW_LABELS}
    t0 = time.time()
    for k in range(n_pairs):
        x_s, b_s, clips = attribute_pair(k, split, T, model.G.size, n_pairs)
        for a, full, x_d, gt, b_full, masks in clips:
            # the probe's reading of this attribute
            cols, scale, _ = ATTRIBUTES[ATTR_PROBE[a]]
            truth, mel = torch.from_numpy(full)[:, list(cols)], x_d["mel"].to(dev)
            rows = dict(model=(x_s, x_d["frames"], gt), copy_source=(x_s, x_d["frames"], gt),
                        # (source, driving frames, reference of corr)
                        encoder_recon=(b_s, b_full, b_full),
                        truth_recon=(x_s, gt, gt))
            for row, (src, drv, ref) in rows.items():
                kind = "encoder_recon" if row == "truth_recon" else row
                g255 = metrics.to_255(fusion.run_model(model, src.to(dev), drv.to(dev), mel, kind,
                                                       hyper_steps, continuous=continuous,
                                                       deflicker=deflicker)["x_g"].cpu())
                d, gt255 = acc[row][a], metrics.to_255(gt)
                d["corr"].append(transfer_correlation(g255, metrics.to_255(ref))[0])
                fid = {**metrics.fidelity(g255, gt255, masks),
                       **metrics.steadiness(g255, gt255, window)}
                mse = float((g255.double() - gt255.double()).pow(2).mean())  # pooled over the clip:
                fid["psnr"] = 10 * math.log10(255 ** 2 / max(mse, 1e-10))      # finite for copies
                for key in FIDELITY:
                    d[key].append(fid[key])
                if probe is not None:
                    d["err"].append(float((probe_frames(probe, g255)[:, list(cols)]
                                           - truth).abs().mean() * scale))
        el = time.time() - t0
        print(f"attributes: pair {k + 1}/{n_pairs} | {el:.0f} s | "
              f"ETA {el / (k + 1) * (n_pairs - k - 1):.0f} s")
    return {row: {a: {**{m: mean_of_known(v) for m, v in d.items()}, "corr_se": _se(d["corr"])}
                  for a, d in per.items()}
            for row, per in acc.items()}


def mean_of_known(xs):
    """Mean of the values that were measured (None and NaN left out); None when there are none."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def _se(xs):
    """Standard error of the mean over pairs (sample std / sqrt(n)); None below two values."""
    xs = [x for x in xs if x is not None]
    return float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else None


def cell(v, fmt="{:.3f}"):
    """A table cell: '-' for a missing number (reproduce.py's tables too)."""
    return "-" if v is None else "inf" if v == math.inf else fmt.format(v)


def format_attribute_table(res):
    """Markdown: correlation per attribute (± its standard error over the pairs where there are two
    or more), then the probe's error per attribute, then mean PSNR vs A; below it the fidelity table
    (format_fidelity_table)."""
    attrs = list(next(iter(res.values())))
    head = (" | ".join(f"{a} corr ↑" for a in attrs) + " | " +
            " | ".join(f"{a} err ({ATTRIBUTES[ATTR_PROBE[a]][2]}) ↓" for a in attrs) +
            " | PSNR vs A ↑ |")
    lines = ["| method | " + head, "|---|" + "---|" * (2 * len(attrs) + 1)]
    for row, per in res.items():
        psnrs = [per[a]["psnr"] for a in attrs if per[a]["psnr"] is not None]
        corr = [cell(per[a]["corr"], "{:.2f}")
                + (f" ± {per[a]['corr_se']:.2f}" if per[a].get("corr_se") else "")
                for a in attrs]
        lines.append(f"| {ATTR_ROW_LABELS[row]} | " + " | ".join(corr) + " | " +
                     " | ".join(cell(per[a]["err"], "{:.3g}") for a in attrs) +
                     f" | {cell(float(np.mean(psnrs)) if psnrs else None, '{:.2f}')} |")
    return "\n".join(lines) + "\n\n" + format_fidelity_table(
        {row: {k: mean_of_known([per[a].get(k) for a in attrs]) for k in FIDELITY}
         for row, per in res.items()},
        ATTR_ROW_LABELS)


def format_fidelity_table(rows, labels):
    """Markdown: one row per method of metrics.fidelity's numbers against A's ground truth.
    rows {row: {sharpness, background_err, skin_err, psnr}}, labels {row: text}."""
    lines = ["| method | sharpness (1 = truth's) ↑ | background err (grey levels) ↓ | "
             "skin err ↓ | PSNR vs A ↑ | jitter (1 = truth's) | seam (1 = none) |",
             "|---|---|---|---|---|---|---|"]
    for row, f in rows.items():
        lines.append(f"| {labels[row]} | {cell(f['sharpness'], '{:.2f}')} | "
                     f"{cell(f['background_err'], '{:.1f}')} | {cell(f['skin_err'], '{:.1f}')} | "
                     f"{cell(f['psnr'], '{:.2f}')} | {cell(f.get('jitter'), '{:.2f}')} | "
                     f"{cell(f.get('seam'), '{:.2f}')} |")
    return "\n".join(lines)
