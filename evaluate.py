"""evaluate.py: the evaluation protocols of Sec. 4.2 and the tables they fill (Table 1, the
controllability table), on the metrics of metrics.py, and the command line of every evaluation
(the attribute-transfer protocol of attributes.py included).

Sec. 4.2.3 protocol (PC-AVS): frame 0 = identity, the clip's frames drive
          pose/expression, its audio the lips                 -> evaluate_clip, evaluate (CLI)
Table 1 layout + the paper's numbers beside ours             -> PAPER_TABLE1, format_table
Baselines: copy the source frame; G(E_inv(x_d)) (upper bound) -> fusion.run_model(method=...)
Controllability on procedural data (no paper reports it): cross-identity reenactment vs the
          renderer's ground truth, per-attribute errors from a motion probe -> evaluate_clip; the
          probe itself (MotionProbe, train_probe, attribute_errors) is in attributes.py
          one attribute at a time (the title's "fully controllable") -> evaluate_attributes
                                                                 (--protocol attributes), on
                                                                 attributes.attribute_transfer
Table 3's flicker at temporal-window borders                  -> flicker_* numbers
                                                                 (metrics.flicker)
Fig. 5b / Fig. 6: canonical images of every frame of a clip  -> canon_* numbers
                                                                 (fusion.run_model(canonical=True))
The judges' held-out quality (E_id of Eq. 5, φ of Eq. 7)      -> judge_quality, report_judges

Run:  python evaluate.py --checkpoint runs/fctfg/last.pt --data synthetic --out eval/
          [--syncnet E.pt]
      python evaluate.py --checkpoint CKPT --data /prepared/vox --syncnet-v2 syncnet_v2.model
          --out eval/
      python evaluate.py --train-probe --out probe.pt ;  ... --protocol cross --probe probe.pt
      python evaluate.py --checkpoint CKPT --protocol attributes --probe probe.pt --out eval/attr
      python evaluate.py --baseline copy_source|encoder_recon ...
      python evaluate.py --judges runs/judges/last.pt --out eval/judges

Not here: the metrics themselves (metrics.py; their speed: bench.py --metrics), the motion probe
and the attribute-transfer protocol and table (attributes.py), the networks evaluated and one clip
through them (fusion.py, fusion.run_model), data and its renderer (data.py, procedural.py),
training (train.py)."""
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import attributes
import audio
import data
import files
import media
import fusion
import metrics
import procedural

# ==== Protocol (Sec. 4.2.3, PC-AVS) and the controllability benchmark on procedural data ==========
# pcavs: x_s = frame 0 of the clip; x_d = all its frames (pose/expression); x_a = its audio (lips);
#        scored on frames 1..T-1 against the clip itself (frame 0 is the input, not a result).
# cross: x_s = frame 0 of clip i (identity A); x_d, x_a = clip j (identity B, j = i+1); ground
#        truth = the renderer's picture of A with B's motion (data.SyntheticTalkingFaces.cross),
#        all T frames.
# Averaging: metric per frame -> mean per clip -> mean over clips (LSE: per clip, as
# syncnet_python). Frames are scored as a saved video would hold them: clamped to [-1, 1] and
# rounded to uint8.
PAPER_TABLE1 = {  # Table 1 of the paper: SSIM, MS-SSIM, PSNR, LMD, LSE-C (None = '-' in the paper)
    "voxceleb2": {"Wav2Lip": (0.58, None, 20.63, 2.65, 8.66),
                  "MakeItTalk": (0.55, 0.45, 16.94, 3.28, 3.83),
                  "Audio2Head": (0.51, 0.40, 15.98, 3.58, 5.79),
                  "PC-AVS": (0.57, 0.60, 17.37, 2.25, 5.82),
                  "FC-TFG (paper)": (0.69, 0.77, 21.22, 1.58, 8.46)},
    "mead": {"Wav2Lip": (0.85, None, 26.15, 3.11, 7.25),
             "MakeItTalk": (0.78, 0.78, 23.6, 3.55, 4.35),
             "Audio2Head": (0.67, 0.59, 19.57, 4.85, 5.38),
             "PC-AVS": (0.66, 0.7, 19.95, 2.93, 5.19),
             "FC-TFG (paper)": (0.84, 0.89, 26.19, 2.46, 5.51)},
}


def load_model(checkpoint, preset="tiny", window=5, device="cpu", seed=0):
    """'untrained' -> a freshly initialised FCTFG(preset) (seeded) with temporal window `window`; a
    decoder (stylegan2 stage with its joint encoder) or inversion checkpoint -> an FCTFG holding its
    G, E_inv (and HyperStyle), for the baselines that use only those (the decoder + inversion
    ceiling of a stage); otherwise fusion.FCTFG.load(checkpoint). -> (model, cfg); cfg["stage"]
    names a stage checkpoint."""
    if checkpoint == "untrained":
        torch.manual_seed(seed)
        model = fusion.FCTFG(preset, window=window or None)
        return model.to(device).eval(), dict(model=preset, window=window, hyper_steps=0)
    ck = files.load_checkpoint(checkpoint)
    if isinstance(ck, dict) and ck.get("stage") in ("stylegan2", "inversion") and "e_inv" in ck:
        model = fusion.FCTFG(ck["cfg"]["model"], window=window)
        model.G.load_state_dict(ck["g_ema"]), model.E_inv.load_state_dict(ck["e_inv"])
        if "hyper" in ck:
            model.H.load_state_dict(ck["hyper"])
        return model.to(device).eval(), dict(ck["cfg"], stage=ck["stage"], window=window,
                                             hyper_steps=ck["cfg"]["hyper_steps"]
                                             if "hyper" in ck else 0)
    model, cfg = fusion.FCTFG.load(checkpoint, device, ck)
    return model, dict(cfg)


# drift (a long clip's identity and backdrop wandering): the last 4 s against the first 4 s
DRIFT_FRAMES = 100


