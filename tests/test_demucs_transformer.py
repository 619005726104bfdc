"""CrossTransformerEncoder against demucs 4.1.0's `demucs.transformer` (a test oracle only).

The oracle needs `demucs` (installed with --no-deps) and `einops`; without them the parity tests
skip and the tests that need no oracle still run.
"""
import inspect
import types
import typing as tp

import numpy as np
import pytest
import torch

from demixlab.errors import DemixError
from demixlab.models.demucs.transformer import (CrossTransformerEncoder, cape_embedding, sin_embedding,
                                                sin_embedding_2d)
from tests.references import import_reference

TOLERANCE = 1e-5

# What HTDemucs passes by default (demucs/htdemucs.py), with a small dim.
HTDEMUCS_DEFAULTS = dict(
    dim=32, emb="sin", hidden_scale=4.0, num_heads=8, num_layers=5, cross_first=False, dropout=0.0,
    max_positions=10000, norm_in=True, norm_in_group=False, group_norm=False, norm_first=True, norm_out=True,
    max_period=10000.0, weight_decay=0.0, lr=None, layer_scale=True, gelu=True, sin_random_shift=0,
    weight_pos_embed=1.0, cape_mean_normalize=True, cape_augment=True, cape_glob_loc_scale=[5000.0, 1.0, 1.4],
    sparse_self_attn=False, sparse_cross_attn=False, mask_type="diag", mask_random_seed=42,
    sparse_attn_window=500, global_window=100, sparsity=0.95, auto_sparsity=False)

CONFIGS = {
    "htdemucs_defaults": HTDEMUCS_DEFAULTS,
    "scaled_crossfirst_postnorm_relu": dict(
        dim=16, emb="scaled", num_heads=4, num_layers=3, cross_first=True, max_positions=64,
        norm_first=False, layer_scale=False, gelu=False, hidden_scale=2.0),
    "cape_groupnorms_normout": dict(
        dim=16, emb="cape", num_heads=4, num_layers=2, norm_in=False, norm_in_group=True, group_norm=True,
        norm_first=True, norm_out=True, layer_scale=True),
    "cape_uncentred_crossfirst_gn2": dict(
        dim=24, emb="cape", num_heads=6, num_layers=2, cross_first=True, cape_mean_normalize=False,
        norm_in=False, norm_in_group=2, group_norm=2, norm_first=True, norm_out=False, layer_scale=True,
        max_period=1000.0, weight_pos_embed=0.5),
    "sin_one_layer_postnorm_gn": dict(
        dim=16, num_heads=2, num_layers=1, norm_in=False, group_norm=2, norm_first=False, hidden_scale=1.5,
        weight_pos_embed=2.0, max_period=500.0),
    "sin_crossfirst_prenorm_odd_heads_relu": dict(
        dim=12, num_heads=3, num_layers=2, cross_first=True, norm_first=True, norm_out=False, layer_scale=False,
        gelu=False),
}


@pytest.fixture(scope="module")
def ref() -> types.ModuleType:
    """The reference module (needs demucs and einops, not torchaudio)."""
    return import_reference("demucs.transformer")


