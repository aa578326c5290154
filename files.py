"""files.py: every file the project reads or writes goes through here, and every command line.

Not a part of the paper: the plumbing the other modules share, at the bottom of the import graph
(stylegan2_ops -> networks -> losses -> stages -> entry points all import it; it imports none
of them):
  reading     load_checkpoint (torch.load with weights_only=True, one clear error), load_strict
              (every key by name and shape)
  writing     write_atomic (a temporary file renamed onto the target: never half a file), and on top
              of it save_checkpoint, write_text, save_image_grid and plot_losses (pillow only);
              remove_temporaries sweeps what a killed writer left
  commands    ArgumentParser (one-line errors), run_command (a command's body: bad input and
              interruptions in one line each), terminate_as_interrupt (SIGTERM behaves as Ctrl-C)
"""
import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

import torch


# ==== Command lines ==============================================================================

@contextlib.contextmanager
def terminate_as_interrupt():
    """Inside: SIGTERM (kill, a job scheduler) raises KeyboardInterrupt as Ctrl-C does, so the
    writers' cleanup runs (VideoWriter.abort, write_atomic) and the entry point ends with its one
    line instead of vanishing."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ArgumentParser(argparse.ArgumentParser):
    """Every command line of the project: a bad flag or value is reported in ONE line, `prog: error:
    what (--help lists the flags)`, exit status 2, instead of argparse's usage block above the
    message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def one_line(e):
    """An exception as ONE line: its message with the whitespace collapsed (torch's own messages
    span several), the file name of an OSError added where the message lacks it, at most 400
    characters."""
    where = (f" ({e.filename})" if isinstance(e, OSError) and e.filename
             and str(e.filename) not in str(e) else "")
    msg = " ".join(f"{e}{where}".split())
    return msg if len(msg) <= 400 else msg[:400] + " ..."


def run_command(body, interrupted="interrupted"):
    """Every entry point's main(): body() under terminate_as_interrupt -> the exit status: body's
    own (None: 0); bad input or a file problem (ValueError, OSError, ImportError of an optional
    package) -> `error: ...` in one line on stderr, status 2 (as ArgumentParser's errors); Ctrl-C
    or SIGTERM -> `error: ` + `interrupted` (say what was kept), status 130."""
    try:
        with terminate_as_interrupt():
            status = body()
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
    return status or 0


# ==== Reading ====================================================================================

def load_checkpoint(path, what="checkpoint"):
    """torch.load with weights_only=True (tensors, dicts, lists, numbers, strings only), and one
    clear FileNotFoundError / ValueError for a missing or unreadable file. rosinality training
    checkpoints pickle their argparse Namespace under `args`; we allow-list exactly that class (it
    holds plain values) and nothing else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    # unpickling/zip errors come in many types; report them as one clear error
    except Exception as e:
        raise ValueError(f"{path}: not a loadable {what} ({type(e).__name__}: {e})") from None


def load_strict(module, sd, what, may_lack=("num_batches_tracked",)):
    """module.load_state_dict(sd) where every key must match by name and shape, with one ValueError
    that names the offending keys. Keys ending in an entry of `may_lack` may be absent (BatchNorm's
    num_batches_tracked counters: missing from files of old PyTorch versions and published key
    lists, Wav2Lip#247; unused in eval mode); they keep the module's own value. -> module."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith(tuple(may_lack))]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{what}: checkpoint does not match the network: {len(missing)} missing "
                         f"keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
                         f"{len(wrong)} shape mismatches {wrong[:5]}")
    module.load_state_dict({k: sd.get(k, own[k]) for k in own}, strict=True)
    return module


# ==== Writing: atomically, or not at all ==========================================================

def temp_path(path):
    """A temporary name beside `path` with the same suffix (writers that pick the format
    from it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def remove_temporaries(folder, stem="*"):
    """Delete what a writer killed mid-write (kill -9, power loss) left in `folder`: temp_path's
    names, .<stem>.tmp<pid><suffix>, for `stem` or any. The next run of the same job calls it before
    writing."""
    for tmp in Path(folder).glob(f".{stem}.tmp*"):
        if tmp.is_file() and re.fullmatch(r"\..+\.tmp\d+(\.[^.]+)?", tmp.name):
            tmp.unlink()


def write_atomic(path, write):
    """write(temporary path) then rename it onto `path`: readers, and a run killed mid-write, see
    the old file or the new one, never half of one. The temporary file is removed if write()
    fails."""
    tmp = temp_path(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path, obj):
    """torch.save, atomically (write_atomic); load_checkpoint reads it back."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_text(path, text):
    """A text file (a table, a log, a JSON record), atomically (write_atomic)."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def save_image_grid(images, path, nrow=None):
    """Save [N, 3, H, W] images in [-1, 1] as one PNG grid, written atomically."""
    from PIL import Image
    import numpy as np
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    N, _, H, W = x.shape
    nrow = nrow or math.ceil(math.sqrt(N))
    ncol = math.ceil(N / nrow)
    grid = torch.zeros(3, ncol * H, nrow * W, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = x[i]
    grid = np.ascontiguousarray(grid.permute(1, 2, 0).numpy())
    write_atomic(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


def plot_losses(log_path, png_path, smooth=10, panel=(320, 170)):
    """Loss curves of a log.jsonl as one PNG (pillow only): a panel per logged quantity, raw values
    in grey, a `smooth`-point running mean in colour, y range 1st..99th percentile (a spike does not
    flatten it). -> the number of panels (0: nothing to plot, no file)"""
    from PIL import Image, ImageDraw
    import numpy as np
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    keys = [k for k in (rows[0] if rows else {})
            if k not in ("step", "time", "img_per_s", "peak_mem_gb")]
    if not keys:
        return 0
    (W, H), ncol = panel, min(3, len(keys))
    img = Image.new("RGB", (W * ncol, H * math.ceil(len(keys) / ncol)), "white")
    draw = ImageDraw.Draw(img)
    for i, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        ox, oy = (i % ncol) * W, (i // ncol) * H
        draw.rectangle([ox + 40, oy + 18, ox + W - 8, oy + H - 20], outline=(180, 180, 180))
        if len(pts) < 2:
            draw.text((ox + 44, oy + 3), f"{key}: {len(pts)} point(s)", fill="black")
            continue
        steps, vals = (np.array(c, float) for c in zip(*pts))
        mean = np.convolve(vals, np.ones(min(smooth, len(vals))) / min(smooth, len(vals)),
                           mode="valid")
        lo, hi = np.percentile(vals, [1, 99])
        hi = hi if hi > lo else lo + 1e-8
        fx = lambda s: ox + 40 + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (W - 48)
        fy = lambda v: oy + H - 20 - (np.clip(v, lo, hi) - lo) / (hi - lo) * (H - 38)
        draw.line([(fx(s), fy(v)) for s, v in zip(steps, vals)], fill=(200, 200, 200))
        draw.line([(fx(s), fy(v)) for s, v in zip(steps[len(steps) - len(mean):], mean)],
                  fill=(20, 90, 200), width=2)
        draw.text((ox + 44, oy + 3), f"{key}: {mean[0]:.4g} -> {mean[-1]:.4g}", fill="black")
        # y range, step range
        for (x, y), label in (((2, 18), f"{hi:.3g}"), ((2, H - 30), f"{lo:.3g}"),
                              ((40, H - 16), f"step {int(steps[0])}"),
                              ((W - 70, H - 16), f"{int(steps[-1])}")):
            draw.text((ox + x, oy + y), label, fill=(90, 90, 90))
    write_atomic(png_path, lambda tmp: img.save(tmp, format="PNG"))
    return len(keys)