def lse_expert(frames, mel, expert):
    """LSE-D / LSE-C with OUR lip-sync expert (audio.SyncNet trained by `train.py --stage syncnet`),
    scored with syncnet_python's offset search (lse_from_embeddings). frames [T, 3, H, W] in
    [-1, 1], mel [T, 1, 80, 16]; window i = frames i..i+4 with frame i's mel window
    (audio.mel_windows' and the expert's own pairing), i = 0..T-5. Embeddings are unit vectors
    (distances in [0, 2]), so the scale differs from SyncNet v2's: these numbers rank our own runs
    and are NOT comparable with the paper's LSE-C."""
    n = expert.n_frames
    if frames.shape[0] < n:
        raise ValueError(f"the sync expert needs at least {n} frames, got {frames.shape[0]}")
    dev = next(expert.parameters()).device
    starts = range(frames.shape[0] - n + 1)
    clips = torch.stack([frames[i:i + n] for i in starts]).to(dev)         # [W, 5, 3, H, W]
    face = audio.expert_window(clips.float(), size=expert.face_hw[1],      # [W, 15, H/2, W], in the
                               bgr=getattr(expert, "input_bgr", False))    # expert's colour order
    # [W, C], as embed_face(face)
    a = expert.embed_audio(mel[:len(starts)].to(dev).float())
    return metrics.lse_from_embeddings(expert.embed_face(face).double(), a.double())


@torch.no_grad()
def evaluate_clip(sample, method, model=None, x_s=None, gt=None, tools=None):
    """All metrics of one clip -> (record dict, frames for the example video).
    sample: a data.py sample (frames [T,3,H,W] in [-1,1], audio, mel, optional motion) = the DRIVING
    clip; x_s: source frame (default: its frame 0, the PC-AVS protocol); gt: ground-truth sample
    (default: the clip itself) and which frames are scored (pcavs: 1..T-1, cross: all)."""
    tools = tools or {}
    frames, mel, T = sample["frames"], sample["mel"], sample["frames"].shape[0]
    cross, gt = gt is not None, sample if gt is None else gt
    x_s = frames[0] if x_s is None else x_s
    drive, kind = (gt["frames"], "encoder_recon") if method == "truth_recon" else (frames, method)
    out = fusion.run_model(model, x_s, drive, mel, kind, tools.get("hyper_steps", 0),
                    tools.get("chunk", 40), canonical=method == "model",
                    continuous=tools.get("continuous", True),
                    deflicker=tools.get("deflicker", fusion.DEFLICKER_TAU))
    scored = slice(0, T) if cross else slice(1, T)
    g255, t255 = metrics.to_255(out["x_g"][scored]), metrics.to_255(gt["frames"][scored])
    p = metrics.psnr(g255, t255)
    five_scales = min(g255.shape[-2:]) > metrics.MS_SSIM_MIN_SIDE     # MS-SSIM's 5 scales fit
    rec = dict(n_frames=T, n_scored=int(g255.shape[0]), ssim=float(metrics.ssim(g255, t255).mean()),
               ms_ssim=float(metrics.ms_ssim(g255, t255).mean()) if five_scales else None,
               psnr=float(p.mean()), n_psnr_inf=int(torch.isinf(p).sum()))
    # procedural: the renderer's regions of the ground truth (sharp head, own backdrop)
    if "motion" in gt:
        masks = procedural.region_masks(procedural.make_identity(int(gt["identity_seed"])),
                                        gt["motion"][scored].numpy(), g255.shape[-1])
        rec.update({k: v for k, v in metrics.fidelity(g255, t255, masks).items() if k != "psnr"})
        if g255.shape[0] >= 2 * DRIFT_FRAMES:  # a long clip: does the backdrop wander over time?
            ends = [metrics.fidelity(g255[sl], t255[sl],
                                     {k: m[sl] for k, m in masks.items()})["background_err"]
                    for sl in (slice(0, DRIFT_FRAMES), slice(-DRIFT_FRAMES, None))]
            rec["drift"] = ends[1] - ends[0]
    # the model's window borders (5 for a still copy)
    rec.update(metrics.steadiness(g255, t255, out["window"] or 5))
    probe = tools.get("probe")
    if probe is not None:
        # on the frames as saved
        pg, pt = attributes.probe_frames(probe, g255), attributes.probe_frames(probe, t255)
        # one detector (the probe) on both sides, as dlib on video
        rec["lmd"] = attributes.attribute_errors(pg, pt)["lmd"]
        if "motion" in gt:  # procedural: the true parameters are known
            ident = procedural.make_identity(int(gt["identity_seed"]))
            rows = [attributes.probe_target(ident, m.numpy()) for m in gt["motion"][scored]]
            truth = torch.from_numpy(np.stack(rows, dtype=np.float32))
            rec["attr"] = attributes.attribute_errors(pg, truth)        # generated frames vs truth
            # the probe on the true frames: its floor here
            rec["attr_floor"] = attributes.attribute_errors(pt, truth)
            rec["lmd_vs_renderer"] = rec["attr"].pop("lmd")     # probe(gen) vs renderer landmarks
            rec["attr_floor"].pop("lmd")
    elif tools.get("landmarker") is not None:
        r = metrics.lmd(g255, t255, tools["landmarker"])
        rec["lmd"] = None if math.isnan(r["lmd"]) else r["lmd"]
        rec.update(lmd_n_used=r["n_used"], lmd_missing_gen=r["n_missing_gen"],
                   lmd_missing_gt=r["n_missing_gt"])
    # (key suffix, scorer) of the lip-sync experts given; the driving clip = what 'in sync' scores
    # here
    lse = []
    if tools.get("syncnet") is not None and T >= tools["syncnet"].n_frames:
        lse.append(("ours", lambda x: lse_expert(x, mel, tools["syncnet"])))
    if tools.get("syncnet_v2") is not None and T > metrics.SYNC_FRAMES:
        lse.append(("v2", lambda x: metrics.sync_scores(metrics.to_255(x), sample["audio"],
                                                        tools["syncnet_v2"])))
    for tag, score in lse:
        s, r = score(out["x_g"]), score(frames)
        rec.update({f"lse_d_{tag}": s["lse_d"], f"lse_c_{tag}": s["lse_c"],
                    f"lse_offset_{tag}": s["offset"],
                    f"lse_d_{tag}_real": r["lse_d"], f"lse_c_{tag}_real": r["lse_c"]})
    if out["ws"] is not None and out["window"]:   # Table 3: jumps at temporal-window borders
        for name, seq in (("px", metrics.to_255(out["x_g"])), ("w", out["ws"]),
                          ("px_gt", metrics.to_255(gt["frames"]))):
            f = metrics.flicker(seq, out["window"])
            rec[f"flicker_{name}_border"], rec[f"flicker_{name}_inside"] = f["border"], f["inside"]
    if out["z_sc_spread"] is not None:
        # std over t of z_s->c: 0 by construction (Sec. 3.1)
        rec["z_sc_spread"] = out["z_sc_spread"]
    if out["canon"] is not None and T > 1:
        c01, d01 = (out["canon"].clamp(-1, 1) + 1) / 2, (frames + 1) / 2
        # Fig. 5b: pixel variance over the clip, [0,1]^2
        rec["canon_var"] = float(c01.var(0).mean())
        # the same for the driving frames themselves
        rec["drive_var"] = float(d01.var(0).mean())
        # Fig. 6: pose spread (yaw, pitch, roll std), degrees
        if probe is not None:
            pc, pd = (attributes.probe_frames(probe, metrics.to_255(out["canon"])),
                      attributes.probe_frames(probe, metrics.to_255(frames)))
            rec["canon_pose_std"] = float(pc[:, :3].std(0).mean() * (180 / math.pi))
            rec["drive_pose_std"] = float(pd[:, :3].std(0).mean() * (180 / math.pi))
    return rec, dict(source=x_s, driving=frames, gt=gt["frames"], gen=out["x_g"],
                     audio=sample["audio"])


