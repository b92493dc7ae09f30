"""The denoisers: shapes, errors, a little learning, and ONNX export parity (tiny models, 32 px)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffinspect import DiffinspectError
from diffinspect.models import build_model, check_image_size, describe
from diffinspect.vocab import ModelKind

KINDS = list(ModelKind.values())


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: on a shared 2-core machine, intra-op threads spin against the other jobs
    # and made a training step 40x slower than on one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(n: int = 3, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.tensor([0.0, 250.5, 999.0][:n])


@pytest.mark.parametrize("kind", KINDS)
def test_forward_shape_attributes_and_describe(kind: str) -> None:
    model = build_model(kind, "tiny", 32, 3)
    assert (model.kind, model.size, model.image_size, model.channels) == (kind, "tiny", 32, 3)
    x, t = _batch()
    assert model(x, t).shape == x.shape
    gray = build_model(kind, "tiny", 48, 1)
    assert gray(torch.zeros(2, 1, 48, 48), torch.zeros(2)).shape == (2, 1, 48, 48)
    info = describe(model, 32, 3)
    assert 50_000 < info["params"] < 300_000 and 0 < info["gflops"] < 1


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_holds_weights_only(kind: str) -> None:
    a, b = build_model(kind, "tiny", 32, 3), build_model(kind, "tiny", 32, 3)
    state = a.state_dict()
    assert not any(k.endswith(("freqs", "pos_embed")) for k in state)  # derived, rebuilt on load
    b.load_state_dict(state)
    x, t = _batch()
    with torch.no_grad():
        assert torch.equal(a(x, t), b(x, t))


def test_unet_features_skip_the_decoder() -> None:
    model = build_model("unet", "tiny", 32, 3)
    called = []
    model.conv_out.register_forward_hook(lambda *_: called.append(1))
    feats = model.features(*_batch())
    assert [f.shape[-1] for f in feats] == [16, 8, 4] and not called
    assert all(f.shape[0] == 3 and f.ndim == 4 for f in feats)


def test_dit_features_are_token_maps() -> None:
    model = build_model("dit", "tiny", 32, 3)
    feats = model.features(*_batch())
    assert 2 <= len(feats) <= 3
    assert all(f.shape == (3, 64, 16, 16) for f in feats)  # width 64, patch 2


def test_patch_size_and_image_multiples() -> None:
    assert build_model("dit", "tiny", 32, 3).patch == 2
    assert build_model("dit", "tiny", 64, 3).patch == 4
    check_image_size("unet", "small", 72)
    check_image_size("unet", "small", 256)
    check_image_size("dit", "small", 96)
    fits = r"image size 70 does not fit the unet: use a multiple of 8 \(e\.g\. 64 or 72\)"
    with pytest.raises(DiffinspectError, match=fits):
        check_image_size("unet", "small", 70)
    with pytest.raises(DiffinspectError, match="multiple of 16"):
        check_image_size("unet", "small", 200)  # above 128 px the U-Net downsamples once more
    with pytest.raises(DiffinspectError, match="does not fit the dit: use a multiple of 8"):
        check_image_size("dit", "small", 100)
    with pytest.raises(DiffinspectError, match="too small"):
        check_image_size("unet", "tiny", 8)


def test_unknown_kind_or_size() -> None:
    with pytest.raises(DiffinspectError, match="unet, dit"):
        build_model("vae", "tiny", 32, 3)
    with pytest.raises(DiffinspectError, match="tiny, small, base"):
        build_model("unet", "huge", 32, 3)
    with pytest.raises(DiffinspectError, match="at least 1 image channel"):
        build_model("dit", "tiny", 32, 0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_few_steps_lower_the_denoising_loss(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(kind, "tiny", 32, 3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 1, 1, generator=g).expand(4, 3, 32, 32) * 2 - 1  # flat colours: easy to learn
    eps = torch.randn(4, 3, 32, 32, generator=g)
    t = torch.linspace(100, 900, 4)
    ab = (1 - torch.linspace(1e-4, 0.02, 1000)).cumprod(0)[t.long()].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    losses = []
    for _ in range(10):
        loss = F.mse_loss(model(xt, t), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")  # torch exporter chatter
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_export_matches_torch(kind: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    ov = pytest.importorskip("openvino")
    torch.manual_seed(0)
    model = build_model(kind, "tiny", 32, 3).eval()
    with torch.no_grad():  # move the zero-initialized layers off zero, or parity is trivially true
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "model.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        model,
        _batch(2),
        str(path),
        dynamo=True,
        external_data=False,
        input_names=["x", "t"],
        output_names=["eps"],
        dynamic_shapes={"x": {0: batch}, "t": {0: batch}},
        verbose=False,
    )
    x, t = _batch(3)  # another batch size than the one exported with
    with torch.no_grad():
        ref = model(x, t).numpy()
    feeds = {"x": x.numpy(), "t": t.numpy()}
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-3
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert np.abs(compiled([feeds["x"], feeds["t"]])[0] - ref).max() < 1e-3
