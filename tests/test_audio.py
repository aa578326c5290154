"""Tests for audio.py. Oracles: hand-derived Slaney mel values, librosa (test-only, skipped if
absent), scipy (lfilter pre-emphasis, analytic tones), regression values computed offline with
librosa (+ reflect padding, as librosa 0.7 which Wav2Lip pins), published Wav2Lip key layouts
written out independently below, float64 gradcheck."""
import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import chirp, lfilter

import audio

SR = 16000


@pytest.fixture(autouse=True)
def one_thread():
    """The networks here are small; on a shared, oversubscribed 2-core box one intra-op thread was
    ~15x faster than two (threads spin-wait for each other). Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tone(freq, n, sr=SR, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def vowel(n, f0=120.0, formants=(700, 1200, 2600), seed=0):
    """Speech-like test signal: a glottal pulse train through three formant resonators + a little
    noise."""
    rng = np.random.default_rng(seed)
    x = np.zeros(n)
    x[:: int(SR / f0)] = 1.0
    for f in formants:  # two-pole resonator with 80 Hz bandwidth at each formant
        r = math.exp(-math.pi * 80 / SR)
        x = lfilter([1.0], [1, -2 * r * math.cos(2 * math.pi * f / SR), r * r], x)
    x = x / np.abs(x).max() * 0.6 + 0.01 * rng.standard_normal(n)
    return x


# --------------------------------------------------------------------------------------------------
# mel scale and filterbank
# --------------------------------------------------------------------------------------------------
def test_slaney_mel_scale_hand_values():
    # Hand-derived: linear part 3 mel per 200 Hz; 1 kHz = 15 mel; above, 27 mel per factor 6.4.
    assert audio.hz_to_mel(200.0) == pytest.approx(3.0)
    assert audio.hz_to_mel(1000.0) == pytest.approx(15.0)
    assert audio.hz_to_mel(6400.0) == pytest.approx(42.0)
    assert audio.hz_to_mel(55.0) == pytest.approx(0.825)
    assert audio.mel_to_hz(42.0) == pytest.approx(6400.0)
    f = np.array([0.0, 55.0, 999.0, 1000.0, 1001.0, 7600.0])
    np.testing.assert_allclose(audio.mel_to_hz(audio.hz_to_mel(f)), f, rtol=1e-12, atol=1e-9)


def test_filterbank_hand_values():
    fb = audio.mel_filterbank()
    assert fb.shape == (80, 401) and fb.dtype == np.float32
    # librosa's values: filter 0 lives on bins 3..6 (60..120 Hz), peak 0.02081245; filter 79 on
    # 353..379
    np.testing.assert_array_equal(np.nonzero(fb[0])[0], [3, 4, 5, 6])
    assert fb[0].max() == pytest.approx(0.02081245, abs=1e-8)
    nz = np.nonzero(fb[79])[0]
    assert (nz[0], nz[-1]) == (353, 379)
    # Slaney normalisation: each triangle has unit area in Hz -> sum of weights * bin width ~ 1
    area = fb.sum(1) * (SR / 800)
    # wide bands: sampling of the triangle is fine
    np.testing.assert_allclose(area[40:], 1.0, atol=0.02)
    with pytest.raises(ValueError, match="fmax"):
        audio.mel_filterbank(16000, 800, 80, 55, 9000)


def test_filterbank_vs_librosa():
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    np.testing.assert_allclose(audio.mel_filterbank(), ref, rtol=0, atol=1e-6)
    ref2 = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=40, fmin=0, fmax=11025)
    np.testing.assert_allclose(audio.mel_filterbank(22050, 1024, 40, 0.0, 11025.0), ref2, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# mel spectrogram
# --------------------------------------------------------------------------------------------------
def test_reflect_indices_match_numpy_pad():
    for n, pad in [(2, 5), (3, 1), (5, 13), (401, 400), (1000, 400)]:
        x = np.arange(n)
        np.testing.assert_array_equal(x[audio.reflect_indices(n, pad)],
                                      np.pad(x, pad, mode="reflect"))


def test_mel_spec_regression_vectors():
    # Values computed offline with librosa + reflect padding, independent of this code.
    t = np.arange(16000) / 16000
    a = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    m = audio.melspectrogram(a)
    assert m.shape == (80, 81) and m.dtype == np.float32
    assert m.mean() == pytest.approx(-3.500328, abs=2e-6)
    assert m.max() == pytest.approx(2.020512, abs=2e-6)
    for (i, j), v in {(0, 0): -0.844186, (10, 40): 1.989764, (20, 0): -0.884267,
                      (79, 80): -1.468158}.items():
        assert m[i, j] == pytest.approx(v, abs=2e-6), (i, j)
    assert m[:, 40].argmax() == 10
    b = (0.5 * chirp(t, f0=100, t1=1, f1=7000, method="linear")).astype(np.float32)
    m = audio.melspectrogram(b)
    assert m.mean() == pytest.approx(-3.373635, abs=2e-6) and m.std() == pytest.approx(1.576005,
                                                                                       abs=2e-6)
    assert m[0, 0] == pytest.approx(-0.156701, abs=2e-6) and m[79, 80] == pytest.approx(1.493521,
                                                                                        abs=2e-6)
    assert [int(m[:, c].argmax()) for c in (10, 40, 70)] == [24, 59, 74]


def _librosa_wav2lip_mel(x):
    """The Wav2Lip recipe written with librosa + scipy (its audio.py structure), float64."""
    librosa = pytest.importorskip("librosa")
    y = lfilter([1, -0.97], [1], x)
    D = librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800, center=True,
                     pad_mode="reflect")
    S = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600) @ np.abs(D)
    S = 20 * np.log10(np.maximum(1e-5, S)) - 20
    return np.clip(8 * (S + 100) / 100 - 4, -4, 4)


@pytest.mark.parametrize("kind", ["vowel", "chirp", "noise", "silence", "odd_length"])
def test_mel_spec_vs_librosa(kind):
    n = 16000
    rng = np.random.default_rng(1)
    x = {"vowel": lambda: vowel(n),
         "chirp": lambda: 0.5 * chirp(np.arange(n) / SR, 60, 1, 7900),
         "noise": lambda: 0.3 * rng.standard_normal(n),
         "silence": lambda: np.zeros(n),
         "odd_length": lambda: vowel(12345, f0=210, formants=(300, 2300, 3000))}[kind]()
    ref = _librosa_wav2lip_mel(x)
    ours = audio.melspectrogram(x)
    assert ours.shape == ref.shape == (80, 1 + len(x) // 200)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    if kind == "silence":
        assert np.all(ours == audio.SILENCE)


@pytest.mark.parametrize("n", [2, 199, 200, 201, 399, 401, 12345])
def test_mel_spec_shape_formula(n):
    x = np.random.default_rng(n).standard_normal(n) * 0.1
    m = audio.melspectrogram(x)
    assert m.shape == (80, 1 + n // 200) == (80, audio.n_mel_columns(n))
    assert m.min() >= -4 and m.max() <= 4


def test_torch_mel_matches_numpy_batched():
    xs = np.stack([vowel(8000), 0.3 * np.random.default_rng(2).standard_normal(8000),
                   np.zeros(8000)])
    ref = np.stack([audio.melspectrogram(x) for x in xs])
    out64 = audio.melspectrogram_torch(torch.from_numpy(xs))
    assert out64.shape == (3, 80, 41) and out64.dtype == torch.float64
    np.testing.assert_allclose(out64.numpy(), ref, atol=1e-6)
    out32 = audio.melspectrogram_torch(torch.from_numpy(xs).float())
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, atol=2e-3)  # float32 STFT near the dB floor
    np.testing.assert_allclose(audio.melspectrogram_torch(torch.from_numpy(xs[0])).numpy(), ref[0],
                               atol=1e-6)


def test_torch_mel_gradient_is_finite():
    x = torch.from_numpy(vowel(2000)).requires_grad_(True)
    audio.melspectrogram_torch(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_mel_spec_bad_input():
    with pytest.raises(ValueError, match="dims"):
        audio.melspectrogram(np.zeros((2, 100)))
    with pytest.raises(ValueError, match="at least 2"):
        audio.melspectrogram(np.zeros(1))
    with pytest.raises(ValueError, match="NaN"):
        audio.melspectrogram(np.array([0.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match="floating"):
        audio.melspectrogram_torch(torch.zeros(100, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# mel windows
# --------------------------------------------------------------------------------------------------
def test_window_starts_hand_values():
    # floor(3.2 k), Wav2Lip
    np.testing.assert_array_equal(audio.window_starts(8, 25), [0, 3, 6, 9, 12, 16, 19, 22])
    # 30 fps: 80/30 = 2.667 columns per frame -> floor(8k/3)
    np.testing.assert_array_equal(audio.window_starts(7, 30), [0, 2, 5, 8, 10, 13, 16])
    assert audio.window_starts(251, 25)[250] == 800  # frame 250 = 10.0 s = column 800 exactly


@pytest.mark.parametrize("fps", [25, 30])
def test_mel_windows_first_middle_last(fps):
    T = 81                                                  # 1 s of audio
    mel = np.arange(80 * T, dtype=np.float32).reshape(80, T)
    n_frames = fps                                          # 1 s of video
    w = audio.mel_windows(mel, n_frames, fps=fps)
    assert w.shape == (n_frames, 1, 80, 16)
    np.testing.assert_array_equal(w[0, 0], mel[:, 0:16])    # first frame
    k, s = {25: (12, 38), 30: (15, 40)}[fps]            # middle frame, hand-computed floor(80k/fps)
    np.testing.assert_array_equal(w[k, 0], mel[:, s:s + 16])
    last = math.floor(80 * (n_frames - 1) / fps)          # last frame runs past column 80 -> padded
    valid = T - last
    np.testing.assert_array_equal(w[-1, 0, :, :valid], mel[:, last:])
    assert np.all(w[-1, 0, :, valid:] == audio.SILENCE)
    # frames far beyond the audio: all silence, no index error
    w = audio.mel_windows(mel, 3 * n_frames, fps=fps)
    assert np.all(w[-1] == audio.SILENCE)


def test_mel_windows_torch_equals_numpy_and_errors():
    mel = np.random.default_rng(0).standard_normal((80, 50)).astype(np.float32)
    wt = audio.mel_windows(torch.from_numpy(mel), 20, fps=25)
    assert torch.is_tensor(wt)
    np.testing.assert_array_equal(wt.numpy(), audio.mel_windows(mel, 20, fps=25))
    with pytest.raises(ValueError, match="mel must be"):
        audio.mel_windows(mel.T, 5)
    with pytest.raises(ValueError, match="n_frames"):
        audio.mel_windows(mel, 0)
    with pytest.raises(ValueError, match="fps"):
        audio.mel_windows(mel, 5, fps=0)


# --------------------------------------------------------------------------------------------------
# load_audio
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sr_in", [44100, 48000, 8000, 16000])
def test_load_audio_resamples_to_16k(tmp_path, sr_in):
    dur, f = 0.5, 440.0
    n = int(sr_in * dur)
    path = tmp_path / "a.wav"
    sf.write(path, tone(f, n, sr=sr_in), sr_in, subtype="FLOAT")
    x = audio.load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1 and len(x) == int(SR * dur)
    # oracle: the analytic tone at 16 kHz; ignore the filter's edge transients (first/last 20 ms)
    ref = tone(f, len(x))
    np.testing.assert_allclose(x[320:-320], ref[320:-320], atol=2e-3)


def test_load_audio_stereo_int16_flac(tmp_path):
    n = 4410
    stereo = np.stack([tone(300, n, 44100), tone(1000, n, 44100, amp=0.25)], axis=1)
    path = tmp_path / "s.flac"
    sf.write(path, stereo, 44100, subtype="PCM_16")
    x = audio.load_audio(path)
    ref = (tone(300, 1600) + tone(1000, 1600, amp=0.25)) / 2    # channel mean, at 16 kHz
    assert len(x) == 1600
    np.testing.assert_allclose(x[100:-100], ref[100:-100], atol=2e-3)


def test_load_audio_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        audio.load_audio(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        audio.load_audio(empty)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + os.urandom(500))
    with pytest.raises(ValueError, match="corrupt.wav"):
        audio.load_audio(corrupt)
    no_samples = tmp_path / "zero.wav"
    sf.write(no_samples, np.zeros(0, np.float32), SR)
    with pytest.raises(ValueError, match="no samples"):
        audio.load_audio(no_samples)


def test_load_audio_silence_warns(tmp_path):
    path = tmp_path / "quiet.wav"
    sf.write(path, np.zeros(1600, np.float32), SR)
    with pytest.warns(UserWarning, match="silent"):
        x = audio.load_audio(path)
    assert len(x) == 1600 and not x.any()


def _write_with_pyav(av, path, x, sr, codec, layout="mono"):
    """Encode a float mono/stereo signal [channels, n] with PyAV."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=sr, layout=layout)
        fmt = "s16" if codec == "pcm_s16le" else "fltp"
        data = (np.round(x * 32767).astype(np.int16).T.reshape(1, -1) if fmt == "s16"
                else x.astype(np.float32))
        frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def test_pyav_path_bitexact_on_pcm(tmp_path):
    av = pytest.importorskip("av")
    x = np.stack([tone(500, 3000, 16000), tone(900, 3000, 16000, amp=0.3)])
    path = tmp_path / "pcm.wav"
    _write_with_pyav(av, path, x, 16000, "pcm_s16le", layout="stereo")
    via_av, rate = audio._read_with_pyav(str(path), "n/a")
    via_sf, rate_sf = sf.read(path, dtype="float32", always_2d=True)
    assert rate == rate_sf == 16000
    np.testing.assert_array_equal(via_av, via_sf)


