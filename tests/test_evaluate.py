"""End-to-end evaluation with fake detectors on synthetic folders, plus baselines and corruptions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from diffinspect import DiffinspectError
from diffinspect.data.image import Preprocess
from diffinspect.evaluation import evaluate as ev
from diffinspect.evaluation.baselines import EmbeddingBaseline, PixelBaseline
from diffinspect.evaluation.corruptions import CORRUPTIONS, corrupt
from diffinspect.scoring.detector import Scored
from diffinspect.scoring.threshold import conformal_threshold

SIZE = 64


def _texture(rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.normal(100, 8, (SIZE, SIZE)), 0, 255).astype(np.uint8)


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def make_mvtec(root: Path, n_train: int = 30, n_good: int = 8, n_bad: int = 5) -> Path:
    """An MVTec-layout category: noise textures; defects are 8x8 bright or dark squares with masks."""
    rng = np.random.default_rng(1)
    cat = root / "tiles"
    for i in range(n_train):
        _write(cat / "train" / "good" / f"{i:03d}.png", _texture(rng))
    for i in range(n_good):
        _write(cat / "test" / "good" / f"{i:03d}.png", _texture(rng))
    for defect, value in (("bright", 255), ("dark", 0)):
        for i in range(n_bad):
            img = _texture(rng)
            mask = np.zeros_like(img)
            # Even corners: at half resolution a square covers whole map pixels, so the fake map is exact.
            y, x = (int(v) * 2 for v in rng.integers(0, (SIZE - 8) // 2, 2))
            img[y:y + 8, x:x + 8] = value
            mask[y:y + 8, x:x + 8] = 255
            _write(cat / "test" / defect / f"{i:03d}.png", img)
            _write(cat / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return cat


class MeanDiffDetector:
    """A fake diffusion detector: per-pixel z-score against the mean good image at 32 px."""

    name = "diffusion"
    backend = "fake:cpu"
    pixel_threshold = 4.0

    def __init__(self, good: list[np.ndarray]) -> None:
        self.preprocess = Preprocess(color="gray", image_size=32)
        x = np.stack([self.preprocess.fit(f)[..., 0] for f in good]).astype(np.float32)
        self.mean, self.std = x.mean(0), x.std(0) + 1.0
        self.calibration_n = len(good)
        self.false_reject_rate = 0.1
        self.threshold = conformal_threshold(self.score(good).scores, self.false_reject_rate)

    def score(self, frames: list[np.ndarray]) -> Scored:
        x = np.stack([self.preprocess.fit(f)[..., 0] for f in frames]).astype(np.float32)
        maps = np.abs(x - self.mean) / self.std
        return Scored(scores=maps.reshape(len(frames), -1).max(1).astype(np.float64), maps=maps)


class StatsCopod:
    """A fake COPOD fallback: no maps, a tiny embedding, distance to the good embeddings' mean."""

    name = "copod"
    backend = "copod"
    pixel_threshold = None

    def __init__(self, good: list[np.ndarray]) -> None:
        self.preprocess = Preprocess(color="gray", image_size=32)
        e = self.embed(good)
        self.mu, self.sd = e.mean(0), e.std(0) + 1e-6
        self.threshold = float(np.quantile(self.score(good).scores, 0.95))

    def embed(self, frames: list[np.ndarray]) -> np.ndarray:
        return np.array([[f.mean(), f.std(), f.min(), f.max(), np.percentile(f, 1), np.percentile(f, 99)]
                         for f in frames], dtype=np.float32)

    def score(self, frames: list[np.ndarray]) -> Scored:
        return Scored(scores=np.abs((self.embed(frames) - self.mu) / self.sd).max(1), maps=None)


def _good_frames(cat: Path) -> list[np.ndarray]:
    paths = sorted((cat / "train" / "good").glob("*.png"))
    return [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)[..., None] for p in paths]


