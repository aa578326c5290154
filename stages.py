"""stages.py: what one optimiser step of each training stage computes (Sec. 4.1.2, Eq. 3-9).

  Stage 0  JudgesStage      E_id and φ of Eq. (5), (7); the paper downloads both (Sec. 3.3.3, 3.3.5)
  Stage 1  StyleGAN2Stage   the decoder G: non-saturating loss, lazy R1 / path length (Sec. 4.1.2)
  Stage 2  SyncNetStage     the lip-sync expert behind L_sync, Eq. (4)                (Sec. 3.3.2)
  Stage 3  InversionStage   E_inv: the pSp encoder, then HyperStyle on its codes      (Sec. 4.1.2)
  Stage 4  FCTFGStage       E_can, E_m and the temporal fusion on Eq. (3)-(9)          (Sec. 3)

train.py holds the settings and the loop that drives a stage (its `Stage` interface below). The
FC-TFG step reads as the paper: the D step under Eq. (8), then the G step's terms, each under its
printed formula (FCTFGStage.loss_terms), summed as Eq. (9) (FCTFGStage.eq9). The tiny recipe's two
aids (a weight map on Eq. 6's pixels, a latent target beside Eq. 9) are fenced in a subclass,
TinyRecipeFCTFGStage, that the paper preset never builds. Networks: stylegan2.py, inversion.py,
audio.py, fusion.py; losses: losses.py; data: data.py.

Several processes (torchrun): every rank computes gradients on its own shard of the batch and
`step_optimizer` averages them with ONE all-reduce per optimiser step (DDP's arithmetic, without
DDP's hooks: see train.py's docstring).
"""
import copy

import torch
import torch.distributed as dist

import audio
import data
import files
import fusion
import inversion
import losses
import stylegan2
import stylegan2_ops as ops


# ==== Gradients of the global batch: one all-reduce per optimiser step ============================

def all_reduce_mean(tensors, world):
    """Replace each tensor, in place, by its mean over the ranks. One flat buffer = one collective
    call."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


def average_gradients(params, world):
    """All-reduce and average the gradients of `params`: then every rank holds those of the GLOBAL
    batch's mean loss."""
    all_reduce_mean([p.grad for p in params if p.grad is not None], world)


def step_optimizer(opt, world):
    """One optimiser step on every rank: average_gradients of the parameters `opt` updates, then
    opt.step()."""
    average_gradients([p for group in opt.param_groups for p in group["params"]], world)
    opt.step()



# ==== The stage interface: what train() drives; one class per stage below =========================
class Stage:
    """A training stage as train() sees it. `models`, `optimizers`, `extra_state`: the attribute
    names of its networks, optimisers and extra tensors (what a checkpoint holds and --resume
    restores). Methods:
      dataset(clips) -> the data.py dataset whose items form the micro-batches;
      step(k, micro, world, autocast) -> logs: one optimiser step of every network on this rank's
      micro-batches; samples(batch, seed) -> images for the sample grid, `grid_nrow` per row (None:
      save_image_grid's default).
    `note`: a start-up line (terms off, values adjusted); `frames_per_sample`: frames per sample
    (for img/s)."""
    models, optimizers, extra_state = (), (), ()
    note, frames_per_sample, grid_nrow = "", 1, None


# ==== Stage 1: StyleGAN2 (Karras et al., CVPR 2020): non-saturating loss, lazy R1 / path length,
# EMA, style mixing ===
def accumulate_ema(ema, model, beta):
    """ema <- beta*ema + (1-beta)*model for parameters; buffers (fixed noise maps) are copied."""
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - beta)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