def test_load_audio_m4a_through_pyav(tmp_path):
    av = pytest.importorskip("av")
    sr_in, n = 44100, 44100
    path = tmp_path / "clip.m4a"
    _write_with_pyav(av, path, np.stack([tone(440, n, sr_in)] * 2), sr_in, "aac", layout="stereo")
    x = audio.load_audio(path)
    # AAC adds encoder priming/padding (a few thousand samples at most); the tone must survive
    assert abs(len(x) - SR) < 2048 * SR / sr_in + 1
    spec = np.abs(np.fft.rfft(x[2000:14000] * np.hanning(12000)))
    assert abs(np.argmax(spec) * SR / 12000 - 440) < 3
    assert 0.3 < np.abs(x[4000:12000]).max() < 0.7


# --------------------------------------------------------------------------------------------------
# networks: published layouts written out independently of audio.py
# --------------------------------------------------------------------------------------------------
# (cin, cout, kh, kw) per block index, read off Wav2Lip's models/ (wav2lip.py, syncnet.py).
W2L_AUDIO = [(1, 32, 3, 3), (32, 32, 3, 3), (32, 32, 3, 3), (32, 64, 3, 3), (64, 64, 3, 3),
             (64, 64, 3, 3), (64, 128, 3, 3), (128, 128, 3, 3), (128, 128, 3, 3), (128, 256, 3, 3),
             (256, 256, 3, 3), (256, 512, 3, 3), (512, 512, 1, 1)]