@pytest.mark.slow
def test_evaluate_end_to_end_with_fake_detectors(tmp_path: Path) -> None:
    cat = make_mvtec(tmp_path / "data")
    good = _good_frames(cat)
    dets = {"diffinspect": MeanDiffDetector(good), "copod_fallback": StatsCopod(good)}
    out = tmp_path / "report"
    torch_before = "torch" in sys.modules
    report = ev.evaluate([], [cat], out, detectors=dets, gallery_size=3)
    assert torch_before or "torch" not in sys.modules  # the evaluation runs on the edge install

    for name in ("report.json", "summary.md", "report.html"):
        assert (out / name).is_file()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["datasets"].keys() == report["datasets"].keys() == {"tiles"}
    rows = on_disk["datasets"]["tiles"]
    expected = {"diffinspect", "copod_fallback", "iforest_pixels", "ocsvm_pixels", "copod_pixels",
                "iforest_embed", "ocsvm_embed", "copod_embed"}
    assert set(rows) == expected

    d = rows["diffinspect"]
    # The squares are 19 sigma from the texture: every figure shows perfect separation.
    assert d["image_auroc"] == pytest.approx(1.0)
    assert d["image_ap"] == pytest.approx(1.0)
    assert d["pixel_auroc"] == pytest.approx(1.0)
    assert d["aupro"] == pytest.approx(1.0)
    assert d["miss_rate"] == 0.0 and d["recall"] == 1.0
    assert d["false_reject_rate"] is not None and d["latency_ms"] > 0
    assert set(d["per_defect"]) == {"bright", "dark"}
    assert d["per_defect"]["dark"]["image_auroc"] == pytest.approx(1.0)
    assert d["per_defect"]["dark"]["aupro"] == pytest.approx(1.0)
    assert "10 good images" in d["calibration"] or "30 good images" in d["calibration"]

    c = rows["copod_fallback"]
    assert c["pixel_auroc"] is None and c["aupro"] is None  # no maps: undefined, not zero
    assert c["image_auroc"] == pytest.approx(1.0)
    for name in expected - {"diffinspect", "copod_fallback"}:
        assert rows[name]["kind"] == "baseline" and rows[name]["threshold"] is not None
        assert rows[name]["calibration"]
    assert on_disk["summary"]["image_auroc"]["diffinspect"]["tiles"] == pytest.approx(1.0)

    md = (out / "summary.md").read_text()
    assert "| diffinspect | 1.000 |" in md

    html = (out / "report.html").read_text()
    assert not re.search(r"https?://", html)
    assert not re.search(r"<(script|link)\b", html)
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) >= 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "F1-max (test-tuned)" in html and "split-conformal" in html
    # The fake's in-sample threshold rejects good tiles: the false-reject gallery shows them.
    assert d["false_reject_rate"] > 0 and html.count("<figure>") >= 1


def test_robustness_and_baselines_only_run(tmp_path: Path) -> None:
    cat = make_mvtec(tmp_path / "data", n_train=24, n_good=4, n_bad=3)
    seen: dict[str, list[tuple[int, int | None]]] = {}
    report = ev.evaluate([], [cat], tmp_path / "r", baselines=("iforest_pixels",), robustness=True,
                         progress=lambda task, done, total: seen.setdefault(task, []).append((done, total)))
    # every step shows from its start and ends complete: fitting (of unknown length), then each scoring pass
    assert seen.pop("tiles: fitting 1 baseline(s)") == [(0, None), (1, 1)]
    assert "tiles" in seen and len(seen) == 1 + len(ev.CORRUPTIONS) * len(ev.SEVERITIES)
    for calls in seen.values():
        assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] == calls[0][1] > 0
    row = report["datasets"]["tiles"]["iforest_pixels"]
    assert set(row["robustness"]) == set(CORRUPTIONS)
    assert set(row["robustness"]["blur"]) == {"1", "2", "3"}
    assert {"image_auroc", "false_reject_rate"} <= set(row["robustness"]["jpeg"]["2"])
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Robustness" in html


def test_undecodable_test_images_are_skipped_and_named(tmp_path: Path, caplog) -> None:
    cat = make_mvtec(tmp_path / "data", n_train=24, n_good=4, n_bad=3)
    (cat / "test" / "good" / "000.png").write_bytes(b"not a png")
    (cat / "test" / "dark" / "001.png").write_bytes(b"")
    with caplog.at_level("WARNING", logger="diffinspect"):
        report = ev.evaluate([], [cat], tmp_path / "r", baselines=("iforest_pixels",))
    assert "undecodable test images" in caplog.text
    row = report["datasets"]["tiles"]["iforest_pixels"]
    assert (row["n_images"], row["n_good"], row["n_defective"]) == (8, 3, 5)
    assert any("skipped 2 undecodable test images" in n and "000.png" in n for n in report["notes"])