class StyleGAN2Stage(Stage):
    """Stage 1. Lazy regularisation (StyleGAN2 Sec. 3.2): R1 every r1_every D steps and path length
    every pl_every G steps, each scaled by its interval; Adam's lr and betas scaled by c = k/(k+1)
    keep the intended speed."""
    # checkpoint entries
    models, optimizers, extra_state = ("g", "d", "g_ema"), ("opt_g", "opt_d"), ("pl_mean",)
    # sample grid: 2 rows of fixed-z samples (+ a row of real frames, a row of reconstructions)
    grid_nrow = 8

    def __init__(self, cfg, device, args):
        self.cfg = cfg
        self.g = stylegan2.Generator.from_preset(cfg["model"]).to(device)
        self.d = stylegan2.Discriminator.from_preset(cfg["model"]).to(device)
        self.g_ema = copy.deepcopy(self.g).eval().requires_grad_(False)
        # k = 0 (off): Adam as is
        cg, cd = [k / (k + 1) if k else 1.0 for k in (cfg["pl_every"], cfg["r1_every"])]
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=cfg["lr"] * cg,
                                      betas=(0.0, 0.99 ** cg))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg["lr"] * cd,
                                      betas=(0.0, 0.99 ** cd))
        if cfg["gan_every"] > 1 and cfg["recon_weight"] <= 0:
            raise SystemExit("error: --gan_every > 1 only thins the GAN terms of the "
                             "reconstruction recipe; it needs --recon_weight > 0 (a plain GAN step "
                             "always has them)")
        # Tiny-scale deviation (recon_weight > 0): from scratch G needs hundreds of kimg to cover
        # the data, beyond a CPU budget (RESULTS.md, section 8). So the pSp encoder trains *with*
        # G, G(E(x)) ~ x by L1 next to the GAN loss: G becomes a decoder whose W+ space holds the
        # faces, and the inversion stage starts from this E.
        self.e_inv = None
        if cfg["recon_weight"] > 0:
            self.e_inv = inversion.PSPEncoder(**inversion.PRESETS[cfg["model"]]["psp"]).to(device)
            # no graph: mean_latent runs under no_grad
            self.e_inv.set_latent_avg(self.g.mean_latent(4096)[0])
            self.opt_e = torch.optim.Adam(self.e_inv.parameters(), lr=cfg["lr_inversion"])
            self.models, self.optimizers = self.models + ("e_inv",), self.optimizers + ("opt_e",)
        # the judges' terms of pSp's objective (0.8 LPIPS + 0.1 ID) beside that L1, when
        # --vgg / --arcface
        self.e_id, vgg = load_judges(args, device)
        self.perceptual = ((lambda a, b: losses.perceptual_loss(vgg, a, b)) if vgg is not None
                           else None)
        if (self.e_id is not None or vgg is not None) and self.e_inv is None:
            raise SystemExit("error: --arcface / --vgg judge the jointly trained encoder's "
                             "reconstructions; they need --recon_weight > 0")
        self.pl_mean = torch.zeros((), device=device)

    def dataset(self, clips):
        return data.FramePool(clips, self.cfg["frame_pool"], self.cfg["seed"],
                              self.cfg["feature_weight"])

    def step(self, k, micro, world, autocast):
        """One D and one G step on this rank's micro-batches (gradients summed, then averaged over
        ranks) -> logs."""
        cfg, G, D = self.cfg, self.g, self.d
        n_acc, zdim, dev = len(micro), G.style_dim, micro[0]["image"].device
        # gan_every > 1 (tiny recipe): D step and G's GAN term every gan_every-th step, the others
        # reconstruction only: the GAN terms cost most of a step without making samples faces,
        # while reconstruction raises fidelity (RESULTS.md, section 8).
        every = max(1, cfg["gan_every"])
        gan, logs = k % every == 0, {}
        # --- D: softplus(D(fake)) + softplus(-D(real)), the non-saturating loss of Eq. (8),
        # lazy R1 ---
        if gan:
            # R1 counts D steps: its lazy interval (and scaling) means the same for any gan_every
            k_d = k // every
            G.requires_grad_(False), D.requires_grad_(True)
            self.opt_d.zero_grad(set_to_none=True)
            for mb in micro:
                real = mb["image"]
                with autocast():
                    fake = G.sample(torch.randn(real.shape[0], zdim, device=dev),
                                    mixing_prob=cfg["mixing"])
                # backward inside
                loss_d = losses.gan_loss_d_backward(D, real, fake, 1 / n_acc, autocast)
                # its own backward, group by group
                if cfg["r1_every"] and k_d % cfg["r1_every"] == 0:
                    logs["r1"] = losses.lazy_r1(D, real, cfg["r1_gamma"], cfg["r1_every"],
                                                scale=1 / n_acc)
            step_optimizer(self.opt_d, world)
            logs["loss_d"] = loss_d

        # --- G: softplus(-D(G(z))) (+ the tiny preset's reconstruction term, which trains
        # E_inv too) ---
        G.requires_grad_(True), D.requires_grad_(False)
        opts = [self.opt_g] + ([self.opt_e] if self.e_inv is not None else [])
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        if self.e_inv is not None:
            self.e_inv.train()
        for mb in micro:
            B = mb["image"].shape[0]
            with autocast():
                loss_g = (losses.gan_loss_g(D(G.sample(torch.randn(B, zdim, device=dev),
                                                       mixing_prob=cfg["mixing"])))
                          if gan else mb["image"].new_zeros(()))
                if self.e_inv is not None:
                    x_hat = G.synthesis(self.e_inv(mb["image"]), noise_mode="const")
                    err = (x_hat - mb["image"]).abs()
                    # data.FramePool
                    rec = (err * mb["weight"]).mean() if "weight" in mb else err.mean()
                    logs["recon_l1"] = rec
                    _, judged = inversion.loss_inversion(x_hat, mb["image"], self.e_id,
                                                         self.perceptual)
                    for key in ("lpips", "id"):
                        if key in judged:
                            rec, logs[f"recon_{key}"] = (
                                rec + inversion.LAMBDA_INV[key] * judged[key], judged[key])
                    loss_g = loss_g + cfg["recon_weight"] * rec
            if gan and cfg["pl_every"] and k % cfg["pl_every"] == 0:
                ws = G.sample_ws(torch.randn(max(1, B // cfg["pl_batch_shrink"]), zdim,
                                             device=dev), cfg["mixing"])
                img = G.synthesis(ws, noise_mode="random")
                pl, self.pl_mean, mean_len = stylegan2.path_length_penalty(img, ws, self.pl_mean)
                # one running mean for all ranks (over the global batch)
                all_reduce_mean([self.pl_mean], world)
                # zero-weighted image term: every parameter of G receives a gradient on every rank
                loss_g = loss_g + cfg["pl_weight"] * cfg["pl_every"] * pl + 0 * img[0, 0, 0, 0]
                logs["pl"], logs["path_length"] = pl, mean_len
            (loss_g / n_acc).backward()
        for opt in opts:
            step_optimizer(opt, world)
        logs["loss_g"] = loss_g
        # EMA of G with a half-life of ema_kimg thousand images (StyleGAN2's G_smoothing_kimg = 10,
        # training_loop.py)
        accumulate_ema(self.g_ema, G, 0.5 ** (n_acc * micro[0]["image"].shape[0] * world
                                              / (cfg["ema_kimg"] * 1000)))
        return logs

    @torch.no_grad()
    def samples(self, batch, seed):
        z = torch.randn(16, self.g.style_dim, generator=torch.Generator().manual_seed(seed))
        # fixed z: comparable grids
        out = self.g_ema.sample(z.to(batch["image"].device), noise_mode="const")
        if self.e_inv is None:
            return out
        x = batch["image"][:8]  # two more rows: real frames | their reconstructions G_ema(E(x))
        return torch.cat([out, x, self.g_ema.synthesis(self.e_inv.eval()(x), noise_mode="const")])


# ==== Stage 2: the lip-sync expert (SyncNet of audio.py), trained as Wav2Lip trains it ============
def pair_auc(score, y):
    """P(score of a y=1 item > score of a y=0 item) over all pairs of the batch; NaN without
    both."""
    pos, neg = score[y > 0], score[y <= 0]
    return ((pos[:, None] > neg[None, :]).float().mean() if len(pos) and len(neg)
            else torch.tensor(float("nan")))


class SyncNetStage(Stage):
    """Stage 2. The lip-sync expert on cos(f_a(mel), f_v(lower half of 5 frames)); the paper uses a
    pre-trained one, we train our own (same network, L_sync of Eq. 4 uses its cosine either way)
    with one of two losses:
      expert_loss="bce" (paper preset): Wav2Lip's BCE(cos, y) on in-sync (y=1) / shifted (y=0)
      pairs; expert_loss="nce" (tiny preset): symmetric InfoNCE over the batch's in-sync pairs
      (CLIP-style). Why: cos of ReLU embeddings starts near 1 for every pair and one negative per
      positive is a weak signal; InfoNCE has B-1 negatives per pair (RESULTS.md, section 8)."""
    models, optimizers, extra_state = ("syncnet",), ("opt",), ()

    def __init__(self, cfg, device, args):
        self.cfg = cfg
        self.syncnet = audio.SyncNet(**audio.PRESETS[cfg["model"]]).to(device)
        self.opt = torch.optim.Adam(self.syncnet.parameters(), lr=cfg["lr_syncnet"])
        self.frames_per_sample = self.syncnet.n_frames
        if cfg["batch"] < 2:  # BatchNorm normalises over the batch; one sample has no statistics
            raise SystemExit(f"error: the syncnet stage needs --batch >= 2 per process (its "
                             f"BatchNorm layers need two samples), got {cfg['batch']}")

    def dataset(self, clips):
        return data.ClipWindows(clips, self.syncnet.n_frames, self.cfg["seed"], off_sync=True)

    def step(self, k, micro, world, autocast):
        self.syncnet.train()
        self.opt.zero_grad(set_to_none=True)
        auc = []
        for mb in micro:
            with autocast():
                a, v = self.syncnet(mb["mel_expert"],
                                    audio.expert_window(mb["frames"], size=self.syncnet.face_hw[1]))
                cos = (a * v).sum(1).float()
                if self.cfg["expert_loss"] == "bce":   # Wav2Lip: BCE(cos, y)
                    loss = audio.loss_expert_bce(cos.clamp(0, 1), mb["y"])
                else:                                  # "nce": see the class docstring
                    loss = audio.loss_expert_nce(a[mb["y"] > 0], v[mb["y"] > 0])
            (loss / len(micro)).backward()
            auc.append(pair_auc(cos.detach(), mb["y"]))
        step_optimizer(self.opt, world)
        # AUC: how often an in-sync pair scores above a shifted one (0.5 = chance); threshold-free,
        # so it means the same under both losses (NCE does not calibrate cos to P(sync)). Not logged
        # for a batch without both kinds.
        auc = torch.stack(auc).nanmean()
        return {"loss_sync_expert": loss, **({"auc": auc} if torch.isfinite(auc) else {})}

    def samples(self, batch, seed):
        return batch["frames"][:8, 0]  # the expert has no images of its own: show its inputs


# ==== Stage 0: the judges of Eq. (5) and (7), trained on who is in a frame and nothing else =======
class JudgesStage(Stage):
    """Stage 0 (tiny preset; the paper downloads both judges): E_id for Eq. (5), an IR-SE ArcFace
    (inversion.IdentityEncoder) trained with ArcFace's margin loss, and φ for Eq. (7), the VGG19
    layout (losses.VGG19Features) trained with a linear identity classifier on its last tap, as
    VGG19 learned from ImageNet's classes. Both learn from identity labels alone
    (data.IdentityFrames: any pose, expression, backdrop; data.relight: any light), never from the
    renderer's motion parameters. evaluate.py --judges reports their held-out quality."""
    models, optimizers, extra_state = ("e_id", "centres", "vgg", "vgg_head"), ("opt",), ()

    def __init__(self, cfg, device, args):
        self.cfg, n = cfg, cfg["n_identities"]
        self.e_id = inversion.IdentityEncoder(**inversion.PRESETS[cfg["model"]]["arcface"],
                                              frozen=False).to(device)
        self.centres = torch.nn.Linear(self.e_id.output_layer[-1].num_features, n,
                                       bias=False).to(device)
        self.vgg = losses.VGG19Features(**losses.PRESETS[cfg["model"]]["vgg"],
                                        taps=(35,)).to(device)
        self.vgg.requires_grad_(True)
        self.vgg_head = torch.nn.Linear(self.vgg.features[-2].out_channels, n).to(device)
        nets = (self.e_id, self.centres, self.vgg, self.vgg_head)
        self.opt = torch.optim.Adam([p for net in nets for p in net.parameters()],
                                    lr=cfg["lr_judges"])

    def dataset(self, clips):
        return data.IdentityFrames(clips, self.cfg["frame_pool"], self.cfg["seed"])

    def step(self, k, micro, world, autocast):
        self.e_id.train(), self.vgg.train()
        self.opt.zero_grad(set_to_none=True)
        logs = {}
        for mb in micro:
            x, y = data.relight(mb["image"]), mb["label"]
            with autocast():
                arc = inversion.arcface_loss(self.e_id(x), self.centres.weight, y)
                feat = self.vgg(losses.imagenet_normalise(x))[-1].mean((2, 3))     # relu5_4, pooled
                logits = self.vgg_head(feat)
                cls = torch.nn.functional.cross_entropy(logits, y)
            ((arc + cls) / len(micro)).backward()
            logs.update(loss_arcface=arc, loss_vgg=cls,
                        acc_vgg=(logits.argmax(1) == y).float().mean())
        step_optimizer(self.opt, world)
        return logs

    def samples(self, batch, seed):
        # what the judges see
        return data.relight(batch["image"][:16], torch.Generator().manual_seed(seed))


# ==== Stage 3: inversion (pSp encoder, then HyperStyle) on the frozen StyleGAN2 of stage 1 ========
def load_judges(args, device):
    """The frozen pre-trained networks of Eq. (5) and (7): ArcFace E_id and VGG19, or None where
    --arcface / --vgg is not given (a randomly initialised judge would only add noise). Each flag
    takes the published weights or a checkpoint of the judges stage."""
    judges = []
    for flag, load in (("arcface", inversion.load_arcface), ("vgg", losses.load_vgg19)):
        try:
            judges.append(load(getattr(args, flag)).to(device).eval().requires_grad_(False)
                          if getattr(args, flag) else None)
        except ValueError as e:                         # name the flag and the file in the one line
            raise ValueError(f"--{flag} {getattr(args, flag)}: {e}") from None
    return tuple(judges)


def load_stage_models(path, names):
    """State dicts `names` from a train.py checkpoint (clear error if the file lacks them)."""
    ck = files.load_checkpoint(path)
    missing = [n for n in names if n not in ck]
    if missing:
        raise SystemExit(f"error: {path} has no {missing} (a {ck.get('stage')!r} checkpoint); "
                         f"pass the checkpoint of the right stage with --init")
    return ck


class InversionStage(Stage):
    """Stage 3 (Sec. 4.1.2): the pSp encoder E_inv learns to invert the frozen G, then HyperStyle
    trains on its frozen codes (inversion.psp_loss / hyperstyle_loss: MSE, + L_id and L_LPIPS when
    their weights are given)."""
    models, optimizers, extra_state = ("e_inv", "hyper", "g_ema", "d"), ("opt_e", "opt_h"), ()
    grid_nrow = 8  # rows: target | pSp | pSp + HyperStyle

    def __init__(self, cfg, device, args):
        self.cfg = cfg
        p = inversion.PRESETS[cfg["model"]]
        self.g = (stylegan2.Generator.from_preset(cfg["model"]).to(device).eval()
                  .requires_grad_(False))
        # The stage-1 G and D are carried in this stage's checkpoint, so the FC-TFG stage needs
        # one --init.
        self.g_ema, self.d = self.g, stylegan2.Discriminator.from_preset(cfg["model"]).to(device)
        if args.init:  # stage-1 checkpoint: g_ema is the decoder, its mean w starts the encoder
            ck = load_stage_models(args.init, ["g_ema", "d"])
            self.g.load_state_dict(ck["g_ema"]), self.d.load_state_dict(ck["d"])
        # G is frozen (no graph); drawn before E_inv's init (RNG order)
        latent_avg = self.g.mean_latent(4096)[0]
        self.e_inv = inversion.PSPEncoder(**p["psp"]).to(device)
        self.e_inv.set_latent_avg(latent_avg)
        # tiny recipe: the encoder trained jointly with G (recon_weight)
        if args.init and "e_inv" in ck:
            self.e_inv.load_state_dict(ck["e_inv"])
        self.hyper = inversion.HyperStyle(inversion.layer_shapes(self.g),
                                          **p["hyperstyle"]).to(device)
        self.e_id, vgg = load_judges(args, device)
        self.perceptual = ((lambda a, b: losses.perceptual_loss(vgg, a, b)) if vgg is not None
                           else None)
        self.opt_e, self.opt_h = (torch.optim.Adam(net.parameters(), lr=cfg["lr_inversion"])
                                  for net in (self.e_inv, self.hyper))

    def dataset(self, clips):
        return data.FramePool(clips, self.cfg["frame_pool"], self.cfg["seed"])

    def step(self, k, micro, world, autocast):
        """pSp alone until hyper_from x max_steps (HyperStyle starts from a converged encoder); then
        HyperStyle."""
        psp_phase = k < self.cfg["hyper_from"] * self.cfg["max_steps"]
        opt = self.opt_e if psp_phase else self.opt_h
        self.e_inv.train(psp_phase), self.hyper.train(not psp_phase)
        opt.zero_grad(set_to_none=True)
        for mb in micro:
            x = mb["image"]
            with autocast():
                if psp_phase:
                    loss, parts = inversion.psp_loss(self.e_inv, self.g, x, self.e_id,
                                                     self.perceptual)
                else:
                    with torch.no_grad():
                        ws = self.e_inv(x)
                    loss, parts, _ = inversion.hyperstyle_loss(self.hyper, self.g, x, ws,
                                                              self.cfg["hyper_steps"],
                                                              self.e_id, self.perceptual)
            (loss / len(micro)).backward()
        step_optimizer(opt, world)
        return {"loss_psp" if psp_phase else "loss_hyperstyle": loss, **parts}

    @torch.no_grad()
    def samples(self, batch, seed):
        x = batch["image"][:8]
        self.e_inv.eval(), self.hyper.eval()
        _, _, rec_psp = inversion.invert(self.g, x, self.e_inv, None)
        _, _, rec_h = inversion.invert(self.g, x, self.e_inv, self.hyper, steps=3)
        return torch.cat([x, rec_psp, rec_h])  # rows: target | pSp | pSp + HyperStyle


# ==== Stage 4: FC-TFG (Sec. 3): E_can, E_m, Temporal Fusion trained with Eq. (3)-(9); the rest
# fine-tuned ====
class FCTFGStage(Stage):
    """Stage 4. Per step, on windows of T frames (x_d) with a source frame x_s and every frame's
    audio window (x_a):
      D step: non-saturating loss on real x_d vs generated x_g (Eq. 8), lazy R1;
      G step: L_total of Eq. (9) = 1 L_ortho + 0.1 L_sync + 0.5 L_id + 1 L1 + 1 L_LPIPS + 0.1 L_GAN.
    Terms whose pre-trained network is not given (--syncnet, --arcface, --vgg) are off, said so at
    start-up."""
    models, optimizers, extra_state = ("fctfg", "d"), ("opt_g", "opt_d"), ()
    grid_nrow = 4  # sample grid: one row per kind (see samples)

    def __init__(self, cfg, device, args):
        self.cfg, self.frames_per_sample = cfg, cfg["window"]
        try:
            # w indices, Sec. 4.1.2
            layers = {k: fusion.parse_layers(cfg[k]) for k in ("layers", "audio_layers")}
            self.fctfg = fusion.FCTFG(cfg["model"], temporal=cfg["temporal"], window=cfg["window"],
                                      **layers,
                                      canonical_skip=cfg["canonical"] == "residual").to(device)
        except ValueError as e:
            raise SystemExit(f"error: --layers {cfg['layers']} --audio_layers "
                             f"{cfg['audio_layers']}: {e}") from None
        m, p = self.fctfg, stylegan2.PRESETS[cfg["model"]]
        # D's minibatch-stddev groups must divide the images it sees per call (batch x window for
        # the image D): the largest divisor not above --mbstd_group, said when it is smaller (batch
        # 1 of 5-frame windows: group 1)
        n_d = cfg["batch"] * (1 if cfg["disc"] == "video" else cfg["window"])
        group = max(g for g in range(1, min(n_d, cfg["mbstd_group"]) + 1) if n_d % g == 0)
        notes = ([f"D's minibatch-stddev group: {group} (divides the {n_d} images per D call; "
                  f"--mbstd_group {cfg['mbstd_group']})"] if group < min(n_d, cfg["mbstd_group"])
                 else [])
        d_cls, d_size = ((fusion.VideoDiscriminator, (p["size"], cfg["window"]))
                         if cfg["disc"] == "video"
                         else (stylegan2.Discriminator, (p["size"],)))
        self.d = d_cls(*d_size, p["channel_multiplier"], p["channels"],
                       stddev_group=group).to(device)
        if args.init:  # inversion-stage checkpoint: G (g_ema), D, E_inv, HyperStyle
            ck = load_stage_models(args.init, ["g_ema", "d", "e_inv", "hyper"])
            (m.G.load_state_dict(ck["g_ema"]), m.E_inv.load_state_dict(ck["e_inv"]),
             m.H.load_state_dict(ck["hyper"]))
            img_d = (self.d if cfg["disc"] == "image"
                     else stylegan2.Discriminator.from_preset(cfg["model"]))
            img_d.load_state_dict(ck["d"])
            # the video D starts from the image D's weights (fusion.VideoDiscriminator)
            if img_d is not self.d:
                self.d.init_from_image_discriminator(img_d)
        # Pre-trained in the paper and fine-tuned (Sec. 4.1.2): G, E_inv (HyperStyle with pSp) and
        # E_a ([7]'s audio encoder). --freeze_pretrained freezes those --init gave weights for (G,
        # E_inv, HyperStyle). E_a has no stage here (Wav2Lip trains it with its generator), so it
        # trains: a frozen random E_a gives E_m fixed random input.
        self.frozen_nets = (([m.G, m.E_inv, m.H] if args.freeze_pretrained else [])
                            + ([m.E_a] if args.freeze_audio else []))
        for net in self.frozen_nets:
            net.requires_grad_(False)
        self.syncnet = (audio.load_expert(args.syncnet, cfg["model"], device) if args.syncnet
                        else None)
        # Sec. 4.1.2: "a pre-trained audio encoder introduced in [7]" (Wav2Lip's)
        if args.audio_encoder:
            m.E_a.load_state_dict(
                audio.load_audio_encoder(args.audio_encoder, cfg["model"]).state_dict())
        self.e_id, self.vgg = load_judges(args, device)
        self.off = [n for n, net in (("sync", self.syncnet), ("id", self.e_id),
                                     ("lpips", self.vgg)) if net is None]
        self.note = "; ".join(notes
                              + [f"loss terms off (no pre-trained weights given): {self.off}"]
                              * bool(self.off))
        # Sec. 4.1.2
        self.opt_g = torch.optim.Adam([p for p in m.parameters() if p.requires_grad],
                                      lr=cfg["lr_fctfg"])
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg["lr_fctfg"])

    def dataset(self, clips):
        return data.ClipWindows(clips, self.cfg["window"], self.cfg["seed"], source=True,
                                **{k: self.cfg[k] for k in ("source_from", "drive_mouth",
                                                            "feature_weight", "drive_colour")})

    # [B, T, ...] -> D's samples: the image D sees every frame, the video D a window
    def _d_batch(self, x):
        return x if self.cfg["disc"] == "video" else x.flatten(0, 1)

    def step(self, k, micro, world, autocast):
        """One step of each side on windows x_d with their source x_s and audio x_a: D on Eq. (8),
        then G (every network of Fig. 3 that trains) on Eq. (9). -> the logged values."""
        cfg, m, D = self.cfg, self.fctfg, self.d
        m.train()
        for net in self.frozen_nets:  # frozen networks keep their BatchNorm statistics
            net.eval()
        # One micro-batch: its forward (with graph) serves the D step and then the G step. Several
        # (--accum): the D step generates without a graph and each G step redoes its own forward
        # (BatchNorm statistics counted once), so only one micro-batch's activations live at a time.
        keep, outs = len(micro) == 1, []
        forward = lambda mb: m(mb["source"], mb["drive"], mb["mel"], hyper_steps=cfg["hyper_steps"])

        # --- D step, Eq. (8): L_D = -log D(x_d) - log(1 - D(x_g)), on detached x_g, + lazy R1 ---
        D.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        for mb in micro:
            with autocast(), torch.set_grad_enabled(keep):
                out = forward(mb)                                         # Eq. (1)-(2), Fig. 3
            real, fake = self._d_batch(mb["frames"]), self._d_batch(out["x_g"].detach())
            # computed and back-propagated one minibatch-stddev group at a time (memory)
            loss_d = losses.gan_loss_d_backward(D, real, fake, 1 / len(micro), autocast)
            if cfg["r1_every"] and k % cfg["r1_every"] == 0:
                # R1 per sample, a window: the image D sums the T frames of a window
                per = real.shape[0] // mb["frames"].shape[0]  # T for the image D, 1 for the video D
                losses.lazy_r1(D, real, cfg["r1_gamma"], cfg["r1_every"], 1 / len(micro),
                               per_sample=per)
            outs.append(out if keep else None)
        step_optimizer(self.opt_d, world)

        # --- G step, Eq. (9) ---
        D.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        for mb, out in zip(micro, outs):
            if out is None:
                with autocast(), ops.batchnorm_stats_frozen(m):
                    out = forward(mb)
                if outs[0] is None:                                      # for the logs and samples
                    outs[0] = out
            with autocast():
                total, parts = self.eq9(mb, out)
            (total / len(micro)).backward()
        step_optimizer(self.opt_g, world)
        self.last = (micro[0], outs[0])  # for samples()
        # Motion-collapse watch (RESULTS.md): per-frame motion of z_s->d (0: a static source copy)
        # and of z_d; |z_c->d|
        z_sd, z_d, z_cd = (outs[0][n].detach() for n in ("z_sd", "z_d", "z_cd"))
        motion = lambda z: ((z[:, 1:] - z[:, :-1]).abs().mean() if z.shape[1] > 1
                            else z.new_zeros(()))
        return {"loss_d": loss_d, **parts, "dw": motion(z_sd), "dw_drv": motion(z_d),
                "z_cd": z_cd.abs().mean()}

    def loss_terms(self, mb, out):
        """The generator's loss terms, Eq. (3)-(8), each under its printed formula (losses.py has
        the details). A term whose judge was not given (--syncnet, --arcface, --vgg) is None: off,
        said at start-up. -> {term: scalar tensor or None}."""
        x_g, x_d, sn = out["x_g"], mb["frames"], self.syncnet
        terms = {}
        # Eq. (3): L_ortho = (1/N) Σ_c |z_s->c ⊙ z_c->d| per manipulated w vector (the form:
        # --ortho, Table 4; 'none' is its × row)
        terms["ortho"] = None if self.cfg["ortho"] == "none" else losses.orthogonality_loss(
            out["z_sc"], out["z_cd"], self.cfg["ortho"], layers=self.fctfg.fusion.layers)
        # Eq. (4): L_sync = 1 - cos(f_v(x_g), f_a(x_a)), the frozen lip-sync expert on
        # 5-frame windows
        terms["sync"] = None if sn is None or x_g.shape[1] % sn.n_frames else losses.sync_loss(
            sn, x_g, mb["mel"], size=sn.face_hw[1], bgr=sn.input_bgr)
        # Eq. (5): L_id = 1 - cos(E_id(x_g), E_id(x_d))
        terms["id"] = losses.identity_loss(self.e_id, x_g, x_d) if self.e_id is not None else None
        # Eq. (6): L_rec = ||x_g - x_d||_1
        terms["rec"] = self.l_rec(x_g, x_d, mb)
        # Eq. (7): L_LPIPS = Σ_i d(φ_i(x_g), φ_i(x_d)) over VGG19 features
        terms["lpips"] = (losses.perceptual_loss(self.vgg, x_g, x_d) if self.vgg is not None
                          else None)
        # Eq. (8), G side: L_GAN = -log D(x_g)
        terms["gan"] = losses.gan_loss_g(self.d(self._d_batch(x_g)))
        return terms

    def l_rec(self, x_g, x_d, mb):
        """Eq. (6) as printed (a method only so that the tiny recipe's subclass can weigh it)."""
        return losses.reconstruction_loss(x_g, x_d)

    def eq9(self, mb, out):
        """The generator's loss, Eq. (9), with λ_ortho and λ_sync from --ortho_weight/--sync_weight
        (losses.LAMBDA: the paper's). -> (L_total, {term: unweighted value, 'total': value})."""
        # Eq. (9): L_total = λ1 L_ortho + λ2 L_sync + λ3 L_id + λ4 L_rec + λ5 L_LPIPS + λ6 L_GAN
        return losses.total_loss(self.loss_terms(mb, out), {"ortho": self.cfg["ortho_weight"],
                                                            "sync": self.cfg["sync_weight"]})

    @torch.no_grad()
    def samples(self, batch, seed):
        """Rows: source x_s | driving x_d (frame 0) | generated x_g | canonical G(z_s->c) (Fig.
        5)."""
        mb, out = self.last
        n = min(4, mb["frames"].shape[0])
        canon = self.fctfg.canonical(out["z_s"][:n],
                                     [None if d is None else d[:n] for d in out["deltas"]])
        return torch.cat([mb["source"][:n], mb["frames"][:n, 0], out["x_g"][:n, 0].detach(), canon])


