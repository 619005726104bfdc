"""Band-split RoFormers (bs_roformer, mel_roformer) against two independent implementations:
audio-separator's vendored classes (what the community checkpoints run with) and lucidrains'
PyPI bs-roformer; their objective, options, parameter counts, and the import of MSST checkpoints."""
import logging
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from demixlab.errors import DemixError
from demixlab.models import get_family
from demixlab.models.roformer.model import PAPER_FREQS_PER_BANDS, BSRoformer, MelBandRoformer
from demixlab.spectral.mel import mel_filter_bank
from tests.references import import_reference, import_roformer_reference

RATE = 44100
HOP = 441
SOURCES4 = ["drums", "bass", "other", "vocals"]
SMALL = dict(dim=32, depth=2, heads=2, dim_head=16, attn_dropout=0.0, ff_dropout=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Parity within 1e-5 needs the same rounding in both implementations: with several threads,
    the BLAS may split a product differently when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference(family: str, channels: int, stems: int, **options: tp.Any) -> torch.nn.Module:
    """audio-separator's class, random-initialised (seeded), eval mode."""
    torch.manual_seed(0)
    common = dict(dim=SMALL["dim"], depth=SMALL["depth"], heads=SMALL["heads"], dim_head=SMALL["dim_head"],
                  attn_dropout=0.0, ff_dropout=0.0, stereo=channels == 2, num_stems=stems, time_transformer_depth=1,
                  freq_transformer_depth=1, stft_hop_length=HOP)
    common.update(options)
    if family == "bs_roformer":
        return import_roformer_reference("bs_roformer").BSRoformer(
            freqs_per_bands=tuple(PAPER_FREQS_PER_BANDS), **common).eval()
    return import_roformer_reference("mel_band_roformer").MelBandRoformer(num_bands=60, **common).eval()


def _ours(family: str, sources: tp.Sequence[str], channels: int, state: tp.Mapping[str, torch.Tensor],
          **options: tp.Any) -> torch.nn.Module:
    model = get_family(family).build_model(sources, RATE, channels, {**SMALL, "attention_gates": True, **options})
    model.load_state_dict(state, strict=True)
    return model.eval()


def _audio(channels: int, seconds: float = 3.0, seed: int = 1) -> torch.Tensor:
    frames = int(seconds * RATE) // HOP * HOP  # the references drop a trailing partial hop
    return 0.3 * torch.randn(1, channels, frames, generator=torch.Generator().manual_seed(seed))


def _as_stems(output: torch.Tensor, stems: int) -> torch.Tensor:
    return output.unsqueeze(1) if stems == 1 else output


# (family, channels, sources, reference options, demixlab options)
PARITY = {
    "bs_stereo_1": ("bs_roformer", 2, ["vocals"], {}, {}),
    "bs_mono_4_linear_deep_masks": ("bs_roformer", 1, SOURCES4,
                                    dict(linear_transformer_depth=1, mask_estimator_depth=3, mlp_expansion_factor=2),
                                    dict(linear_transformer_depth=1, mask_hidden_layers=2, mlp_expansion_factor=2)),
    "bs_stereo_4_deeper_transformers": ("bs_roformer", 2, SOURCES4,
                                        dict(time_transformer_depth=2, freq_transformer_depth=2, heads=4, dim_head=8),
                                        dict(time_transformer_depth=2, freq_transformer_depth=2, heads=4, dim_head=8)),
    "mel_stereo_4": ("mel_roformer", 2, SOURCES4, {}, {}),
    "mel_mono_1_deep_masks": ("mel_roformer", 1, ["vocals"], dict(mask_estimator_depth=2), dict(mask_hidden_layers=2)),
    "mel_stereo_1_hop_512": ("mel_roformer", 2, ["vocals"], dict(stft_hop_length=512), dict(stft_hop_length=512)),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_community_weights_load_strictly_and_give_the_same_stems(case):
    family, channels, sources, reference_options, options = PARITY[case]
    # MSST/audio-separator count the mask MLP's depth differently per family (see the importer).
    reference_options = {"mask_estimator_depth": 2 if family == "bs_roformer" else 1, **reference_options}
    reference = _reference(family, channels, len(sources), **reference_options)
    ours = _ours(family, sources, channels, reference.state_dict(), **options)
    hop = options.get("stft_hop_length", HOP)
    mixture = _audio(channels)[..., : _audio(channels).shape[-1] // hop * hop]
    with torch.no_grad():
        expected = _as_stems(reference(mixture), len(sources))
        got = ours(mixture)
    assert got.shape == (1, len(sources), channels, mixture.shape[-1])
    assert (got - expected).abs().max() < 1e-5


def _lucidrains(**options: tp.Any) -> torch.nn.Module:
    """lucidrains' BS-RoFormer reduced to the paper's architecture: one residual stream (no
    hyper-connections) and value residuals switched off (their mixing weights pinned to 0)."""
    BSRoformerReference = import_reference("bs_roformer").BSRoformer
    torch.manual_seed(0)
    model = BSRoformerReference(dim=SMALL["dim"], depth=3, heads=SMALL["heads"], dim_head=SMALL["dim_head"], stereo=True,
                                num_stems=2, time_transformer_depth=1, freq_transformer_depth=1,
                                num_residual_streams=1, stft_hop_length=HOP, **options).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "to_value_residual_mix" in name:
                parameter.fill_(-1e4 if name.endswith("bias") else 0.0)  # sigmoid -> exactly 0: v unchanged
    return model


def lucidrains_state(model: torch.nn.Module) -> tp.Dict[str, torch.Tensor]:
    """lucidrains' keys in the community layout: residual wrappers (`.branch.`) removed, value
    residual mixes (pinned off) dropped."""
    return {key.replace(".branch.", "."): value for key, value in model.state_dict().items()
            if "to_value_residual_mix" not in key}


@pytest.mark.parametrize("zero_dc", [False, True])
def test_the_paper_architecture_matches_lucidrains_bs_roformer(zero_dc):
    reference = _lucidrains(zero_dc=zero_dc)
    ours = _ours("bs_roformer", ["vocals", "other"], 2, lucidrains_state(reference), depth=3, zero_dc=zero_dc)
    mixture = _audio(2)
    with torch.no_grad():
        assert (ours(mixture) - reference(mixture)).abs().max() < 1e-5


def test_attention_gates_are_optional():
    """A model without gates is a gated model whose gates are always open."""
    reference = _reference("bs_roformer", 2, 1)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "to_gates" in name:
                parameter.fill_(1e4 if name.endswith("bias") else 0.0)  # sigmoid -> exactly 1
    state = {key: value for key, value in reference.state_dict().items() if "to_gates" not in key}
    ungated = _ours("bs_roformer", ["vocals"], 2, state, attention_gates=False)
    assert not any("to_gates" in key for key in ungated.state_dict())
    mixture = _audio(2)
    with torch.no_grad():
        assert (ungated(mixture)[:, 0] - reference(mixture)).abs().max() < 1e-5


def test_skip_connections_feed_every_earlier_block_forward():
    torch.manual_seed(0)
    plain = BSRoformer(["vocals"], RATE, 2, **SMALL).eval()
    skipping = BSRoformer(["vocals"], RATE, 2, **SMALL, skip_connection=True).eval()
    skipping.load_state_dict(plain.state_dict())
    mixture = _audio(2, 1.0)
    with torch.no_grad():
        assert (plain(mixture) - skipping(mixture)).abs().max() > 1e-4
        one_block = dict(SMALL, depth=1)
        torch.manual_seed(0)
        single = BSRoformer(["vocals"], RATE, 2, **one_block).eval()
        single_skipping = BSRoformer(["vocals"], RATE, 2, **one_block, skip_connection=True).eval()
        single_skipping.load_state_dict(single.state_dict())
        assert torch.equal(single(mixture), single_skipping(mixture))  # nothing earlier to add


def test_objective_is_the_references_loss():
    reference = _reference("bs_roformer", 2, 4)
    model = _ours("bs_roformer", SOURCES4, 2, reference.state_dict())
    mixture = _audio(2, 2.0)
    references = 0.2 * torch.randn(1, 4, 2, mixture.shape[-1], generator=torch.Generator().manual_seed(5))
    expected = reference(mixture, target=references)
    losses = get_family("bs_roformer").objective(model, {})(model, mixture, references)
    torch.testing.assert_close(losses["loss"], expected, rtol=1e-5, atol=1e-6)
    assert {"loss_time", "loss_stft", "loss_vocals"} <= set(losses)
    weighted = get_family("bs_roformer").objective(model, {"source_weights": {"vocals": 3.0}, "stft_weight": 0.0})
    value = weighted(model, mixture, references)
    per_source = torch.stack([value[f"loss_{name}"] for name in SOURCES4])
    torch.testing.assert_close(value["loss"], (per_source * torch.tensor([1, 1, 1, 3.0])).sum() / 6)


def test_gradients_reach_every_parameter_with_and_without_checkpointing():
    torch.manual_seed(0)
    plain = BSRoformer(["vocals", "other"], RATE, 2, **SMALL)
    checkpointed = BSRoformer(["vocals", "other"], RATE, 2, **SMALL, checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    mixture, references = _audio(2, 1.0), 0.1 * torch.randn(1, 2, 2, _audio(2, 1.0).shape[-1])
    grads = []
    for model in (plain, checkpointed):
        objective = get_family("bs_roformer").objective(model, {})
        objective(model, mixture, references)["loss"].backward()
        grads.append({name: parameter.grad for name, parameter in model.named_parameters()})
    for name, grad in grads[0].items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_keeps_the_spectra_in_float32():
    torch.manual_seed(0)
    model = MelBandRoformer(["vocals"], RATE, 2, **SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = get_family("mel_roformer").objective(model, {})(model, _audio(2, 1.0), 0.1 * torch.randn(1, 1, 2, 44100))
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])


def test_paper_parameter_counts():
    """The paper: 72.2 M (6 blocks) and 93.4 M (12 blocks) for one source, attention 8 x 48 = dim."""
    counts = {depth: sum(p.numel() for p in BSRoformer(["vocals"], RATE, 2, depth=depth, dim_head=48).parameters())
              for depth in (6, 12)}
    assert counts == {6: 72_136_332, 12: 93_402_252}
    config = yaml.safe_load((Path(__file__).parents[1] / "demixlab" / "conf" / "model" / "bs_roformer.yaml").read_text())
    assert config["model"]["dim"] == 384 and config["model"]["dim_head"] == 48 and config["model"]["depth"] == 6
    assert config["model"]["freqs_per_bands"] == PAPER_FREQS_PER_BANDS and sum(PAPER_FREQS_PER_BANDS) == 1025


@pytest.mark.parametrize("samplerate, n_fft, bands", [(44100, 2048, 60), (44100, 4096, 60), (48000, 2048, 60),
                                                     (22050, 1024, 32)])
def test_mel_filter_bank_is_librosas(samplerate, n_fft, bands):
    librosa = pytest.importorskip("librosa")
    np.testing.assert_array_equal(mel_filter_bank(samplerate, n_fft, bands),
                                  librosa.filters.mel(sr=samplerate, n_fft=n_fft, n_mels=bands))


def test_short_chunks_and_wrong_channels():
    torch.manual_seed(0)
    model = BSRoformer(["vocals", "other"], RATE, 2, **SMALL, residual=True).eval()
    with torch.no_grad():
        short = model(torch.randn(1, 2, 100))  # shorter than the STFT window: padded inside, cropped back
        assert short.shape == (1, 2, 2, 100) and torch.isfinite(short).all()
        mixture = _audio(2, 1.0)
        out = model(mixture)
        torch.testing.assert_close(out.sum(dim=1), mixture)  # the residual source completes the mixture
        with pytest.raises(DemixError, match=r"expected a mixture of shape \(batch, 2, time\)"):
            model(torch.randn(1, 1, 4410))


@pytest.mark.parametrize("options, message", [
    ({"freqs_per_bands": [2, 3]}, "model.freqs_per_bands must be positive bin counts adding up to the STFT's 1025"),
    ({"stft_hop_length": 4096}, "model.stft_hop_length <= model.stft_win_length"),
    ({"dim_head": 15}, "model.dim_head even"),
    ({"num_bands": 60}, "model.num_bands is not an option of the 'bs_roformer' family"),
    ({"depth": "deep"}, "model.depth: Value 'deep'"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(DemixError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        get_family("bs_roformer").build_model(["vocals"], RATE, 2, {**SMALL, **options})
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ MSST import
def _write_msst(folder: Path, reference: torch.nn.Module, family: str, stems: int, target: tp.Optional[str],
                instruments: tp.Sequence[str]) -> tp.Tuple[Path, Path]:
    """A checkpoint and a YAML as MSST writes them (tuples tagged !!python/tuple by yaml.dump)."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "model.ckpt"
    torch.save(reference.state_dict(), checkpoint)
    model = dict(dim=SMALL["dim"], depth=SMALL["depth"], stereo=True, num_stems=stems, time_transformer_depth=1,
                 freq_transformer_depth=1, linear_transformer_depth=0, dim_head=SMALL["dim_head"],
                 heads=SMALL["heads"], attn_dropout=0.0, ff_dropout=0.0, flash_attn=True, dim_freqs_in=1025,
                 stft_n_fft=2048, stft_hop_length=HOP, stft_win_length=2048, stft_normalized=False,
                 mask_estimator_depth=2 if family == "bs_roformer" else 1, multi_stft_resolution_loss_weight=1.0,
                 multi_stft_resolutions_window_sizes=(4096, 2048, 1024, 512, 256), multi_stft_hop_size=147,
                 multi_stft_normalized=False)
    if family == "bs_roformer":
        model["freqs_per_bands"] = tuple(PAPER_FREQS_PER_BANDS)
    else:
        model.update(num_bands=60, sample_rate=RATE)
    config = {"audio": {"chunk_size": 88200, "n_fft": 2048, "hop_length": HOP, "num_channels": 2,
                        "sample_rate": RATE},
              "model": model, "training": {"instruments": list(instruments), "target_instrument": target}}
    path = folder / "config.yaml"
    path.write_text(yaml.dump(config))  # the default Dumper: tuples become !!python/tuple
    assert "!!python/tuple" in path.read_text()
    return checkpoint, path


@pytest.mark.parametrize("family", ["bs_roformer", "mel_roformer"])
def test_an_msst_checkpoint_imports_and_separates_like_the_reference(tmp_path, family):
    from demixlab.commands import main as demixlab_main

    reference = _reference(family, 2, 1, mask_estimator_depth=2 if family == "bs_roformer" else 1)
    checkpoint, config = _write_msst(tmp_path / "msst", reference, family, 1, "vocals", ["vocals", "other"])
    demixlab_main(["import", "msst", str(checkpoint), "--config", str(config), "-o", str(tmp_path / "repo"),
                   "-n", "vocals_model", "--complement"])
    package = torch.load(tmp_path / "repo" / "vocals_model.th", weights_only=True)
    assert package["family"] == family and package["sources"] == ["vocals", "other"]
    assert package["segment"] == pytest.approx(2.0) and package["origin"]["format"] == "msst"

    mixture = _audio(2, 2.5)
    track = tmp_path / "song.wav"
    sf.write(track, mixture[0].numpy().T, RATE, subtype="FLOAT")
    demixlab_main(["separate", "--repo", str(tmp_path / "repo"), "-n", "vocals_model", str(track), "-o",
                   str(tmp_path / "out"), "--no-split", "--float32", "--clip-mode", "none", "--no-progress"])
    with torch.no_grad():
        expected = reference(mixture)[0].numpy()
    vocals, _ = sf.read(tmp_path / "out" / "song" / "vocals.wav", dtype="float32", always_2d=True)
    other, _ = sf.read(tmp_path / "out" / "song" / "other.wav", dtype="float32", always_2d=True)
    assert np.abs(vocals.T - expected).max() < 1e-5
    assert np.abs(other.T - (mixture[0].numpy() - expected)).max() < 1e-5


def test_a_multi_stem_checkpoint_keeps_its_instruments(tmp_path):
    from demixlab.release.importing import import_model

    reference = _reference("bs_roformer", 2, 4)
    files = _write_msst(tmp_path, reference, "bs_roformer", 4, None, SOURCES4)
    imported = import_model("msst", files)
    assert imported.sources == SOURCES4 and imported.kwargs["attention_gates"] and not imported.kwargs["residual"]
    model = get_family("bs_roformer").build_model(imported.sources, imported.samplerate, 2, imported.kwargs)
    model.load_state_dict(imported.state)


def test_msst_files_that_do_not_fit_are_one_line_errors(tmp_path):
    from demixlab.release.importing import import_model

    reference = _reference("bs_roformer", 2, 1)
    checkpoint, config = _write_msst(tmp_path, reference, "bs_roformer", 1, "vocals", ["vocals", "other"])
    text = config.read_text()
    deeper = tmp_path / "deeper.yaml"
    deeper.write_text(text.replace("depth: 2\n", "depth: 3\n", 1))
    with pytest.raises(DemixError, match="weights do not fit"):
        from demixlab.release.importing import to_package
        to_package(import_model("msst", [checkpoint, deeper]))
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.yaml"
    evil.write_text(text + f"extra: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(DemixError, match="refusing the YAML tag") as info:
        import_model("msst", [checkpoint, evil])
    assert not marker.exists() and "\n" not in str(info.value)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(text.replace("dim_head:", "window_shape: 3\n  dim_head:", 1))
    with pytest.raises(DemixError, match="model.window_shape is not an option"):
        import_model("msst", [checkpoint, unknown])
    with pytest.raises(DemixError, match="expected one checkpoint"):
        import_model("msst", [checkpoint])
    with pytest.raises(DemixError, match="--complement is not an option"):
        import_model("demucs", [checkpoint], complement=True)


def test_a_mono_file_through_a_stereo_model_gives_mono_stems(tmp_path):
    from demixlab.release.model_file import package_model, save_package
    from demixlab.separation import Separator

    torch.manual_seed(0)
    options = dict(SMALL, segment=1.0)
    model = BSRoformer(["vocals", "other"], RATE, 2, **options)
    (tmp_path / "repo").mkdir()
    save_package(package_model("bs_roformer", options, model.state_dict(), sources=["vocals", "other"],
                               samplerate=RATE, audio_channels=2, segment=1.0), tmp_path / "repo" / "m.th")
    stems = Separator(tmp_path / "repo", "m").separate_tensor(0.1 * torch.randn(1, 30000), 22050)
    assert {name: tuple(stem.shape) for name, stem in stems.items()} == {"vocals": (1, 30000), "other": (1, 30000)}


# ------------------------------------------------------------------------------- training runs
ROFORMER_TINY = ["model.dim=32", "model.depth=1", "model.heads=2", "model.dim_head=16", "ema.decays=[]",
                 "dset.toy.train_tracks=2", "dset.toy.valid_tracks=1", "dset.toy.test_tracks=1",
                 "dset.toy.train_duration=4.0", "dset.toy.eval_duration=3.0", "batch_size=4", "segment=1.0",
                 "test.sdr=false", "misc.num_workers=0"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bs_roformer", "mel_roformer"])
def test_dora_run_trains_the_family_on_the_toy_data(tmp_path, cache_dir, family):
    from tests.cli import dora, load_checkpoint, signature

    args = [f"model={family}", *ROFORMER_TINY, "epochs=3", "samples_per_track=8", "optim.lr=2e-3"]
    dora(tmp_path, cache_dir, *args)
    folder = tmp_path / "outputs" / "xps" / signature(tmp_path, cache_dir, *args)
    history = [entry for entry in load_checkpoint(folder)["history"]]
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    assert {"loss", "loss_time", "loss_stft", "loss_vocals"} <= set(history[0]["train"])
    valid = [entry["valid"] for entry in history]
    assert valid[0]["loss"] > valid[1]["loss"] > valid[2]["loss"]  # it learns
    assert max(entry["nsdr"] for entry in valid[1:]) > valid[0]["nsdr"]
    assert history[0]["train"]["lr"] == pytest.approx(2e-3)  # the step schedule holds it for 116 epochs
    assert "nsdr_vocals" in history[-1]["test"]


@pytest.mark.slow
def test_an_xp_can_start_from_a_model_file(tmp_path, in_process, capsys, caplog):
    """Fine-tuning an imported model: `continue_from=PATH.th` starts from the file's weights."""
    from demixlab.release.model_file import package_model, save_package
    from tests.cli import load_checkpoint

    options = {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16}
    torch.manual_seed(3)
    start = BSRoformer(SOURCES4, RATE, 2, **{**options, "segment": 1.0})
    save_package(package_model("bs_roformer", {**options, "segment": 1.0}, start.state_dict(), sources=SOURCES4,
                               samplerate=RATE, audio_channels=2), tmp_path / "imported.th")
    args = ["model=bs_roformer", *(f"model.{key}={value}" for key, value in options.items()),
            *ROFORMER_TINY[4:], "epochs=1", "samples_per_track=2", "optim.lr=1e-12", "valid.segment=null",
            "continue_from=imported.th"]
    with caplog.at_level(logging.INFO, logger="demixlab"):
        assert in_process(*args) == 0
    assert "initialised from model file imported.th" in caplog.text
    xp, = (tmp_path / "outputs" / "xps").iterdir()
    trained = load_checkpoint(xp)["model"]
    for key, value in start.state_dict().items():
        torch.testing.assert_close(trained[key], value, rtol=0, atol=1e-6)
    assert in_process(*args[:-1], "continue_from=nowhere.th") == 2
    assert "nowhere.th: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, sig, digest", [
    (["model=bs_roformer"], "7e4c5938", "cc77f3ad"),
    (["model=mel_roformer"], "b9e42844", "47678de5"),
    (["model=bs_roformer", "model.depth=12"], "c8c7f4f0", "7fb0571b"),
])
def test_pinned_signatures(overrides, sig, digest):
    """As tests/test_signatures.py: the recipes behind these signatures must not change silently."""
    from demixlab.experiment import config_digest
    from demixlab.train import main

    xp = main.get_xp(overrides)
    assert (xp.sig, config_digest(xp.cfg)) == (sig, digest)