@pytest.mark.slow
def test_one_class_on_digits(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    from diffinspect.scoring.features import embed_frames

    digits = load_digits()
    root = tmp_path / "digits"
    counts: dict[int, int] = {}
    for img, target in zip(digits.images, digits.target, strict=True):
        if counts.get(int(target), 0) >= 80:
            continue
        counts[int(target)] = counts.get(int(target), 0) + 1
        big = cv2.resize((img * 255 / 16).astype(np.uint8), (32, 32), interpolation=cv2.INTER_LINEAR)
        _write(root / str(target) / f"{counts[int(target)]:03d}.png", big)
    report = ev.evaluate([], [root], tmp_path / "r", one_class="0",
                         embedder=lambda frames: embed_frames(frames, size=32))
    rows = report["datasets"]["digits[0]"]
    assert len(rows) == 6
    for name in ("iforest_pixels", "ocsvm_pixels", "copod_pixels"):
        assert rows[name]["image_auroc"] > 0.8, (name, rows[name]["image_auroc"])
    assert rows["copod_embed"]["image_auroc"] > 0.7
    assert rows["iforest_pixels"]["n_good"] == 40 and rows["iforest_pixels"]["n_defective"] == 9 * 80
    assert set(rows["ocsvm_pixels"]["per_defect"]) == {str(d) for d in range(1, 10)}
    assert any("one-class protocol" in n for n in report["notes"])


def test_uncalibrated_bundle_error_is_not_swallowed(trained_bundle: Path, tmp_path: Path) -> None:
    """A real bundle that was trained but never calibrated: evaluate says so, naming the fix."""
    cat = make_mvtec(tmp_path / "data", n_train=4, n_good=2, n_bad=1)
    with pytest.raises(DiffinspectError, match=r"never calibrated: run `inspect calibrate"):
        ev.evaluate([trained_bundle], [cat], tmp_path / "r")
    assert not (tmp_path / "r" / "report.html").exists()


def test_dataset_errors(tmp_path: Path) -> None:
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DiffinspectError, match="test/"):
        ev.evaluate([], [tmp_path / "cat"], tmp_path / "r")
    (tmp_path / "plain" / "scratch").mkdir(parents=True)
    with pytest.raises(DiffinspectError, match="good/"):
        ev.evaluate([], [tmp_path / "plain"], tmp_path / "r")
    with pytest.raises(DiffinspectError, match="class '7' not found"):
        ev.evaluate([], [tmp_path / "plain"], tmp_path / "r", one_class="7")


def test_mask_on_map_follows_letterbox_and_crop() -> None:
    mask = np.zeros((2, 4), bool)
    mask[:, 2:] = True  # right half of a wide frame
    amap = np.arange(16, dtype=np.float32).reshape(4, 4)
    part, m = ev.mask_on_map(mask, amap, Preprocess(image_size=4, resize="pad"))
    # Letterboxed: the frame fills map rows 1..2; the padding rows are not evaluated.
    assert part.shape == m.shape == (2, 4)
    assert np.array_equal(part, amap[1:3])
    assert m[:, 2:].all() and not m[:, :2].any()
    part, m = ev.mask_on_map(mask, amap, Preprocess(image_size=4, resize="crop"))
    # Centre crop keeps frame columns 1..2: left one good, right one defective.
    assert part.shape == m.shape == (4, 4)
    assert m[:, 2:].all() and not m[:, :2].any()


def test_baselines_contract() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (60, 8))
    test = np.vstack([rng.normal(0, 1, (20, 8)), rng.normal(4, 1, (20, 8))])
    for kind in ("iforest", "ocsvm", "copod"):
        bl = EmbeddingBaseline(kind, alpha=0.1).fit(train)
        s = bl.decision_function(test)
        assert s.shape == (40,)
        assert s[20:].mean() > s[:20].mean()  # higher = more anomalous
        assert bl.threshold_ is not None and bl.calibration_n >= 12
    # COPOD scores one row at a time: a frame's score does not depend on its batch.
    bl = EmbeddingBaseline("copod").fit(train)
    assert bl.decision_function(test[:1])[0] == pytest.approx(bl.decision_function(test)[0])
    frames = [rng.integers(0, 255, (40, 30, 3), dtype=np.uint8) for _ in range(12)]
    px = PixelBaseline("iforest", size=16, n_components=50, alpha=0.2).fit(frames)
    assert px.pca_.n_components_ <= 12 and px.decision_function(frames[:3]).shape == (3,)
    with pytest.raises(DiffinspectError, match="unknown baseline"):
        ev.evaluate([], [Path("nowhere")], Path("r"), baselines=("lof",))


def test_copod_baseline_agrees_with_pyod(monkeypatch, tmp_path) -> None:
    # The baseline runs the runtime's COPOD; its scores are PyOD's COPOD fitted on the same rows and
    # asked one row at a time (skewed features keep PyOD's skewness sign, which includes the new row).
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path))  # pyod imports matplotlib, which caches under $HOME
    copod = pytest.importorskip("pyod.models.copod")
    rng = np.random.default_rng(3)
    train = rng.lognormal(0.0, 1.0, (80, 10))
    test = rng.lognormal(0.0, 1.3, (8, 10))
    bl = EmbeddingBaseline("copod", alpha=0.1, seed=5).fit(train)
    fit_idx, _ = EmbeddingBaseline("copod", alpha=0.1, seed=5)._split(len(train))
    ref = copod.COPOD().fit(train[fit_idx])
    expected = [ref.decision_function(row[None])[0] for row in test]
    np.testing.assert_allclose(bl.decision_function(test), expected, rtol=1e-9)