def _map_leaves(v, f):
    """f applied to every value inside nested dicts and lists / tuples (tuples come back as
    lists)."""
    if isinstance(v, dict):
        return {k: _map_leaves(x, f) for k, x in v.items()}
    return [_map_leaves(x, f) for x in v] if isinstance(v, (list, tuple)) else f(v)


def _strip_nonfinite(v):
    """JSON has no inf/NaN: write them as the strings 'inf', '-inf', 'nan' (read back with
    float())."""
    return _map_leaves(v, lambda x: str(x) if isinstance(x, float) and not math.isfinite(x) else x)


def _restore_nonfinite(v):
    return _map_leaves(v, lambda x: float(x) if isinstance(x, str) and x in ("inf", "-inf", "nan")
                       else x)


def read_done(path):
    """Per-clip JSON lines -> {clip index: record}. A torn last line (killed mid-write) is
    ignored."""
    done = {}
    for line in (Path(path).read_text().splitlines() if os.path.isfile(path) else []):
        try:
            rec = _restore_nonfinite(json.loads(line))
        except json.JSONDecodeError:
            continue
        done[rec["clip"]] = rec
    return done


def summarize(records):
    """Mean over clips of every per-clip number (None where no clip has it)."""
    keys = [k for k in records[0]
            if k not in ("clip", "pair", "attr", "attr_floor", "seconds")] if records else []
    out = {k: attributes.mean_of_known([r.get(k) for r in records]) for k in keys}
    for group in ("attr", "attr_floor"):
        rows = [r[group] for r in records if group in r]
        if rows:
            out[group] = {k: attributes.mean_of_known([r[k] for r in rows]) for k in rows[0]}
    out.update(n_clips=len(records), n_psnr_inf=int(sum(r.get("n_psnr_inf", 0) for r in records)))
    return out


