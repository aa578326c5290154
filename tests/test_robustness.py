"""Bad input and faults, as a user meets them: every entry point (infer.py, train.py, evaluate.py,
data.py) run as a real process on real files. Each bad case must end with a non-zero exit and ONE
error line that names the flag or file, no traceback, no output file, no input changed, no temporary
file left. The classes: outputs that would overwrite an input, impossible numbers, damaged or
foreign files, interrupts, leftovers of killed runs, and real clips of another size than the
preset's."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import files
import fusion
import infer
import media
import train

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run(script, *args, cwd, env=ENV, timeout=300):
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def digest(folder):
    """{relative path: sha1} of every file under folder (inputs must come out unchanged, nothing
    may appear)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_one_clean_error(rc, out, err, names):
    assert rc != 0, out + err
    assert "Traceback" not in out + err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    assert names in errors[0], (names, errors[0])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Real files: a source png, a driving mp4 with its speech, a wav, an m4a of exactly 2 s, a
    truncated (half-decodable) mp4, a 16x16 png, an FC-TFG checkpoint (untrained tiny) and one with
    its settings cut."""
    d = tmp_path_factory.mktemp("robust")
    src, frames, wav = infer.procedural_inputs(64, 0.8)
    Image.fromarray(src).save(d / "src.png")
    media.write_video(d / "drive.mp4", np.stack(list(frames)), data.FPS, wav)
    media.write_wav(d / "speech.wav", wav)
    Image.fromarray(src).resize((16, 16)).save(d / "tiny.png")
    # an m4a of exactly 2 s (32000 samples): AAC pads it to whole 1024-sample frames
    import av
    from fractions import Fraction
    x = (np.sin(np.arange(32000) / 9) * 0.3).astype(np.float32)
    with av.open(str(d / "speech.m4a"), "w", format="mp4") as c:
        st = c.add_stream("aac", rate=16000, layout="mono")
        for i in range(0, len(x), 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[i:i + 1024])[None], format="flt",
                                           layout="mono")
            f.sample_rate, f.pts, f.time_base = 16000, i, Fraction(1, 16000)
            for pkt in st.encode(f):
                c.mux(pkt)
        for pkt in st.encode(None):
            c.mux(pkt)
    # a phone-style mp4 (index at the front) cut in half: the first half still decodes
    noise = np.random.default_rng(0).integers(0, 255, (50, 64, 64, 3)).astype(np.uint8)
    with av.open(str(d / "whole.mp4"), "w", format="mp4", options={"movflags": "faststart"}) as c:
        st = c.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt = 64, 64, "yuv420p"
        for k, img in enumerate(noise):
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts, vf.time_base = k, Fraction(1, 25)
            for pkt in st.encode(vf):
                c.mux(pkt)
        for pkt in st.encode(None):
            c.mux(pkt)
    blob = (d / "whole.mp4").read_bytes()
    (d / "half.mp4").write_bytes(blob[:len(blob) // 2])
    torch.manual_seed(0)
    cfg = dict(train.PRESETS["tiny"], window=5)
    ck = {"stage": "fctfg", "step": 0, "cfg": cfg, "run": {"data": "synthetic"},
          "fctfg": fusion.FCTFG("tiny", window=5).state_dict()}
    torch.save(ck, d / "model.pt")
    torch.save({**ck, "cfg": {"model": "tiny"}}, d / "incomplete.pt")
    torch.save({"stage": "judges", "cfg": cfg}, d / "judges.pt")  # another stage's checkpoint
    for name in ("empty.wav", "empty.png", "empty.mp4"):
        (d / name).write_bytes(b"")
    return d


# ---- class 1: an output that would overwrite an input; class 2: impossible numbers (before
# anything is read) ----
BAD_INFER = [
    (["--driving", "drive.mp4", "--out", "drive.mp4"], "--out drive.mp4 is the --driving file"),
    (["--driving", "drive.mp4", "--audio", "speech.wav", "--out", "./sub/../speech.wav"],
     "is the --audio file"),
    (["--source", "src.png", "--driving", "drive.mp4", "--out", "src.png"], "is the --source file"),
    (["--driving", "drive.mp4", "--sheet", "drive.mp4"], "--sheet drive.mp4 is the --driving file"),
    (["--checkpoint", "model.pt", "--out", "model.pt"], "is the --checkpoint file"),
    (["--window", "-1"], "--window -1"), (["--batch", "0"], "--batch 0"),
    (["--seconds", "nan"], "--seconds nan"),
    (["--seconds", "1e12"], "--seconds"), (["--driving", "drive.mp4", "--fps", "0"], "--fps 0"),
    (["--hyper-steps", "-2"], "--hyper-steps -2"),
    (["--sheet", "s.png", "--sheet-frames", "0"], "--sheet-frames 0"),
    (["--window", "x"], "--window"), (["--deflicker", "-1"], "--deflicker -1"),
    # class 3: a foreign / damaged / empty file
    (["--checkpoint", "incomplete.pt"], "incomplete.pt"),
    (["--checkpoint", "speech.wav"], "speech.wav"), (["--checkpoint", "judges.pt"], "judges.pt"),
    (["--driving", "drive.mp4", "--audio", "empty.wav"], "empty.wav"),
    (["--source", "empty.png"], "empty.png"),
    (["--driving", "empty.mp4"], "empty.mp4"),
    (["--driving", "drive.mp4", "--audio", "src.png"], "src.png"),
]


@pytest.mark.parametrize("argv,names", BAD_INFER, ids=[" ".join(a) for a, _ in BAD_INFER])
def test_infer_refuses_in_one_line_and_touches_nothing(inputs, argv, names):
    (inputs / "sub").mkdir(exist_ok=True)
    before = digest(inputs)
    rc, out, err = run("infer.py", *argv, "--quiet", cwd=inputs)
    assert_one_clean_error(rc, out, err, names)
    assert digest(inputs) == before  # no input changed, no output or temporary file appeared


BAD_TRAIN = [
    (["--batch", "-4"], "--batch -4"), (["--batch", "0"], "--batch 0"),
    (["--max_steps", "0"], "--max_steps 0"),
    (["--lr", "nan"], "--lr nan"), (["--mixing", "1.5"], "--mixing 1.5"),
    (["--batch", "1000000"], "--batch"),
    (["--ckpt_every", "0"], "--ckpt_every 0"), (["--size", "256"], "--size 256"),
    (["--stage", "fctfg", "--init", "run/last.pt"], "--init"),  # --out would replace its own --init
    (["--stage", "fctfg", "--init", "other.pt"], "other.pt"),   # another stage's checkpoint
    (["--stage", "fctfg", "--syncnet", "other.pt"], "other.pt"),
    (["--stage", "inversion", "--vgg", "other.pt"], "other"),
    (["--stage", "inversion", "--arcface", "empty.pt"], "empty.pt"),
]


@pytest.mark.parametrize("argv,names", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_train_refuses_in_one_line_and_touches_nothing(tmp_path, argv, names):
    (tmp_path / "run").mkdir()
    torch.save({"stage": "inversion"}, tmp_path / "run" / "last.pt")
    torch.save({"stage": "syncnet", "cfg": {"model": "tiny"}}, tmp_path / "other.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    before = digest(tmp_path)
    rc, out, err = run("train.py", "--out", "run", *argv, cwd=tmp_path)
    assert_one_clean_error(rc, out, err, names)
    assert digest(tmp_path) == before


BAD_EVALUATE = [
    (["--n_clips", "0"], "--n_clips 0"), (["--clip_frames", "-1"], "--clip_frames -1"),
    (["--chunk", "0"], "--chunk 0"),
    (["--deflicker", "nan"], "--deflicker nan"),
    (["--checkpoint", "model.pt", "--out", "model.pt"], "--out model.pt"),
    (["--train-probe", "--out", "model.pt"], "is not a motion probe"),
    (["--checkpoint", "incomplete.pt", "--out", "e"], "incomplete.pt"),
    (["--checkpoint", "model.pt", "--probe", "judges.pt", "--protocol", "cross"], "judges.pt"),
    (["--checkpoint", "model.pt", "--syncnet", "model.pt"], "model.pt"),
    (["--judges", "model.pt"], "model.pt"),
    (["--data", "."], "--data"), (["--checkpoint", "model.pt", "--data", "src.png"], "src.png"),
]


@pytest.mark.parametrize("argv,names", BAD_EVALUATE, ids=[" ".join(a) for a, _ in BAD_EVALUATE])
def test_evaluate_refuses_in_one_line_and_touches_nothing(inputs, argv, names):
    before = digest(inputs)
    rc, out, err = run("evaluate.py", *(argv if "--out" in argv else [*argv, "--out", "e"]),
                       cwd=inputs)
    assert_one_clean_error(rc, out, err, names)
    assert digest(inputs) == before


def test_data_prepare_refusals(tmp_path):
    (tmp_path / "src").mkdir()
    for argv, names in ((["prepare", "src", "src/out"], "lies inside SRC"),
                        (["prepare", "src", "o", "--size", "0"], "--size 0"),
                        (["preview", "o.mp4", "--frames", "0"], "--frames 0"),
                        (["prepare", "missing", "o"], "missing")):
        rc, out, err = run("data.py", *argv, cwd=tmp_path)
        assert_one_clean_error(rc, out, err, names)
    assert not (tmp_path / "o").exists() and not (tmp_path / "src" / "out").exists()
    # without dlib, prepare says so before it opens the first video (a stand-in module that fails to
    # import)
    (tmp_path / "nodlib").mkdir()
    (tmp_path / "nodlib" / "dlib.py").write_text("raise ImportError('no dlib here')\n")
    env = dict(ENV, PYTHONPATH=str(tmp_path / "nodlib"))
    rc, out, err = run("data.py", "prepare", "src", "o", cwd=tmp_path, env=env)
    assert_one_clean_error(rc, out, err, "dlib")


# ---- class 3: damaged and foreign files
# ----------------------------------------------------------------------------
def _prepared(folder, n=2, size=256, frames=20):
    """A folder as `data.py prepare` writes it (mp4 + wav + JSON per clip), from procedural
    clips."""
    ds = data.SyntheticTalkingFaces("train", n_identities=n, clips_per_identity=1, n_frames=frames,
                                    size=size)
    for i in range(n):
        s = ds[i]
        stem = folder / f"id{i:05d}" / "clip"
        stem.parent.mkdir(parents=True)
        media.write_video(stem.with_suffix(".mp4"),
                          ((s["frames"] + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
                          .numpy(), data.FPS, s["audio"].numpy())
        media.write_wav(stem.with_suffix(".wav"), s["audio"].numpy())
        stem.with_suffix(".json").write_text(json.dumps(dict(status="ok", n_frames=frames,
                                                             identity=f"id{i:05d}")))


def test_train_on_damaged_prepared_folders_and_checkpoints(tmp_path):
    _prepared(tmp_path / "bad")
    # an ok record, an undecodable mp4
    (tmp_path / "bad" / "id00000" / "clip.mp4").write_bytes(b"not a video")
    rc, out, err = run("train.py", "--stage", "stylegan2", "--data", "bad", "--out", "r",
                       "--max_steps", "2", "--batch", "2", cwd=tmp_path)
    assert_one_clean_error(rc, out, err, "clip.mp4")
    _prepared(tmp_path / "listjson")
    (tmp_path / "listjson" / "id00001" / "clip.json").write_text("[1, 2]")
    rc, out, err = run("train.py", "--stage", "stylegan2", "--data", "listjson", "--out", "r2",
                       cwd=tmp_path)
    assert_one_clean_error(rc, out, err, "clip.json")
    (tmp_path / "r3").mkdir()
    (tmp_path / "r3" / "last.pt").write_bytes(b"PK\x03\x04 truncated")  # a checkpoint cut short
    rc, out, err = run("train.py", "--out", "r3", "--resume", cwd=tmp_path)
    assert_one_clean_error(rc, out, err, "r3/last.pt")
    # foreign settings, no weights
    torch.save({"stage": "stylegan2", "step": 1}, tmp_path / "r3" / "last.pt")
    rc, out, err = run("train.py", "--out", "r3", "--resume", "--max_steps", "3", cwd=tmp_path)
    assert_one_clean_error(rc, out, err, "--resume")


# ---- class 5: real clips at 256 px with the 64 px preset
# ---------------------------------------------------------
def test_tiny_preset_trains_on_256px_prepared_clips(tmp_path):
    _prepared(tmp_path / "vox")
    rc, out, err = run("train.py", "--stage", "stylegan2", "--data", "vox", "--out", "r",
                       "--max_steps", "1", "--batch", "2", "--mbstd_group", "2",
                       "--sample_every", "0", cwd=tmp_path)
    assert rc == 0, err
    ds = data.VideoFolderDataset(tmp_path / "vox", n_frames=8, size=64)
    assert ds[0]["frames"].shape == (8, 3, 64, 64)


# ---- class 4: interrupts and the leftovers of killed runs
# ----------------------------------------------------------
def test_resume_clears_stale_temporaries_and_repeated_log_lines(tmp_path):
    small = ["--stage", "syncnet", "--n_identities", "2", "--clips_per_identity", "2",
             "--clip_frames", "8", "--batch", "4", "--log_every", "1", "--sample_every", "0",
             "--ckpt_every", "2"]
    assert train.train([*small, "--out", str(tmp_path), "--max_steps", "2"]) == 0
    (tmp_path / ".last.tmp4242.pt").write_bytes(b"half a checkpoint")  # kill -9 during a save
    # steps logged after the last save
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3}) + "\n" + '{"step": 4, "loss')
    assert train.train([*small, "--out", str(tmp_path), "--max_steps", "4", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_infer_interrupted_leaves_nothing(tmp_path, sig):
    # Ctrl-C as at a terminal: a suite started in the background (`cmd &` in a script) hands its
    # children SIGINT ignored, and Python then rightly keeps it ignored; the child starts with the
    # default again
    sigint_default = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    p = subprocess.Popen([sys.executable, str(ROOT / "infer.py"), "--seconds", "60",
                          "--out", "o.mp4"], cwd=tmp_path,
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=sigint_default)
    deadline = time.time() + 120
    # the writer has opened its file
    while time.time() < deadline and not list(tmp_path.glob(".o.tmp*")):
        time.sleep(0.1)
    time.sleep(0.5)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert (p.returncode == 130 and "Traceback" not in err
            and "interrupted" in err.splitlines()[-1]), err
    assert list(tmp_path.iterdir()) == []


def test_infer_warns_about_half_files_small_sources_and_trims_aac_padding(inputs, tmp_path):
    rc, out, err = run("infer.py", "--driving", "half.mp4", "--audio", "speech.m4a",
                       "--out", tmp_path / "h.mp4", "--no-detect", "--quiet", cwd=inputs)
    assert rc == 0 and "decoding stopped" in err and "half.mp4" in err, err
    rc, out, err = run("infer.py", "--source", "tiny.png", "--driving", "drive.mp4",
                       "--out", tmp_path / "t.mp4", "--no-detect", "--quiet", cwd=inputs)
    assert rc == 0 and "16 px across" in err, err
    rc, out, err = run("infer.py", "--driving", "drive.mp4", "--audio", "speech.m4a",
                       "--out", tmp_path / "m.mp4", "--no-detect", "--quiet", cwd=inputs)
    assert rc == 0 and "(50 frames, 2.00 s" in out, out + err  # 2 s of audio: 50 frames, not 52


def test_crop_of_an_already_cropped_clip_stays_inside_it():
    """A 224 px face crop whose enlarged box exceeds the frame: the crop shrinks to the frame, so
    every output pixel was filmed (no edge-repeated streaks above the head)."""
    frame = np.zeros((1, 224, 224, 3), np.uint8)
    frame[0, :, :, 0] = np.arange(224)[:, None]                               # rows numbered in red
    box = media.fomm_enlarge((16, 16, 208, 208))                              # 230 px
    out, box, shrunk = media.crop_square(frame, box, 224)
    assert shrunk and box == (0, 0, 224, 224) and np.array_equal(out, frame)


def test_remove_temporaries_takes_only_what_writers_leave(tmp_path):
    for name in (".last.tmp123.pt", ".clip.tmp9.mp4", ".results.tmp77.json", ".notes.txt",
                 "keep.tmp1.pt", ".last.tmpX.pt", "last.pt"):
        (tmp_path / name).write_text("x")
    files.remove_temporaries(tmp_path, "clip")
    assert not (tmp_path / ".clip.tmp9.mp4").exists() and (tmp_path / ".last.tmp123.pt").exists()
    files.remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.tmpX.pt", ".notes.txt",
                                                          "keep.tmp1.pt", "last.pt"]