SYNC_AUDIO = W2L_AUDIO[:11] + [(256, 256, 3, 3)] + W2L_AUDIO[11:]
SYNC_FACE = [(15, 32, 7, 7), (32, 64, 5, 5), (64, 64, 3, 3), (64, 64, 3, 3), (64, 128, 3, 3)] + \
            [(128, 128, 3, 3)] * 3 + [(128, 256, 3, 3), (256, 256, 3, 3), (256, 256, 3, 3),
                                      (256, 512, 3, 3), (512, 512, 3, 3), (512, 512, 3, 3),
                                      (512, 512, 3, 3), (512, 512, 3, 3), (512, 512, 1, 1)]


def published_state_dict(prefix, layout, gen, counters=True):
    sd = {}
    for i, (cin, cout, kh, kw) in enumerate(layout):
        p = f"{prefix}.{i}.conv_block."
        sd[p + "0.weight"] = torch.randn(cout, cin, kh, kw, generator=gen) * 0.05
        sd[p + "0.bias"] = torch.randn(cout, generator=gen) * 0.05
        sd[p + "1.weight"] = 1 + 0.1 * torch.randn(cout, generator=gen)
        sd[p + "1.bias"] = 0.1 * torch.randn(cout, generator=gen)
        sd[p + "1.running_mean"] = 0.1 * torch.randn(cout, generator=gen)
        sd[p + "1.running_var"] = 0.5 + torch.rand(cout, generator=gen)
        if counters:
            sd[p + "1.num_batches_tracked"] = torch.tensor(1000)
    return sd