# ==== Not in the paper: the tiny recipe's two aids, fenced in a subclass ==========================
class TinyRecipeFCTFGStage(FCTFGStage):
    """The FC-TFG stage with the tiny recipe's aids (tiny-scale deviations, RESULTS.md section 4);
    stage_class picks it only when their weights are set, and both are 0 in the paper preset:
      --feature_weight w: Eq. (6)'s L1 weighs the eyes, brows and mouth pixels 1 + w (the batch's
      "weight" map, data.ClipWindows), so those few pixels are not averaged away;
      --latent_weight w: + w |z_s->d - E_inv(target frames)| beside Eq. (9)
      (losses.latent_reconstruction_loss; without it the motion collapses at tiny scale). The
      target is the code of the TARGET frames, not of the driving input, whose mouth may come from
      another clip (--drive_mouth swap)."""

    def l_rec(self, x_g, x_d, mb):
        """Eq. (6)'s L1, pixel by pixel under the batch's weight map where it has one."""
        return losses.reconstruction_loss(x_g, x_d, mb.get("weight"))

    def eq9(self, mb, out):
        """Eq. (9) + the latent target (parts gains 'latent'; 'total' stays Eq. 9's value)."""
        total, parts = super().eq9(mb, out)
        if not self.cfg["latent_weight"] > 0:
            return total, parts
        m, x_d = self.fctfg, mb["frames"]
        with torch.no_grad():                            # E_inv of x_d frame by frame, [B, T, L, C]
            z_t = out["z_d"] if self.cfg["drive_mouth"] == "own" else \
                m.E_inv(x_d.flatten(0, 1)).unflatten(0, x_d.shape[:2])
        lat = losses.latent_reconstruction_loss(out["z_sd"], z_t.detach(), m.fusion.layers)
        parts["latent"] = float(lat.detach())
        return total + self.cfg["latent_weight"] * lat, parts


# the stages in paper order (Sec. 4.1.2); train.py --stage picks one by name
STAGE_CLASSES = dict(judges=JudgesStage, stylegan2=StyleGAN2Stage, syncnet=SyncNetStage,
                     inversion=InversionStage, fctfg=FCTFGStage)


def stage_class(name, cfg):
    """The class of stage `name` for the settings `cfg`: STAGE_CLASSES[name], or the FC-TFG stage
    with the tiny recipe's aids where their weights are set (never in the paper preset)."""
    aids = name == "fctfg" and (cfg["feature_weight"] > 0 or cfg["latent_weight"] > 0)
    return TinyRecipeFCTFGStage if aids else STAGE_CLASSES[name]
