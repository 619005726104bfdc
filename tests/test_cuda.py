"""The CUDA code paths, on a machine with a GPU (skipped elsewhere; `bench/gpu_check.sh` runs them):
every family's forward on CUDA against the CPU, optimiser steps of every family under bfloat16 and
float16 autocast (with the gradient scaler), and the solver end to end on CUDA with both."""
import json
import math

import pytest
import torch

from demixlab.models import get_family
from tests.cli import TINY, load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SOURCES = ["drums", "bass", "other", "vocals"]
RATE = 44100
# Small models of every family: seconds on a GPU, the same layers as the recipes.
SMALL_OPTIONS = {
    "umx": {"hidden_size": 32, "nb_layers": 2},
    "xumx": {"hidden_size": 32, "nb_layers": 2},
    "slicq_cdae": {"fbins": 12, "hidden_1": 4, "hidden_2": 4},
    "hdemucs": {"channels": 8, "nfft": 1024, "depth": 4, "dconv_attn": 3, "dconv_lstm": 3},
    "htdemucs": {"channels": 8, "bottom_channels": 16, "t_layers": 2, "t_heads": 4},
    "bs_roformer": {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "segment": 1.0},
    "mel_roformer": {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "segment": 1.0},
}


def _model_and_mixture(family_name: str) -> tuple:
    torch.manual_seed(0)
    family = get_family(family_name)
    model = family.build_model(SOURCES, RATE, 2, SMALL_OPTIONS[family_name])
    length = model.valid_length(RATE)
    mixture = 0.1 * torch.randn(2, 2, length, generator=torch.Generator().manual_seed(1))
    return family, model, mixture


@pytest.fixture
def full_precision():
    """cuDNN convolutions and matmuls in true float32 (no TF32), to compare with the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("family_name", list(SMALL_OPTIONS))
def test_forward_on_cuda_matches_the_cpu(family_name, full_precision):
    _, model, mixture = _model_and_mixture(family_name)
    model.eval()
    with torch.no_grad():
        expected = model(mixture)
        got = model.to("cuda")(mixture.cuda()).cpu()
    assert got.shape == expected.shape
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-4 * max(scale, 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family_name", list(SMALL_OPTIONS))
def test_mixed_precision_steps_on_cuda_update_the_weights(family_name, dtype):
    family, model, mixture = _model_and_mixture(family_name)
    model = model.cuda().train()
    objective = family.objective(model, {})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    sources = 0.1 * torch.randn(2, len(SOURCES), 2, mixture.shape[-1], device="cuda")
    for _ in range(8):  # float16: the scaler skips the steps whose scaled gradients overflow
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            losses = objective(model, sources.sum(1), sources)
        assert math.isfinite(float(losses["loss"].detach()))
        scaler.scale(losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        changed = [name for name, value in model.named_parameters() if not torch.equal(value, before[name])]
        if changed:
            break
    assert changed  # a step was taken (some deep weights may see gradients that underflow to zero)
    assert all(bool(torch.isfinite(value).all()) for value in model.parameters())
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        assert math.isfinite(float(objective(model, sources.sum(1), sources)["loss"]))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_solver_trains_on_cuda_with_amp(in_process, tmp_path, dtype):
    assert in_process(*TINY, "misc.device=cuda", "amp.enabled=true", f"amp.dtype={dtype}", "ema.decays=[0.9]") == 0
    xp, = (tmp_path / "outputs" / "xps").iterdir()
    history = json.loads((xp / "history.json").read_text())
    assert all(math.isfinite(entry["train"]["loss"]) and entry["train"]["peak_memory_gib"] > 0
               for entry in history)
    scaler = load_checkpoint(xp)["grad_scaler"]
    assert (scaler["scale"] > 0) if dtype == "float16" else scaler == {}


def test_chunked_separation_on_cuda_matches_the_cpu(full_precision):
    from demixlab.separation.chunking import apply_model

    _, model, mixture = _model_and_mixture("htdemucs")
    model.eval()
    track = torch.cat([mixture[:1]] * 3, dim=-1)  # three chunks, overlapping
    segment = model.valid_length(RATE)
    with torch.no_grad():
        expected = apply_model(model, track, segment=segment)
        got = apply_model(model.cuda(), track.cuda(), segment=segment)
    assert got.device.type == "cpu"  # accumulated on the host (out_device)
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