def format_table(summary, run, notes):
    """Markdown table(s) shaped like Table 1 (and the controllability table for --protocol
    cross)."""
    s, name = summary, run["method_label"]
    sync_c = "lse_c_v2" if s.get("lse_c_v2") is not None else "lse_c_ours"
    sync_d, mark = sync_c.replace("lse_c", "lse_d"), "" if sync_c == "lse_c_v2" else "†"

    def c(key, fmt="{:.2f}"):
        return attributes.cell(s.get(key), fmt)
    if run["protocol"] == "pcavs":
        lines = [f"| Method | SSIM ↑ | MS-SSIM ↑ | PSNR ↑ | LMD ↓ | LSE-C{mark} ↑ | "
                 f"LSE-D{mark} ↓ |",
                 "|---|---|---|---|---|---|---|",
                 f"| {name} | {c('ssim', '{:.3f}')} | {c('ms_ssim', '{:.3f}')} | {c('psnr')} | "
                 f"{c('lmd')} | {c(sync_c)} | {c(sync_d)} |"]
        if s.get(sync_c + "_real") is not None:
            lines.append(f"| real frames (sync reference) | | | | | {c(sync_c + '_real')} | "
                         f"{c(sync_d + '_real')} |")
        for meth, vals in PAPER_TABLE1.get(run.get("paper_table"), {}).items():
            lines.append(f"| {meth} [paper, {run['paper_table']}] | "
                         + " | ".join(attributes.cell(v, "{:.2f}") for v in vals) + " | |")
    else:
        def attrs(key):  # one cell per attributes.ATTRIBUTES entry of s[key]
            return " | ".join(attributes.cell((s.get(key) or {}).get(k), "{:.3g}")
                              for k in attributes.ATTRIBUTES)
        heads = " | ".join(f"{k} err ({unit}) ↓"
                           for k, (_, _, unit) in attributes.ATTRIBUTES.items())
        fid = (f"{c('sharpness')} | {c('background_err', '{:.1f}')} | {c('skin_err', '{:.1f}')} | "
               f"{c('jitter')} | {c('seam')} | {c('drift', '{:.2f}')}")
        lines = [f"| Method | SSIM ↑ | PSNR ↑ | sharpness ↑ | background err ↓ | skin err ↓ | "
                 f"jitter (1 = truth's) | seam (1 = none) | drift ↓ | {heads} | LMD ↓ | "
                 f"LSE-C{mark} ↑ |",
                 "|---|---|---|---|---|---|---|---|---|" + "---|" * len(attributes.ATTRIBUTES)
                 + "---|---|",
                 f"| {name} | {c('ssim', '{:.3f}')} | {c('psnr')} | {fid} | {attrs('attr')} | "
                 f"{c('lmd')} | {c(sync_c)} |"]
        if s.get("attr_floor"):
            lines.append(f"| probe on ground truth (its floor) | | | | | | | | | "
                         f"{attrs('attr_floor')} | | |")
        notes.append("fidelity vs the renderer's picture of A (metrics.fidelity): sharpness = "
                     "squared Laplacian of luminance over A's head, generated / truth; background "
                     "/ skin err = mean |gen - truth| in grey levels over A's backdrop / face "
                     "skin; jitter = mean frame-to-frame change, generated / truth; seam = change "
                     "across temporal-window borders / inside them, generated over truth; "
                     f"drift = background err of the last {DRIFT_FRAMES} frames minus the first "
                     f"(clips >= {2 * DRIFT_FRAMES} frames)")
        if s.get("canon_var") is not None:
            notes.append(f"canonical space (Fig. 5b): pixel variance over a clip of "
                         f"G(E_can(E_inv(x_d,t))) = "
                         f"{s['canon_var']:.5f} vs {s['drive_var']:.5f} for the driving frames "
                         f"(ratio {s['canon_var'] / max(s['drive_var'], 1e-12):.3f}; "
                         f"< 1 = motion removed)")
        if s.get("canon_pose_std") is not None:
            notes.append(f"canonical pose spread (Fig. 6): probe yaw/pitch/roll std "
                         f"{s['canon_pose_std']:.2f}° vs {s['drive_pose_std']:.2f}° for the "
                         f"driving frames")
    if s.get("z_sc_spread") is not None:
        notes.append(f"z_s->c spread over a clip (std over t, max over entries): "
                     f"{s['z_sc_spread']:.3g} (0 by construction: E_can sees only x_s, Sec. 3.1)")
    return "\n".join(lines)


# ==== The judges' held-out quality (train.py --stage judges: E_id of Eq. 5, φ of Eq. 7) ==========
def judge_frames(split, n_people, seed=0):
    """Held-out test people's frames as the judges were trained on them (data.IdentityFrames: a
    random natural pose and expression, another person's backdrop) plus a new light each:
    [2 n, 3, 64, 64], person = index % n."""
    ds = data.SyntheticTalkingFaces("test", n_people, clips_per_identity=2, n_frames=8,
                                    first=procedural.ATTRIBUTE_SPLITS[split])
    x = torch.stack([f["image"] for f in data.IdentityFrames(ds, 2 * n_people, seed).frames])
    return data.relight(x, torch.Generator().manual_seed(seed))


def verification(e_id, split, n_people):
    """Same / different person pairs of judge_frames: (cos similarities [n], same [n] bool)."""
    x = judge_frames(split, n_people)
    emb = torch.cat([e_id(c) for c in x.split(64)])
    a, b = emb[:n_people], emb[n_people:]                   # two frames of each person
    same, diff = (a * b).sum(1), (a * b.roll(1, 0)).sum(1)  # b.roll: the next person's other frame
    return torch.cat([same, diff]), torch.cat([torch.ones(n_people), torch.zeros(n_people)]).bool()


def ranking(dist, x, later):
    """How often dist ranks a blurred (Gaussian, sigma 1 px) and a colour-shifted (+10 grey levels
    on one channel) copy of each frame as farther from it than the same clip's frame two steps
    later."""
    k = torch.tensor([math.exp(-d * d / 2) for d in (-2, -1, 0, 1, 2)], dtype=x.dtype)
    k = (k[:, None] * k[None, :] / k.sum() ** 2).expand(3, 1, 5, 5)
    blur = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (2,) * 4, mode="replicate"), k,
                                      groups=3)
    shift = x.clone()
    # +10 grey levels of 0..255 in [-1, 1]
    shift[torch.arange(len(x)), torch.arange(len(x)) % 3] += 20 / 255
    ref = dist(x, later)
    return {name: float((dist(x, y) > ref).float().mean())
            for name, y in (("blur", blur), ("colour", shift))}


@torch.no_grad()
def judge_quality(path, n_people=200):
    """-> dict: E_id's verification on unseen people (AUC; accuracy at the threshold best on the
    'tune' people, applied to the 'report' people), and φ's rankings (ranking) on report people's
    clips, beside φ's layout with random weights and pixel L1 for context."""
    import inversion
    import losses
    try:
        e_id, vgg = inversion.load_arcface(path), losses.load_vgg19(path)
    except ValueError as e:
        raise ValueError(f"--judges {path}: {e}") from None
    sim, same = verification(e_id, "tune", n_people)
    best = max(sorted(sim.tolist()), key=lambda t: float(((sim >= t) == same).float().mean()))
    sim, same = verification(e_id, "report", n_people)
    auc = float((sim[same][:, None] > sim[~same][None, :]).float().mean())
    ds = data.SyntheticTalkingFaces("test", n_people, clips_per_identity=1, n_frames=3,
                                    first=procedural.ATTRIBUTE_SPLITS["report"])
    clips = torch.stack([ds[i]["frames"] for i in range(n_people)])           # [n, 3, 3, 64, 64]
    torch.manual_seed(0)
    rand = losses.VGG19Features(**{**losses.PRESETS["tiny"]["vgg"],
                                   "base": vgg.features[0].out_channels})
    lpips = lambda net: lambda a, b: torch.stack([losses.perceptual_loss(net, u[None], v[None])
                                                  for u, v in zip(a, b)])
    dists = dict(phi=lpips(vgg), phi_untrained=lpips(rand),
                 l1=lambda a, b: (a - b).abs().flatten(1).mean(1))
    return dict(e_id=dict(auc=auc, accuracy=float(((sim >= best) == same).float().mean()),
                          threshold=best, pairs=2 * n_people),
                phi={name: ranking(d, clips[:, 0], clips[:, 2]) for name, d in dists.items()})