def inputs(dim: int, seed: int = 1) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """A frequency branch (B, C, Fr, T1) and a time branch (B, C, T2) of other lengths."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, dim, 3, 5, generator=generator), torch.randn(2, dim, 7, generator=generator)


def twins(ref: types.ModuleType, options: dict) -> tp.Tuple[torch.nn.Module, CrossTransformerEncoder]:
    """A reference encoder with all its weights perturbed (so that layer scales of 1e-4 and
    unit norms do not hide anything), and ours loaded from its state dict with strict=True."""
    torch.manual_seed(0)
    reference = ref.CrossTransformerEncoder(**options)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    ours = CrossTransformerEncoder(**options)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def max_error(first: tp.Sequence[torch.Tensor], second: tp.Sequence[torch.Tensor]) -> float:
    """Largest absolute difference over pairs of tensors of equal shapes."""
    for a, b in zip(first, second):
        assert a.shape == b.shape and a.dtype == b.dtype
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(first, second))


def reroute_reference_rng(monkeypatch: pytest.MonkeyPatch, ref: types.ModuleType) -> None:
    """Make the reference draw its training-time randomness (Python's `random` for the sin shift,
    NumPy for CAPE) from torch's global RNG, in the calls demixlab makes: a shift range of one
    value draws nothing, and uniforms are float64 `uniform_` on the CPU."""
    def randrange(stop: int) -> int:
        return int(torch.randint(stop, ()).item()) if stop > 1 else 0

    def uniform(low: float, high: float, size: tp.List[int]) -> np.ndarray:
        return torch.empty(size, dtype=torch.float64).uniform_(low, high).numpy()

    monkeypatch.setattr(ref, "random", types.SimpleNamespace(randrange=randrange))
    monkeypatch.setattr(ref, "np", types.SimpleNamespace(
        random=types.SimpleNamespace(uniform=uniform), log=np.log, exp=np.exp))


def test_constructor_signature_matches_reference(ref):
    ours = inspect.signature(CrossTransformerEncoder).parameters
    theirs = inspect.signature(ref.CrossTransformerEncoder).parameters
    assert [(p.name, p.default, p.kind) for p in ours.values()] == \
        [(p.name, p.default, p.kind) for p in theirs.values()]


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_and_initialisation_match_reference(ref, name):
    torch.manual_seed(3)
    reference = ref.CrossTransformerEncoder(**CONFIGS[name])
    torch.manual_seed(3)
    ours = CrossTransformerEncoder(**CONFIGS[name])
    theirs_state, our_state = reference.state_dict(), ours.state_dict()
    assert [(k, v.shape) for k, v in our_state.items()] == [(k, v.shape) for k, v in theirs_state.items()]
    # Same modules created in the same order: the same random initialisation.
    assert all(torch.equal(our_state[key], theirs_state[key]) for key in theirs_state)


@pytest.mark.parametrize("name", CONFIGS)
def test_eval_outputs_match_reference(ref, name):
    options = CONFIGS[name]
    reference, ours = twins(ref, options)
    reference.eval()
    ours.eval()
    x, xt = inputs(options["dim"])
    with torch.no_grad():
        expected, got = reference(x, xt), ours(x, xt)
    assert got[0].shape == x.shape and got[1].shape == xt.shape
    assert max_error(expected, got) < TOLERANCE


def test_gradients_match_reference(ref):
    reference, ours = twins(ref, CONFIGS["htdemucs_defaults"])
    x, xt = inputs(32)
    weights = inputs(32, seed=2)
    for model in (reference, ours):
        out = model(x, xt)
        sum((o * w).sum() for o, w in zip(out, weights)).backward()
    theirs = dict(reference.named_parameters())
    for key, parameter in ours.named_parameters():
        assert parameter.grad is not None, key
        assert (parameter.grad - theirs[key].grad).abs().max() < 1e-4, key


@pytest.mark.parametrize("name", ["htdemucs_defaults", "scaled_crossfirst_postnorm_relu", "cape_groupnorms_normout"])
def test_autocast_matches_reference(ref, name):
    options = CONFIGS[name]
    reference, ours = twins(ref, options)
    reference.eval()
    ours.eval()
    x, xt = inputs(options["dim"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = reference(x, xt), ours(x, xt)
    assert all(torch.isfinite(tensor).all() for tensor in got)
    assert max_error(expected, got) < 1e-3  # the same bfloat16 operations in the same order


TRAINING = {
    "sin_random_shift": dict(dim=16, num_heads=4, num_layers=3, sin_random_shift=4, dropout=0.1,
                             norm_first=True, norm_out=True, layer_scale=True),
    "cape_augment": dict(dim=16, emb="cape", num_heads=4, num_layers=2, dropout=0.1,
                         cape_glob_loc_scale=[30.0, 1.5, 2.0]),
    "cape_no_augment": dict(dim=16, emb="cape", num_heads=4, num_layers=2, dropout=0.1, cape_augment=False),
}


# The reference adds NumPy arrays to tensors in CAPE, which NumPy 2 warns about.
@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")
@pytest.mark.parametrize("name", TRAINING)
def test_training_outputs_match_reference_with_the_same_draws(ref, monkeypatch, name):
    options = TRAINING[name]
    reroute_reference_rng(monkeypatch, ref)
    reference, ours = twins(ref, options)
    reference.train()
    ours.train()
    x, xt = inputs(options["dim"])
    for seed in (4, 5, 6):
        torch.manual_seed(seed)
        expected = reference(x, xt)
        torch.manual_seed(seed)
        got = ours(x, xt)
        assert max_error(expected, got) < TOLERANCE


@pytest.mark.parametrize("name", TRAINING)
def test_randomness_only_in_training(name):
    options = TRAINING[name]
    torch.manual_seed(0)
    model = CrossTransformerEncoder(**{**options, "dropout": 0.0})
    x, xt = inputs(options["dim"])
    with torch.no_grad():
        model.eval()
        first, second = model(x, xt), model(x, xt)
        assert max_error(first, second) == 0
        model.train()
        torch.manual_seed(1)
        draws = [model(x, xt)[1] for _ in range(4)]
        torch.manual_seed(1)
        assert torch.equal(model(x, xt)[1], draws[0])
    random_time_embedding = name != "cape_no_augment"
    assert any(not torch.equal(draws[0], other) for other in draws[1:]) == random_time_embedding


def test_eval_ignores_sin_random_shift():
    torch.manual_seed(0)
    plain = CrossTransformerEncoder(dim=16, num_heads=4, num_layers=2).eval()
    shifted = CrossTransformerEncoder(dim=16, num_heads=4, num_layers=2, sin_random_shift=100).eval()
    shifted.load_state_dict(plain.state_dict())
    x, xt = inputs(16)
    with torch.no_grad():
        assert max_error(plain(x, xt), shifted(x, xt)) == 0


def test_embeddings_match_reference(ref):
    assert torch.equal(sin_embedding(9, 16, shift=3, max_period=300.0),
                       ref.create_sin_embedding(9, 16, shift=3, max_period=300.0))
    assert torch.equal(sin_embedding_2d(24, 5, 7, max_period=1000.0),
                       ref.create_2d_sin_embedding(24, 5, 7, max_period=1000.0))
    for mean_normalize in (True, False):
        theirs = ref.create_sin_embedding_cape(9, 16, 3, mean_normalize=mean_normalize, augment=False)
        ours = cape_embedding(9, 16, 3, mean_normalize=mean_normalize, augment=False)
        assert torch.equal(ours.expand_as(theirs), theirs)


@pytest.mark.parametrize("option", ["sparse_self_attn", "sparse_cross_attn"])
def test_sparse_attention_is_a_clear_error(option):
    with pytest.raises(DemixError, match=option):
        CrossTransformerEncoder(dim=16, num_heads=4, **{option: True})


def test_sparse_settings_alone_are_accepted():
    CrossTransformerEncoder(dim=16, num_heads=4, num_layers=1, mask_type="diag_jmask", mask_random_seed=1,
                            sparse_attn_window=10, global_window=5, auto_sparsity=True, sparsity=0.5)


@pytest.mark.parametrize("options, named", [
    (dict(dim=16, emb="rope"), "emb"),
    (dict(dim=18, num_heads=3), "divisible by 4"),
    (dict(dim=16, num_heads=3), "num_heads"),
    (dict(dim=16, cape_glob_loc_scale=[1.0]), "cape_glob_loc_scale"),
])
def test_invalid_options_are_clear_errors(options, named):
    with pytest.raises(DemixError, match=named):
        CrossTransformerEncoder(**options)


def test_scaled_embedding_rejects_too_many_positions():
    model = CrossTransformerEncoder(dim=16, num_heads=4, num_layers=1, emb="scaled", max_positions=6)
    with pytest.raises(DemixError, match="max_positions=6"):
        model(*inputs(16))


def test_parameter_group():
    model = CrossTransformerEncoder(dim=16, num_heads=4, num_layers=2, lr=3e-4, weight_decay=0.05)
    group = model.parameter_group()
    assert group["lr"] == 3e-4 and group["weight_decay"] == 0.05
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert CrossTransformerEncoder(dim=16, num_heads=4, num_layers=1).parameter_group()["lr"] is None
