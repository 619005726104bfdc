"""The solver on the paths the published recipes use, each a tiny training run in this process:
EMAs and their resume, mixed precision (CPU autocast through the CUDA code path, the float16
gradient scaler), early stopping, the plateau schedule, periodic tests, `best.mode=min`, the
non-finite loss abort, short validation tracks, persistent loader workers, multi-channel input."""
import json
import math
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from demixlab.models import registry
from demixlab.training import solver as solver_module
from demixlab.training.validation import choose_candidate
from tests.cli import TINY, crash_in_epoch, load_checkpoint

# TINY with three epochs of four steps.
RUN = [arg for arg in TINY if not arg.startswith(("epochs=", "samples_per_track="))] + [
    "epochs=3", "samples_per_track=4", "misc.progress=false"]


def _history(workdir: Path) -> tp.List[tp.Dict[str, tp.Any]]:
    folder, = (workdir / "outputs" / "xps").iterdir()
    return json.loads((folder / "history.json").read_text())


def _without_durations(history: tp.List[tp.Dict[str, tp.Any]]) -> tp.List[tp.Dict[str, tp.Any]]:
    def strip(value: tp.Any) -> tp.Any:
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items() if key != "duration"}
        return value
    return [strip(entry) for entry in history]


@pytest.fixture
def run_in(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tp.Callable[..., int]:
    """`run_in(name, *overrides)`: `dora run OVERRIDES` in this process from `tmp_path / name`."""
    from tests.cli import run_in_process

    monkeypatch.setenv("DEMIXLAB_CACHE", str(cache_dir))

    def run(name: str, *overrides: str) -> int:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        monkeypatch.chdir(workdir)
        return run_in_process(workdir, cache_dir, *overrides)

    return run


def _resume_matches_an_uninterrupted_run(tmp_path: Path, run_in: tp.Callable[..., int],
                                         monkeypatch: pytest.MonkeyPatch, args: tp.Sequence[str]) -> tp.Dict:
    """Run `args` once straight through and once crashing in epoch 2 then resumed; the histories
    and final states must be identical. Returns the checkpoint."""
    assert run_in("straight", *args) == 0
    with monkeypatch.context() as patch:
        crash_in_epoch(patch, 2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_in("resumed", *args)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert len(_history(resumed)) == 1
    assert run_in("resumed", *args) == 0
    assert _without_durations(_history(resumed)) == _without_durations(_history(straight))
    states = [load_checkpoint(next((folder / "outputs" / "xps").iterdir())) for folder in (straight, resumed)]
    for key in ("model", "best_state"):
        for name, value in states[0][key].items():
            assert torch.equal(states[1][key][name], value), (key, name)
    return states[1]


@pytest.mark.slow
def test_emas_are_validated_selected_and_resumed_exactly(tmp_path, run_in, monkeypatch):
    checkpoint = _resume_matches_an_uninterrupted_run(tmp_path, run_in, monkeypatch,
                                                      [*RUN, "ema.decays=[0.5,0.9]"])
    history = checkpoint["history"]
    assert all(entry["valid"]["state"] in ("main", "ema_0.5", "ema_0.9") for entry in history)
    candidates = {key for key in history[0]["valid"] if key in ("main", "ema_0.5", "ema_0.9")}
    assert len(candidates) == 2 and all("nsdr" in history[0]["valid"][name] for name in candidates)
    assert set(checkpoint["emas"]) == {"ema_0.5", "ema_0.9"}


@pytest.mark.slow
def test_float16_amp_on_the_cuda_path_resumes_exactly_with_its_loss_scale(tmp_path, run_in, monkeypatch):
    monkeypatch.setattr(solver_module, "AMP_DEVICES", ("cuda", "cpu"))
    checkpoint = _resume_matches_an_uninterrupted_run(tmp_path, run_in, monkeypatch,
                                                      [*RUN, "amp.enabled=true", "amp.dtype=float16"])
    assert checkpoint["grad_scaler"]["scale"] > 0  # the scaler ran and its state was saved


def test_bfloat16_autocast_trains_through_the_amp_path(in_process, tmp_path, monkeypatch):
    monkeypatch.setattr(solver_module, "AMP_DEVICES", ("cuda", "cpu"))
    assert in_process(*RUN, "epochs=1", "amp.enabled=true", "amp.dtype=bfloat16") == 0
    train = _history(tmp_path)[0]["train"]
    assert math.isfinite(train["loss"]) and train["grad_norm"] > 0
    assert load_checkpoint(next((tmp_path / "outputs" / "xps").iterdir()))["grad_scaler"] == {}  # no scaler in bf16


@pytest.mark.slow
def test_persistent_loader_workers_draw_the_same_examples(tmp_path, run_in):
    histories = []
    for workers in (0, 2):
        assert run_in(f"workers{workers}", *RUN, "epochs=2", f"misc.num_workers={workers}") == 0
        histories.append(_without_durations(_history(tmp_path / f"workers{workers}")))
    assert histories[0] == histories[1]


def _tensorboard_media(workdir: Path) -> tp.Tuple[tp.Dict[str, tp.List[tp.Any]], tp.Dict[str, tp.List[tp.Any]]]:
    """The audio and image events of the XP in `workdir`, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import AUDIO, IMAGES, EventAccumulator

    folder, = (workdir / "outputs" / "xps").iterdir()
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={AUDIO: 0, IMAGES: 0})
    events.Reload()
    tags = events.Tags()
    return ({tag: events.Audio(tag) for tag in tags["audio"]}, {tag: events.Images(tag) for tag in tags["images"]})


@pytest.mark.slow
def test_validation_audio_and_spectrograms_go_to_tensorboard_every_n_epochs_only_when_asked(tmp_path, run_in):
    args = [*RUN, "ema.decays=[0.5]"]  # the excerpt is separated by the epoch's best candidate
    assert run_in("media", *args, "valid.audio_every=2", "valid.audio_seconds=1.5") == 0
    assert run_in("plain", *args) == 0
    audio, images = _tensorboard_media(tmp_path / "media")
    tags = ["mixture"] + [f"{source}/{kind}" for source in ("drums", "bass", "other", "vocals")
                          for kind in ("reference", "estimate")]
    assert sorted(audio) == sorted(f"audio/{tag}" for tag in tags)
    assert sorted(images) == sorted(f"spectrogram/{tag}" for tag in tags)
    for events in (*audio.values(), *images.values()):
        assert [event.step for event in events] == [2]  # epochs=3, every 2 epochs
    clip = audio["audio/vocals/estimate"][0]
    assert clip.sample_rate == 44100 and clip.length_frames == int(1.5 * 44100)
    picture = images["spectrogram/vocals/reference"][0]
    assert picture.encoded_image_string.startswith(b"\x89PNG") and picture.width > picture.height > 100
    # The estimate is not the reference: the excerpt really went through the model.
    assert audio["audio/vocals/estimate"][0].encoded_audio_string != audio["audio/vocals/reference"][0].encoded_audio_string
    assert _tensorboard_media(tmp_path / "plain") == ({}, {})
    # Logging media changes neither the signature nor training.
    assert [folder.name for folder in (tmp_path / "media" / "outputs" / "xps").iterdir()] == [
        folder.name for folder in (tmp_path / "plain" / "outputs" / "xps").iterdir()]
    assert _without_durations(_history(tmp_path / "media")) == _without_durations(_history(tmp_path / "plain"))


@pytest.mark.slow
def test_early_stopping_ends_training_after_patience_epochs_without_improvement(in_process, tmp_path):
    # The learning rate (constant here) as the metric: only the first epoch is ever the best.
    assert in_process(*RUN, "epochs=6", "best.metric=train.lr", "early_stop.patience=1") == 0
    history = _history(tmp_path)
    assert [entry["best"] for entry in history] == [True, False] and "test" in history[-1]


@pytest.mark.slow
def test_the_plateau_schedule_cuts_the_learning_rate_through_the_solver(in_process, tmp_path):
    # The learning rate itself as the metric: it never improves after the first epoch.
    assert in_process(*RUN, "scheduler.name=plateau", "scheduler.patience=0", "scheduler.cooldown=0",
                      "scheduler.factor=0.5", "best.metric=train.lr") == 0
    rates = [entry["train"]["lr"] for entry in _history(tmp_path)]
    # Epoch 1 sets the best; epoch 2 does not beat it (patience 0): epoch 3 trains at half the rate.
    assert rates == pytest.approx([1e-3, 1e-3, 5e-4])


@pytest.mark.slow
def test_test_every_evaluates_during_training(in_process, tmp_path):
    assert in_process(*RUN, "test.every=1") == 0
    history = _history(tmp_path)
    assert all("nsdr" in entry["test"] for entry in history)
    folder, = (tmp_path / "outputs" / "xps").iterdir()
    assert sorted(path.name for path in (folder / "test").iterdir()) == [f"epoch_{n:04d}.json" for n in (1, 2, 3)]


@pytest.mark.parametrize("mode, expected", [("max", "ema_0.9"), ("min", "main")])
def test_a_candidate_without_the_metric_never_wins(mode, expected):
    candidates = {"main": {"loss": 0.5}, "ema_0.9": {"loss": 0.6}, "ema_0.99": {}}
    assert choose_candidate(candidates, "valid.loss", mode) == expected


def test_a_non_finite_loss_aborts_with_a_one_line_error_naming_the_step(in_process, capsys, monkeypatch):
    original = registry.Family.objective
    calls = {"count": 0}

    def objective(self: tp.Any, model: tp.Any, options: tp.Any) -> tp.Any:
        inner = original(self, model, options)

        def poisoned(*args: tp.Any) -> tp.Dict[str, torch.Tensor]:
            losses = inner(*args)
            calls["count"] += 1
            if calls["count"] == 3:  # the third training step
                losses["loss"] = losses["loss"] * float("nan")
            return losses
        return poisoned

    monkeypatch.setattr(registry.Family, "objective", objective)
    assert in_process(*RUN) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("demixlab: error:")]
    assert errors == ["demixlab: error: epoch 1, step 3: the training loss is not finite (NaN or inf); lower "
                      "optim.lr or enable optim.clip_grad"]


def test_validation_tracks_shorter_than_a_segment(in_process, tmp_path):
    assert in_process(*[arg for arg in RUN if not arg.startswith("dset.toy.eval_duration")],
                      "dset.toy.eval_duration=0.5", "epochs=1") == 0
    valid = _history(tmp_path)[0]["valid"]
    assert math.isfinite(valid["loss"]) and math.isfinite(valid["nsdr"])


@pytest.mark.parametrize("channels", [1, 6])
def test_mono_and_5_1_files_separate_with_the_centre_kept(tmp_path, channels):
    """A 5.1 file whose only signal is in the centre channel: the down-mix keeps it, so the stems
    are not silent; a mono file gives mono stems."""
    from demixlab.commands import main as demixlab_main
    from demixlab.models import get_family
    from demixlab.release.model_file import package_model, save_package

    options = dict(n_fft=512, hop_length=128, hidden_size=8, nb_layers=1, bandwidth=8000.0, wiener_iterations=0)
    torch.manual_seed(0)
    model = get_family("umx").build_model(["vocals", "other"], 44100, 2, options)
    (tmp_path / "repo").mkdir()
    save_package(package_model("umx", options, model.state_dict(), sources=["vocals", "other"], samplerate=44100,
                               audio_channels=2), tmp_path / "repo" / "tiny.th")
    audio = np.zeros((44100, channels), dtype=np.float32)
    audio[:, 2 if channels == 6 else 0] = 0.3 * np.sin(np.arange(44100) * 2 * np.pi * 440 / 44100)
    sf.write(tmp_path / "song.wav", audio, 44100, subtype="FLOAT")
    demixlab_main(["separate", "--repo", str(tmp_path / "repo"), "-n", "tiny", str(tmp_path / "song.wav"),
                   "-o", str(tmp_path / "out"), "--float32", "--no-progress"])
    vocals, _ = sf.read(tmp_path / "out" / "song" / "vocals.wav", always_2d=True)
    assert vocals.shape == (44100, 2 if channels == 6 else 1)
    assert np.abs(vocals).max() > 1e-3