def save_wav2lip_ckpt(path, sd):
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": None,
                "global_step": 0, "global_epoch": 0}, path)


def test_paper_sizes_match_published_counts():
    enc = audio.AudioEncoder(**audio.AUDIO_ENCODER_PRESETS["paper"])
    assert sum(p.numel() for p in enc.parameters()) == 2_812_672  # Wav2Lip's audio_encoder, counted
    net = audio.SyncNet(**audio.PRESETS["paper"])
    assert sum(p.numel() for p in net.parameters()) == 16_435_072
    sd = net.state_dict()
    assert len(sd) == 217 and next(iter(sd)) == "face_encoder.0.conv_block.0.weight"
    assert sd["face_encoder.0.conv_block.0.weight"].shape == (32, 15, 7, 7)


def test_load_syncnet_from_published_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {**published_state_dict("face_encoder", SYNC_FACE, g),
          **published_state_dict("audio_encoder", SYNC_AUDIO, g)}
    assert len(sd) == 217
    path = tmp_path / "lipsync_expert.pth"
    save_wav2lip_ckpt(path, sd)
    net = audio.load_syncnet(path)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    mel, face = torch.randn(2, 1, 80, 16), torch.rand(2, 15, 48, 96)
    p = net.sync_probability(mel, face)
    assert p.shape == (2,) and (p >= 0).all() and (p <= 1).all()
    # a file without the BatchNorm counters (Wav2Lip#247) also loads
    torch.save({k: v for k, v in sd.items() if "num_batches" not in k}, tmp_path / "bare.pth")
    audio.load_syncnet(tmp_path / "bare.pth")