def parse_args(argv=None):
    ap = files.ArgumentParser(description="FC-TFG evaluation: Table 1 metrics under the PC-AVS "
                                 "protocol (Sec. 4.2.3), baselines, and controllability on "
                                 "procedural data")
    ap.add_argument("--checkpoint",
                    help="train.py fctfg checkpoint, or 'untrained' (random tiny weights)")
    ap.add_argument("--data", default="synthetic",
                    help="'synthetic' (procedural test split) or a folder prepared by data.py")
    ap.add_argument("--protocol", default="pcavs", choices=("pcavs", "cross", "attributes"),
                    help="pcavs: Sec. 4.2.3 (Table 1); cross: cross-identity with the renderer's "
                         "ground truth; attributes: one attribute at a time (the attribute-"
                         "transfer table, procedural data)")
    ap.add_argument("--split", default="report", choices=sorted(procedural.ATTRIBUTE_SPLITS),
                    help="procedural data: which held-out people and motions (settings are tuned "
                         "on 'tune', numbers reported on 'report')")
    ap.add_argument("--baseline", default=None,
                    choices=("copy_source", "encoder_recon", "truth_recon"),
                    help="score a baseline instead of FC-TFG: the source frame copied, "
                         "G(E_inv(x_d)), or (--protocol cross) G(E_inv(ground truth)): the decoder "
                         "+ inversion ceiling")
    ap.add_argument("--n_clips", type=int, default=20,
                    help="clips (pairs for --protocol attributes) to score")
    ap.add_argument("--mead", action="store_true", help="--data is a prepared MEAD folder: score "
                    "the paper's MEAD test set (Sec. 4.1.1: 5 speakers x 8 emotions x 5 frontal "
                    "clips, data.mead_clip_list)")
    ap.add_argument("--clip_frames", type=int, default=32, help="synthetic clip length T (25 fps)")
    ap.add_argument("--out", default=None,
                    help="results folder (evaluation) or probe file (--train-probe)")
    ap.add_argument("--syncnet",
                    help="our lip-sync expert (train.py --stage syncnet checkpoint) for LSE-D/C")
    ap.add_argument("--syncnet-v2", dest="syncnet_v2",
                    help="syncnet_python's syncnet_v2.model for LSE-D/C")
    ap.add_argument("--probe",
                    help="motion probe from --train-probe (LMD and attribute errors on procedural "
                         "data)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--hyper_steps", type=int, default=None,
                    help="HyperStyle steps on x_s (default: the checkpoint's)")
    ap.add_argument("--preset", default="tiny", help="architecture of --checkpoint untrained")
    ap.add_argument("--window", type=int, default=5,
                    help="temporal window of --checkpoint untrained")
    ap.add_argument("--chunk", type=int, default=40,
                    help="frames per forward pass (rounded down to whole windows)")
    ap.add_argument("--paper_windows", action="store_true", help=fusion.PAPER_WINDOWS_HELP)
    ap.add_argument("--deflicker", type=float, default=fusion.DEFLICKER_TAU,
                    help=fusion.DEFLICKER_HELP)
    ap.add_argument("--examples", type=int, default=2, help="side-by-side example videos to save")
    ap.add_argument("--paper_table", default="auto", choices=("auto", "voxceleb2", "mead", "none"),
                    help="Table 1 rows of the paper printed beside ours on real data (auto: from "
                         "--data / --mead)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of an untrained model and of the probe's training")
    ap.add_argument("--train-probe", dest="train_probe", action="store_true",
                    help="train the motion probe, save to --out")
    ap.add_argument("--probe_frames", type=int, default=20000,
                    help="--train-probe: rendered training frames")
    ap.add_argument("--probe_steps", type=int, default=1500, help="--train-probe: optimiser steps")
    ap.add_argument("--judges", help="a train.py judges checkpoint: held-out quality of E_id "
                    "(Eq. 5) and φ (Eq. 7) into --out")
    return ap.parse_args(argv)


# The numeric flags and the values they accept (one place; None = the flag's "not given"):
# (minimum, maximum)
NUMBERS = dict(n_clips=(1, 100_000), clip_frames=(2, 10_000), hyper_steps=(0, 100),
               window=(1, 10_000), chunk=(1, 10_000), examples=(0, 1000), seed=(0, 2 ** 31 - 1),
               probe_frames=(64, 10_000_000), probe_steps=(1, 10_000_000), deflicker=(0, 255))