def test_copod_baseline_needs_no_pyod(tmp_path) -> None:
    # The edge install has no PyOD (it pulls numba and llvmlite); the COPOD baseline must not need it.
    code = ("import sys; sys.modules['pyod'] = None\n"
            "import numpy as np\n"
            "from diffinspect.evaluation.baselines import EmbeddingBaseline\n"
            "x = np.random.default_rng(0).normal(size=(40, 4))\n"
            "print(EmbeddingBaseline('copod').fit(x).decision_function(x[:2]).shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MPLCONFIGDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2,)"


def test_corruptions_keep_shape_and_dtype() -> None:
    rng = np.random.default_rng(0)
    for shape in ((24, 32, 1), (24, 32, 3)):
        img = rng.integers(40, 200, shape, dtype=np.uint8)
        for kind in CORRUPTIONS:
            worse = [np.abs(corrupt(img, kind, s, np.random.default_rng(1)).astype(int) - img).mean()
                     for s in (1, 2, 3)]
            out = corrupt(img, kind, 2, np.random.default_rng(1))
            assert out.shape == img.shape and out.dtype == np.uint8
            assert worse[2] > 0, kind
    with pytest.raises(DiffinspectError):
        corrupt(img, "fog", 1, rng)


class WorseDetector(MeanDiffDetector):
    """Calibrated at 5 % (the baselines' default rate) and scoring defects lowest: any baseline beats it."""

    def __init__(self, good: list[np.ndarray]) -> None:
        super().__init__(good)
        self.false_reject_rate = 0.05

    def score(self, frames: list[np.ndarray]) -> Scored:
        return Scored(-super().score(frames).scores, None)


def test_report_gives_counts_names_the_rate_source_and_flags_a_winning_baseline(tmp_path: Path) -> None:
    cat = make_mvtec(tmp_path / "data")
    dets = {"diffinspect": WorseDetector(_good_frames(cat))}
    report = ev.evaluate([], [cat], tmp_path / "r", baselines=("copod_pixels",), detectors=dets,
                         gallery_size=0)
    row = report["datasets"]["tiles"]["diffinspect"]
    assert row["misses"] == round(row["miss_rate"] * row["n_defective"])
    assert row["false_rejects"] == round(row["false_reject_rate"] * row["n_good"])
    notes = report["notes"]
    # 5 % came from the detector, even though it equals the default.
    assert any("0.05 (the detector's target)" in n for n in notes), notes
    assert any("copod_pixels" in n and "beats diffinspect" in n for n in notes), notes
    md = (tmp_path / "r" / "summary.md").read_text()
    assert f"({row['misses']} of {row['n_defective']})" in md


def test_report_json_gives_each_image_its_p_value_the_guarantee_and_the_suspects(line_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """A cold-start bundle calibrated on good images and four defective ones: report.json lists every test
    image's verdict with its p-value (NG exactly when p <= alpha: the fallback's threshold is split-conformal),
    the guarantee in the bundle's own words, and the calibration images that look defective."""
    import shutil

    from diffinspect.scoring.cold_start import calibrate_copod_only
    from diffinspect.scoring.loader import load_fallback

    good = tmp_path / "good"
    shutil.copytree(line_dir / "train" / "good", good)
    for i, p in enumerate(sorted(good.iterdir())[:4]):  # a dark patch over a third of the part
        img = cv2.imread(str(p))
        img[10:40, 10:40] = 0
        cv2.imwrite(str(good / f"zz{i}.png"), img)
    bundle = tmp_path / "cold"
    calibrate_copod_only(good, bundle, false_reject_rate=0.1)
    report = ev.evaluate([bundle], [line_dir], tmp_path / "r", baselines=(), gallery_size=0)
    on_disk = json.loads((tmp_path / "r" / "report.json").read_text())
    row = on_disk["datasets"]["metal"]["copod_fallback"]
    det = load_fallback(bundle)
    assert row["calibration"] == det.guarantee and "on average over calibration sets" in row["calibration"]
    images = row["images"]
    assert len(images) == row["n_images"] == 44 and all(0 < r["p_value"] <= 1 for r in images)
    assert {r["verdict"] for r in images} == {"ok", "ng"}
    assert all((r["verdict"] == "ng") == (r["p_value"] <= 0.1) for r in images)
    assert sum(r["verdict"] == "ng" and r["defect"] == "good" for r in images) == row["false_rejects"]
    found = on_disk["suspects"][str(bundle.resolve())]
    assert found["suspects"] and all(Path(s["image"]).name.startswith("zz") for s in found["suspects"])
    assert report["suspects"] == on_disk["suspects"]
    html = (tmp_path / "r" / "report.html").read_text()
    assert "on average over calibration sets" in html
