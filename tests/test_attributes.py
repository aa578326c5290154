"""Tests of attributes.py: the motion probe against hand values and the renderer's own labels, and
the attribute-transfer pieces (the correlation score against numpy, the standard error and its
table cell); the whole table through evaluate.py's command line: test_evaluate.py."""
import math

import numpy as np
import pytest
import torch

import attributes
import data
import metrics
import procedural


# ------------------------------------------------------------------------------------ motion probe
def test_attribute_errors_hand_values():
    target = torch.zeros(3, 20, dtype=torch.float64)
    # 4 mouth points
    target[:, 12:] = torch.tensor([0.4, 0.6, 0.6, 0.6, 0.5, 0.55, 0.5, 0.65], dtype=torch.float64)
    pred = target.clone()
    pred[:, 0] += 0.1               # yaw off by 0.1 rad = 5.7296 deg
    pred[:, 5] += 0.4               # one eye's blink off by 0.4 -> mean over both eyes 0.2
    pred[:, 12:] += 0.25            # all mouth points shifted together: LMD 0 (translation removed)
    e = attributes.attribute_errors(pred, target)
    assert e["yaw"] == pytest.approx(0.1 * 180 / math.pi, rel=1e-6)
    assert e["blink"] == pytest.approx(0.2, rel=1e-6)
    assert e["pitch"] == e["roll"] == e["gaze"] == e["mouth_open"] == 0
    assert e["lmd"] == pytest.approx(0, abs=1e-6)


def test_probe_training_lowers_heldout_error_and_roundtrip(probe_ckpt, tmp_path):
    path, ck = probe_ckpt
    # standardised MSE (1.0 = always guessing the mean), untrained net vs after 80 steps: clearly
    # lower on its training frames, and lower on unseen people too (160 frames generalise only a
    # little)
    assert ck["train_mse"] < 0.7 * ck["train_mse_init"], (ck["train_mse"], ck["train_mse_init"])
    assert ck["heldout_mse"] < ck["heldout_mse_init"], (ck["heldout_mse"], ck["heldout_mse_init"])
    assert set(ck["heldout"]) == set(attributes.ATTRIBUTES) | {"lmd"} and all(
        math.isfinite(v) for v in ck["heldout"].values())
    probe, held = attributes.load_probe(str(path))
    assert held == ck["heldout"] and not probe.training
    x, y = attributes.probe_dataset("test", 8, seed=5)
    pred = probe(data.to_unit(x))
    assert pred.shape == (8, 20) and torch.isfinite(pred).all()
    # labels are the renderer's own numbers: motion row + mouth landmarks / 64
    ident = procedural.make_identity(procedural.TEST_IDS[0])
    motion, _ = procedural.make_motion(7, 3)
    xy, _ = procedural.landmarks(ident, motion[1], 64)
    t = attributes.probe_target(ident, motion[1])
    np.testing.assert_allclose(t[:12], motion[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(t[12:].reshape(4, 2) * 64, xy[[9, 10, 11, 12]], rtol=0, atol=1e-4)
    bad = tmp_path / "bad.pt"
    torch.save({"kind": "something else"}, bad)
    with pytest.raises(ValueError, match="motion-probe"):
        attributes.load_probe(str(bad))
    with pytest.raises(FileNotFoundError, match="train-probe"):
        attributes.load_probe(str(tmp_path / "missing.pt"))


# ------------------------------------------------------------------------------ attribute transfer
def test_transfer_correlation_against_numpy_and_hand_cases():
    """Oracle: np.corrcoef of the pooled, per-pixel-centred luminance on the moving pixels, computed
    here from the definition; plus the cases the score exists for: a copy scores 0, the reference 1,
    its photographic negative -1, and a brighter copy of the motion still 1 (correlation, not
    error)."""
    g = torch.Generator().manual_seed(0)
    T, H, W = 8, 6, 5
    ref = torch.full((T, 3, H, W), 100.0)
    ref[:, :, :3, :2] += torch.rand(T, 1, 3, 2, generator=g) * 80  # 6 moving pixels, same in RGB
    gen = ref + torch.randn(T, 3, H, W, generator=g) * 20
    corr, n = attributes.transfer_correlation(gen, ref)
    assert n == 6
    luma = lambda x: (x.double() * torch.tensor(metrics.LUMA, dtype=torch.float64)
                      .view(1, 3, 1, 1)).sum(1).numpy()
    gl, rl = luma(gen)[:, :3, :2], luma(ref)[:, :3, :2]
    # per-pixel centring, then pooled
    gc, rc = (gl - gl.mean(0)).ravel(), (rl - rl.mean(0)).ravel()
    assert corr == pytest.approx(float(np.corrcoef(np.r_[gc, -gc], np.r_[rc, -rc])[0, 1]),
                                 abs=1e-12)
    assert attributes.transfer_correlation(ref, ref)[0] == pytest.approx(1, abs=1e-12)
    assert attributes.transfer_correlation(255 - ref, ref)[0] == pytest.approx(-1, abs=1e-12)
    assert attributes.transfer_correlation(1.5 * ref, ref)[0] == pytest.approx(1, abs=1e-12)
    still = ref[:1].expand(T, -1, -1, -1)
    assert attributes.transfer_correlation(still, ref)[0] == 0                    # a still image
    assert attributes.transfer_correlation(ref, torch.full_like(ref, 7.0)) == (None, 0)  # no motion


def test_attribute_standard_error_over_pairs_and_its_cell():
    """corr_se = sample std / sqrt(n) over the pairs (hand values); the table writes it beside the
    mean."""
    assert attributes._se([0.2, 0.4, 0.9]) == pytest.approx(float(np.std([0.2, 0.4, 0.9], ddof=1))
                                                    / math.sqrt(3))
    assert attributes._se([0.5]) is None and attributes._se([]) is None
    row = {a: {"corr": 0.5, "corr_se": 0.04, "psnr": 20.0, "err": 0.1}
           for a in procedural.ATTRIBUTE_CLIPS}
    table = attributes.format_attribute_table({"model": row})
    assert "0.50 ± 0.04" in table and table.count("±") == len(procedural.ATTRIBUTE_CLIPS)