def test_load_expert_knows_its_colour_order_and_sync_loss_feeds_it(tmp_path):
    """A published Wav2Lip expert (random weights, the published key layout) is read as BGR, our own
    syncnet-stage checkpoint as RGB; L_sync (Eq. 4) on RGB frames with a BGR expert equals L_sync of
    the channel-reversed frames with bgr off (oracle: the flip written out here)."""
    import losses
    g = torch.Generator().manual_seed(0)
    sd = {**published_state_dict("face_encoder", SYNC_FACE, g),
          **published_state_dict("audio_encoder", SYNC_AUDIO, g)}
    save_wav2lip_ckpt(tmp_path / "lipsync_expert.pth", sd)
    w2l = audio.load_expert(tmp_path / "lipsync_expert.pth", "paper")
    assert w2l.input_bgr and not w2l.training and not any(p.requires_grad for p in w2l.parameters())
    for k, v in w2l.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    torch.manual_seed(0)
    ours = audio.SyncNet(**audio.PRESETS["tiny"])
    torch.save({"stage": "syncnet", "cfg": {"model": "tiny"}, "syncnet": ours.state_dict()},
               tmp_path / "ours.pt")
    mine = audio.load_expert(tmp_path / "ours.pt", "paper")        # its own preset wins
    assert mine.input_bgr is False and mine.face_hw == (32, 64)
    x_g = torch.rand(2, 5, 3, 96, 96) * 2 - 1
    mel = torch.randn(2, 5, 1, 80, 16)
    a = losses.sync_loss(w2l.double(), x_g.double(), mel.double(), size=96, bgr=True)
    b = losses.sync_loss(w2l.double(), x_g.double().flip(2), mel.double(), size=96, bgr=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.allclose(a, losses.sync_loss(w2l.double(), x_g.double(), mel.double(), size=96,
                                                  bgr=False))


def test_load_audio_encoder_from_generator_ckpt(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = published_state_dict("audio_encoder", W2L_AUDIO, g)
    # ignored parts
    other = {"face_encoder_blocks.0.0.conv_block.0.weight": torch.randn(16, 6, 7, 7),
             "output_block.1.weight": torch.randn(3, 32, 1, 1)}
    path = tmp_path / "wav2lip.pth"
    save_wav2lip_ckpt(path, {**sd, **other})
    enc = audio.load_audio_encoder(path)
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, sd["audio_encoder." + k], rtol=0, atol=0)
    enc.eval()
    assert enc(torch.randn(3, 1, 80, 16)).shape == (3, 512)


def test_loaders_report_problems(tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = published_state_dict("audio_encoder", W2L_AUDIO, g)
    bad = dict(sd)
    del bad["audio_encoder.12.conv_block.0.bias"]                                 # missing
    bad["audio_encoder.3.conv_block.0.weight"] = torch.randn(64, 32, 5, 5)          # wrong shape
    bad["audio_encoder.13.conv_block.0.weight"] = torch.randn(1)                    # unexpected
    save_wav2lip_ckpt(tmp_path / "bad.pth", bad)
    with pytest.raises(ValueError) as e:
        audio.load_audio_encoder(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "12.conv_block.0.bias" in msg and "3.conv_block.0.weight" in msg and "13.conv_block" in msg
    save_wav2lip_ckpt(tmp_path / "expert_only.pth",
                      published_state_dict("face_encoder", SYNC_FACE, g))
    with pytest.raises(ValueError, match="audio_encoder"):
        audio.load_audio_encoder(tmp_path / "expert_only.pth")
    save_wav2lip_ckpt(tmp_path / "gen.pth", sd)  # a generator checkpoint is not an expert
    with pytest.raises(ValueError, match="missing"):
        audio.load_syncnet(tmp_path / "gen.pth")
    with pytest.raises(FileNotFoundError):
        audio.load_syncnet(tmp_path / "nope.pth")
    # junk of many shapes: the unpickler fails with RuntimeError, EOFError, IndexError, KeyError,
    # ... depending on the bytes; every one must come out as the same clear error
    for seed in range(200):
        (tmp_path / "junk.pth").write_bytes(np.random.default_rng(seed).bytes(300))
        with pytest.raises(ValueError, match="cannot read"):
            audio.load_syncnet(tmp_path / "junk.pth")


def test_residual_block_is_conv_bn_plus_input_relu():
    # naive oracle written with functional ops
    blk = audio.ConvBlock(4, 4, 3, 1, 1, residual=True).double().eval()
    with torch.no_grad():
        blk.conv_block[1].running_mean.normal_()
        blk.conv_block[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    conv, bn = blk.conv_block
    y = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(blk(x), torch.relu(y + x))
    with pytest.raises(ValueError, match="residual"):
        audio.ConvBlock(4, 8, 3, residual=True)


def test_tiny_preset_shapes_and_wrong_input():
    net = audio.SyncNet(**audio.PRESETS["tiny"])
    mel, face = torch.randn(4, 1, 80, 16), torch.rand(4, 15, 32, 64)
    a, v = net(mel, face)
    assert a.shape == v.shape == (4, 128)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(4))
    assert sum(p.numel() for p in net.parameters()) < 1_500_000  # trains on CPU
    enc = audio.AudioEncoder(**audio.AUDIO_ENCODER_PRESETS["tiny"])
    assert enc(mel).shape == (4, 128)
    with pytest.raises(ValueError, match="FaceEncoder expects"):
        net.embed_face(torch.rand(4, 15, 48, 96))
    with pytest.raises(ValueError, match="AudioEncoder expects"):
        enc(torch.randn(4, 80, 16))
    with pytest.raises(ValueError, match="square"):
        audio.FaceEncoder(face_hw=(40, 64), channels=(8, 8, 8), n_res=(0, 0))


def test_expert_window_layout_and_gradient():
    frames = torch.rand(2, 5, 3, 8, 6) * 2 - 1          # [B, T, 3, H, W] in [-1, 1]
    w = audio.expert_window(frames, bgr=True)
    assert w.shape == (2, 15, 4, 6)
    # channel 3*t + c is frame t, BGR channel c, lower rows 4..7, mapped to [0, 1] (naive loop
    # oracle)
    for t in range(5):
        for c in range(3):
            torch.testing.assert_close(w[:, 3 * t + c], (frames[:, t, 2 - c, 4:] + 1) / 2)
    assert audio.expert_window(torch.zeros(1, 5, 3, 64, 64), size=96).shape == (1, 15, 48, 96)


def test_sync_gradient_reaches_face_and_gradcheck():
    torch.manual_seed(0)
    net = audio.SyncNet(**audio.PRESETS["tiny"]).double().eval()
    mel = torch.randn(2, 1, 80, 16, dtype=torch.float64)
    frames = (torch.rand(2, 5, 3, 64, 64, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    loss = (1 - net.cosine(mel, audio.expert_window(frames))).mean()   # Eq. (4)
    loss.backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0
    assert frames.grad[:, :, :, :32].abs().max() == 0  # upper half is cropped away: no gradient
    # gradcheck of L_sync w.r.t. a small patch of the mouth region (all other pixels fixed)
    base = frames.detach().clone()

    def f(patch):
        x = base.clone()
        x[0, 2, :, 40:42, 30:32] = patch
        return 1 - net.cosine(mel, audio.expert_window(x))

    patch = base[0, 2, :, 40:42, 30:32].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (patch,), eps=1e-6, atol=1e-5)


def test_audio_encoder_gradcheck_small():
    torch.manual_seed(0)
    enc = audio.AudioEncoder(channels=(2, 2, 3, 3, 4), n_res=(1, 1, 1, 1)).double().eval()
    with torch.no_grad():
        # lift BN biases so ReLUs are active (avoid a dead, zero-gradient net)
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.fill_(0.5)
    mel = torch.randn(1, 1, 80, 16, dtype=torch.float64)
    base = mel.clone()

    def f(piece):
        x = base.clone()
        x[0, 0, 30:33, 5:7] = piece
        return enc(x)

    piece = base[0, 0, 30:33, 5:7].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (piece,), eps=1e-6, atol=1e-5)


def test_expert_bce_and_sync_prob_range():
    p = torch.tensor([1.0, 0.0, 0.5])
    y = torch.tensor([1.0, 0.0, 1.0])
    assert audio.loss_expert_bce(p, y).item() == pytest.approx(-math.log(0.5) / 3, rel=1e-4)
    assert torch.isfinite(audio.loss_expert_bce(torch.tensor([0.0]), torch.tensor([1.0])))


def _toy_sync_batch(n):
    """Toy sync task: the mouth brightness follows the loudness of the audio window. y=1: matching
    pair; y=0: the face comes from a clip whose loudness differs by at least 0.3."""
    loud = torch.rand(n)
    mel = (loud[:, None, None, None] * 8 - 4).expand(n, 1, 80, 16) + 0.1 * torch.randn(n, 1, 80, 16)
    y = (torch.rand(n) < 0.5).float()
    bright = torch.where(y.bool(), loud, (loud + 0.3 + 0.4 * torch.rand(n)) % 1.0)
    face = bright[:, None, None, None].expand(n, 15, 32, 64) + 0.05 * torch.randn(n, 15, 32, 64)
    return mel, face, y


def test_tiny_expert_learns_a_toy_sync_task(one_thread):
    """Property: the tiny expert trained with its BCE separates synced from unsynced pairs on CPU in
    seconds; held-out loss falls far below chance (ln 2 = 0.693). ~15 s on one core."""
    torch.manual_seed(123)
    held_out = _toy_sync_batch(64)
    torch.manual_seed(0)
    net = audio.SyncNet(**audio.PRESETS["tiny"])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(40):
        mel, face, y = _toy_sync_batch(16)
        loss = audio.loss_expert_bce(net.cosine(mel, face), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        held = audio.loss_expert_bce(net.cosine(*held_out[:2]), held_out[2]).item()
    assert held < 0.3, held


def test_expert_nce_loss_hand_values_and_gradient():
    """Two orthogonal matched pairs: logits diag 1/t, off-diagonal 0, so each row's CE is
    log(1 + e^{-1/t}); swapping the faces makes the diagonal the mismatch and the loss larger."""
    a = torch.eye(2, 4, dtype=torch.float64)
    t = 0.1
    expect = math.log(1 + math.exp(-1 / t))
    assert float(audio.loss_expert_nce(a, a.clone(), t)) == pytest.approx(expect, rel=1e-12)
    assert float(audio.loss_expert_nce(a, a.flip(0), t)) == pytest.approx(
        math.log(1 + math.exp(1 / t)), rel=1e-12)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    unit = lambda u: torch.nn.functional.normalize(u, dim=1)
    assert torch.autograd.gradcheck(lambda p, q: audio.loss_expert_nce(unit(p), unit(q)), (x, y))
    one = audio.loss_expert_nce(unit(x[:1]), unit(y[:1]))
    assert float(one.detach()) == 0 and one.requires_grad      # no negatives: zero, graph kept
    with pytest.raises(ValueError, match="both be"):
        audio.loss_expert_nce(a, a[:, :3])