def check_args(args):
    """Numbers in range, outputs that would not overwrite an input, then check_idle_flags:
    ValueError."""
    for flag, (lo, hi) in NUMBERS.items():
        v = getattr(args, flag)
        if v is not None and not lo <= v <= hi:
            raise ValueError(f"--{flag} {v}: must be between {lo} and {hi}")
    if args.out is not None:
        out = Path(args.out).resolve()
        for flag in ("checkpoint", "syncnet", "syncnet_v2", "probe", "judges", "data"):
            src = getattr(args, flag)
            if src and src not in ("untrained", "synthetic") and (
                    out == Path(src).resolve() or Path(src).resolve().is_relative_to(out)
                    or (flag == "data" and out.is_relative_to(Path(src).resolve()))):
                raise ValueError(f"--out {args.out} would overwrite or fill the "
                                 f"--{flag.replace('_', '-')} input {src}; choose another --out")
        if args.train_probe and Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a folder; --train-probe writes a file such as "
                             f"probe.pt")
        # replace an old probe, never anything else
        if args.train_probe and Path(args.out).is_file():
            try:
                attributes.load_probe(args.out)
            except ValueError:
                raise ValueError(f"--out {args.out} exists and is not a motion probe: "
                                 f"--train-probe would replace it; choose another --out") from None
        if not args.train_probe and Path(args.out).is_file():
            raise ValueError(f"--out {args.out} is a file; the results go into a folder")
    check_idle_flags(args)


def check_idle_flags(args):
    """A flag that acts only with another one, set without it (or with one that idles it), would do
    nothing: ValueError instead."""
    default = parse_args([])
    for flag, needs, ok in (("probe_frames", "--train-probe", args.train_probe),
                            ("probe_steps", "--train-probe", args.train_probe),
                            ("preset", "--checkpoint untrained", args.checkpoint == "untrained"),
                            ("window", "--checkpoint untrained", args.checkpoint == "untrained"),
                            ("split", "--data synthetic", args.data == "synthetic"),
                            ("paper_table", "--data FOLDER (real clips)",
                             args.data != "synthetic")):
        if getattr(args, flag) != getattr(default, flag) and not ok:
            raise ValueError(f"--{flag} has no effect without {needs}")
    # the copied source frame is never rendered, so there is nothing to deflicker
    if args.deflicker != default.deflicker and args.baseline == "copy_source":
        raise ValueError("--deflicker has no effect with --baseline copy_source (it renders "
                         "nothing); drop it")


def clip_set(args, size):
    """The clips to score: held-out procedural people (synthetic), a prepared folder, or its MEAD
    test list (Sec. 4.1.1). -> (dataset, number of clips)."""
    # two people at least: cross needs a second person even for one clip
    if args.data == "synthetic":
        return data.SyntheticTalkingFaces(
            "test", n_identities=max(args.n_clips, 2), clips_per_identity=1,
            n_frames=args.clip_frames, size=size,
            first=procedural.ATTRIBUTE_SPLITS[args.split]), args.n_clips
    if args.protocol == "cross":
        raise ValueError("--protocol cross needs the renderer's ground truth: use --data synthetic")
    only = data.mead_clip_list(args.data) if args.mead else None
    ds = data.VideoFolderDataset(args.data, n_frames=None, random_window=False, only=only,
                                 size=size)
    return ds, (len(ds) if args.mead else min(args.n_clips, len(ds)))


def load_tools(args, synthetic, hyper_steps, device):
    """The scorers the flags ask for (lip-sync experts, landmark probe or dlib) and the table's
    notes on each. -> (tools dict for evaluate_clip, notes)."""
    tools = dict(hyper_steps=hyper_steps, chunk=args.chunk, continuous=not args.paper_windows,
                 deflicker=args.deflicker)
    notes = []
    if args.syncnet:
        # "paper" sizes a Wav2Lip lipsync_expert.pth; our checkpoints carry their own preset
        tools["syncnet"] = audio.load_expert(args.syncnet, "paper", device)
        notes.append("† LSE with OUR lip-sync expert (audio.SyncNet from train.py --stage syncnet, "
                     "unit-norm embeddings, syncnet_python's ±15 offset search): not "
                     "syncnet_python's SyncNet v2, so NOT comparable with the paper's LSE-C")
    if args.syncnet_v2:
        tools["syncnet_v2"] = metrics.load_syncnet_v2(args.syncnet_v2, device)
        notes.append("LSE with SyncNet v2 (syncnet_python weights), whole frames resized to 224 "
                     "(Wav2Lip's scores_LSE variant, no face-track crop, no JPEG round trip)")
    if not args.syncnet and not args.syncnet_v2:
        notes.append("LSE-C/LSE-D: '-' (pass --syncnet OUR_EXPERT.pt or --syncnet-v2 "
                     "syncnet_v2.model)")
    if args.probe:
        tools["probe"], held = attributes.load_probe(args.probe, device)
        notes += [f"LMD and attributes from the motion probe {args.probe} (CNN trained on rendered "
                  f"frames with the renderer's labels); its held-out error on rendered frames: "
                  f"{attributes.format_attrs(held)} (LMD in px at 224, 4 mouth points): "
                  f"differences below that are not resolved",
                  "LMD = probe on generated vs probe on ground-truth frames (one detector on both "
                  "sides, as dlib on real video); lmd_vs_renderer in results.json compares with "
                  "the renderer's own landmarks"]
    elif synthetic:
        notes.append("LMD: '-': dlib finds no face in procedural frames and we have no other "
                     "landmark detector for them; pass --probe (train one with python evaluate.py "
                     "--train-probe --out probe.pt)")
    else:
        try:
            tools["landmarker"] = metrics.DlibLandmarker()
            notes.append("LMD: dlib 68-point mouth (48-67), RAD-NeRF convention (centred, mean "
                         "over 20 points, px at 224)")
        except (ImportError, FileNotFoundError) as e:
            notes.append(f"LMD: '-' ({e})")
            print(f"warning: LMD will be '-': {e} (pip install dlib-bin face_recognition_models)",
                  file=sys.stderr)
    notes.append("SSIM/MS-SSIM/PSNR on uint8-rounded RGB frames (data_range 255, SSIM mean over "
                 "channels), per frame -> per clip -> mean over clips; pcavs scores frames 1..T-1, "
                 "cross all frames")
    return tools, notes


def run_clips(args, ds, n, method, model, size, tools, out, device):
    """Score clips 0..n-1, one JSON line each in out/clips.jsonl (fsynced: a killed run resumes
    where it stopped). -> {clip index: record}."""
    log_path = out / "clips.jsonl"
    done = read_done(log_path)
    todo = [i for i in range(n) if i not in done]
    if len(todo) < n:
        print(f"resuming: {n - len(todo)} of {n} clips already done in {log_path}, skipping them")
    t0, n_frames_done, videos = time.time(), 0, True   # videos: False once PyAV turned out missing
    with open(log_path, "a") as log_fh:
        for k, i in enumerate(todo):
            tc = time.time()
            if args.protocol == "cross":  # A = clip i's person, driven by clip j
                j = (i + 1) % len(ds)
                rec, ex = evaluate_clip(_to(ds[j], device), method, model,
                                        x_s=ds[i]["frames"][0].to(device),
                                        gt=_to(ds.cross(i, j), device), tools=tools)
                rec["pair"] = [i, j]
            else:
                sample = ds[i]
                if model is not None and sample["frames"].shape[-1] != size:
                    raise ValueError(f"clip {i} is {sample['frames'].shape[-1]} px but the model "
                                     f"renders {size} px")
                rec, ex = evaluate_clip(_to(sample, device), method, model, tools=tools)
            rec["clip"], rec["seconds"] = i, time.time() - tc
            log_fh.write(json.dumps(_strip_nonfinite(rec)) + "\n")
            log_fh.flush()
            os.fsync(log_fh.fileno())
            done[i] = rec
            if i < args.examples and videos:
                videos = _save_example(out / "examples" / f"clip{i:04d}.mp4", ex, args.protocol)
            n_frames_done += rec["n_frames"]
            el = time.time() - t0
            print(f"[{k + 1:4d}/{len(todo)}] clip {i} | ssim {rec['ssim']:.3f} "
                  f"psnr {attributes.cell(rec['psnr'], '{:.2f}')} | "
                  f"{n_frames_done / el:.1f} frames/s "
                  f"| ETA {el / (k + 1) * (len(todo) - k - 1):.0f} s", flush=True)
    return done


def write_results(out, header, table, notes, payload):
    """Print the table and write results.json (payload) and results.md (header, table, notes) into
    out/."""
    out.mkdir(parents=True, exist_ok=True)
    print(header + "\n" + table + "\n" + "\n".join("- " + s for s in notes))
    files.write_text(out / "results.json", json.dumps(_strip_nonfinite(payload), indent=1))
    files.write_text(out / "results.md",
                     f"# {header}\n\n{table}\n\n" + "\n".join("- " + s for s in notes) + "\n")


def evaluate(args):
    """The evaluation run behind the CLI; returns the summary dict. Errors raise ValueError /
    FileNotFoundError (main turns them into one line)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    method = args.baseline or "model"
    if args.out is None:
        raise ValueError("--out DIR is required (results, per-clip log, example videos)")
    if args.mead and args.data == "synthetic":
        raise ValueError("--mead selects clips of a prepared MEAD folder: pass it as --data")
    if args.n_clips < 1:
        raise ValueError(f"--n_clips must be >= 1, got {args.n_clips}")
    if method == "truth_recon" and args.protocol != "cross":
        raise ValueError("--baseline truth_recon redraws the ground truth of another person: "
                         "--protocol cross (pcavs: it is --baseline encoder_recon; attributes: "
                         "every baseline is a row already)")
    if args.checkpoint is None and method != "copy_source":
        raise ValueError("--checkpoint CKPT (or 'untrained') is required unless --baseline "
                         "copy_source")
    model, cfg = (load_model(args.checkpoint, args.preset, args.window, device, args.seed)
                  if args.checkpoint is not None and method != "copy_source" else (None, {}))
    hyper_steps = args.hyper_steps if args.hyper_steps is not None else int(
        cfg.get("hyper_steps", 0))
    if cfg.get("stage") and (method not in ("encoder_recon", "truth_recon")
                             or args.protocol == "attributes"):
        raise ValueError(f"--checkpoint {args.checkpoint} is a {cfg['stage']} checkpoint (no "
                         f"FC-TFG yet): it can score --baseline truth_recon / encoder_recon only")
    if args.protocol == "attributes":
        return evaluate_attributes(args, model, hyper_steps, device)
    synthetic = args.data == "synthetic"
    # copy_source: the frames' own side
    size = model.G.size if model is not None else 64 if synthetic else None
    ds, n = clip_set(args, size)
    size = size or int(ds[0]["frames"].shape[-1])
    tools, notes = load_tools(args, synthetic, hyper_steps, device)
    paper = None if synthetic or args.paper_table == "none" else args.paper_table
    if paper == "auto":
        paper = "mead" if args.mead or "mead" in args.data.lower() else "voxceleb2"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files.remove_temporaries(out)  # what a killed run's atomic writes left behind
    run = dict(protocol=args.protocol, method=method, checkpoint=args.checkpoint, data=args.data,
               clip_frames=args.clip_frames if synthetic else None, size=size,
               hyper_steps=hyper_steps, syncnet=args.syncnet, syncnet_v2=args.syncnet_v2,
               probe=args.probe, seed=args.seed, mead=args.mead,
               split=args.split if synthetic else None, paper_windows=args.paper_windows,
               deflicker=args.deflicker,
               window=(model.fusion.temporal.window if model is not None else None))
    old = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else run
    if diff := sorted(k for k in run if old.get(k) != run[k]):
        raise ValueError(f"{out} holds clips of a different evaluation (differs in {diff}); "
                         f"use another --out")
    if old is run:
        files.write_text(out / "run.json", json.dumps(run, indent=1))
    label = {"model":
             f"FC-TFG ({'untrained ' + args.preset if args.checkpoint == 'untrained' else 'ours'})",
             "copy_source": "baseline: copy source frame",
             "encoder_recon": "baseline: G(E_inv(x_d)) (upper bound)",
             "truth_recon": "baseline: G(E_inv(ground truth)) "
                            "(decoder + inversion ceiling)"}[method]
    done = run_clips(args, ds, n, method, model, size, tools, out, device)
    records = [done[i] for i in range(n)]
    summary = summarize(records)
    if summary.get("ms_ssim") is None:
        notes.append(f"MS-SSIM: '-': 5 scales of an {metrics.SSIM_WIN}x{metrics.SSIM_WIN} window "
                     f"need sides > {metrics.MS_SSIM_MIN_SIDE} px; frames are {size} px")
    run["method_label"], run["paper_table"] = label, paper
    header = (f"FC-TFG evaluation | protocol {args.protocol} | data {args.data} ({n} clips, {size} "
              f"px) | method {label} | checkpoint {args.checkpoint} | hyper_steps {hyper_steps}")
    table = format_table(summary, run, notes)
    write_results(out, header, table, notes,
                  dict(run=run, summary=summary, notes=notes, clips=records))
    return summary


def evaluate_attributes(args, model, hyper_steps, device):
    """--protocol attributes: the attribute-transfer table (every row in one run) ->
    results.json/md."""
    if model is None:
        raise ValueError("--protocol attributes needs --checkpoint (its rows include the "
                         "copy-source baseline)")
    if args.baseline:
        raise ValueError("--protocol attributes computes every baseline row itself; "
                         "drop --baseline")
    if args.data != "synthetic":
        raise ValueError("--protocol attributes needs the renderer's ground truth: "
                         "use --data synthetic")
    probe, held = attributes.load_probe(args.probe, device) if args.probe else (None, None)
    res = attributes.attribute_transfer(model, args.n_clips, args.split, args.clip_frames, probe,
                                        hyper_steps, not args.paper_windows, args.deflicker)
    notes = [f"{args.n_clips} pairs (A, B) of held-out people, split '{args.split}', "
             f"{args.clip_frames} frames; corr = temporal correlation of luminance with the "
             f"reference over the pixels that move in it (> {attributes.ATTR_MOVE_THR} grey "
             f"levels std): 1 = reproduced, 0 = still",
             "the driver's-own-codes row is correlated with the driver's own frames (B with the "
             "attribute; lips: B speaking) and its PSNR taken against A's ground truth (identity "
             "test)"]
    if held is not None:
        notes.append(f"err = motion probe on the generated frames vs the true parameter "
                     f"({args.probe}; held-out error on rendered frames "
                     f"{attributes.format_attrs(held)})")
    header = f"FC-TFG attribute transfer | checkpoint {args.checkpoint} | hyper_steps {hyper_steps}"
    run = dict(protocol="attributes", checkpoint=args.checkpoint, split=args.split,
               n_pairs=args.n_clips, paper_windows=args.paper_windows, deflicker=args.deflicker,
               clip_frames=args.clip_frames, probe=args.probe, hyper_steps=hyper_steps)
    write_results(Path(args.out), header, attributes.format_attribute_table(res), notes,
                  dict(run=run, attributes=res, notes=notes))
    return res


# the motion labels stay on the CPU: attributes.probe_target reads them with numpy
def _to(sample, device):
    return {k: v.to(device) if torch.is_tensor(v) and k != "motion" else v
            for k, v in sample.items()}


def _save_example(path, ex, protocol):
    """Side-by-side mp4 with the driving audio: source (repeated) | driving (cross only) | ground
    truth | generated, uint8 [T, H, n W, 3]. -> whether it was written: False, with one note, when
    PyAV is missing."""
    panels = [ex["source"].expand_as(ex["gen"]), *([ex["driving"]] if protocol == "cross" else []),
              ex["gt"], ex["gen"]]
    video = torch.cat([metrics.to_255(p) for p in panels], -1).permute(0, 2, 3, 1).to(
        torch.uint8).cpu().numpy()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        media.write_video(path, video, audio=ex["audio"].cpu().numpy())
        return True
    except ImportError as e:
        print(f"note: example videos skipped ({e})")
        return False


def report_judges(args):
    """--judges: judge_quality of a judges checkpoint as a table in --out (results.md /
    results.json)."""
    if not args.out:
        raise ValueError("--judges needs --out DIR")
    q = judge_quality(args.judges)
    e, p = q["e_id"], q["phi"]
    table = "\n".join(["| judge | held-out quality |", "|---|---|",
                       f"| E_id (ArcFace) | verification AUC {e['auc']:.3f}, "
                       f"accuracy {e['accuracy']:.3f} ({e['pairs']} pairs of unseen people) |"] +
                      [f"| {name} | blur farther {r['blur']:.2f}, colour shift farther "
                       f"{r['colour']:.2f} |"
                       for name, r in p.items()])
    write_results(Path(args.out), f"judges {args.judges}", table,
                  ["E_id: two frames per unseen person, each a random pose, expression, backdrop "
                   "and light; threshold chosen on the 'tune' people, accuracy on the 'report' "
                   "people",
                   "φ rows: share of held-out frames whose degraded copy is farther than the "
                   "clip's frame two steps later (phi_untrained: the same layout with random "
                   "weights; l1: pixels)"],
                  dict(judges=args.judges, **q))


def main(argv=None):
    args = parse_args(argv)

    def body():
        check_args(args)
        if args.judges:
            report_judges(args)
        elif args.train_probe:
            if not args.out:
                raise ValueError("--train-probe needs --out FILE.pt")
            attributes.train_probe(args.out, n_train=args.probe_frames, steps=args.probe_steps,
                                   seed=args.seed)
        else:
            evaluate(args)
    return files.run_command(body, "interrupted; the clips scored so far are in "
                             "--out's clips.jsonl (a rerun resumes)")


if __name__ == "__main__":
    sys.exit(main())
