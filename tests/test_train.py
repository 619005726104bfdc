"""`dora run` on tiny toy configurations: training, exact resume, fine-tuning, errors.

The end-to-end tests (slow) run Dora in a subprocess, as a user would, from a scratch directory
(so XPs land in its outputs/), with the dataset cache shared across the session. The error paths
run the same entry point in this process; one of them also as a subprocess, to see exactly what
a user sees.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.cli import TINY, TINY_SOLVER, dora, load_checkpoint, signature
from tests.progress import started, wait_while_progressing

@pytest.mark.slow
def test_train_writes_everything_in_the_xp_folder_then_resumes_without_repeating(tmp_path, cache_dir):
    first = dora(tmp_path, cache_dir, *TINY)
    sig = signature(tmp_path, cache_dir, *TINY)
    folder = tmp_path / "outputs" / "xps" / sig
    history = json.loads((folder / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2]
    assert {"loss", "loss_drums", "grad_norm", "lr"} <= set(history[0]["train"])
    assert {"loss", "nsdr", "nsdr_vocals"} <= set(history[0]["valid"])
    assert "test" in history[-1] and "nsdr_bass" in history[-1]["test"]
    report = json.loads((folder / "test_results.json").read_text())
    assert report["signature"] == sig and len(report["tracks"]) == 1
    assert any((folder / "tensorboard").iterdir())
    assert (folder / "curves.png").read_bytes().startswith(b"\x89PNG")
    checkpoint = load_checkpoint(folder)
    assert checkpoint["done"] and checkpoint["family"] == "umx" and len(checkpoint["history"]) == 2
    assert "Test set scores" in first.stderr + first.stdout

    again = dora(tmp_path, cache_dir, *TINY)
    output = again.stderr + again.stdout
    assert "resuming from" in output and "after epoch 2" in output
    assert "Train | Epoch" not in output  # nothing retrained
    assert json.loads((folder / "history.json").read_text()) == history
    assert "Test set scores" in output  # the scores are reported again


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_to_the_same_history_as_an_uninterrupted_run(tmp_path, cache_dir):
    args = [arg for arg in TINY if not arg.startswith(("epochs=", "samples_per_track="))]
    args += ["epochs=3", "samples_per_track=6"]
    reference_dir = tmp_path / "reference"
    interrupted_dir = tmp_path / "interrupted"
    reference_dir.mkdir()
    interrupted_dir.mkdir()
    dora(reference_dir, cache_dir, *args)
    sig = signature(reference_dir, cache_dir, *args)

    history_file = interrupted_dir / "outputs" / "xps" / sig / "history.json"
    env = {**os.environ, "DEMIXLAB_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}

    def first_epoch_done() -> bool:
        assert training.process.poll() is None, "training ended before it could be interrupted"
        return history_file.exists() and len(json.loads(history_file.read_text() or "[]")) >= 1

    with started([sys.executable, "-m", "dora", "-P", "demixlab", "run", *args], interrupted_dir, env) as training:
        wait_while_progressing(first_epoch_done, "a first epoch", [interrupted_dir / "outputs", training.output_size],
                               poll=0.05)
        training.kill()  # SIGKILL to its whole process group
    folder = history_file.parent
    assert len(load_checkpoint(folder)["history"]) == 1  # killed during epoch 2, checkpoint still loadable

    dora(interrupted_dir, cache_dir, *args)
    resumed = json.loads(history_file.read_text())
    reference = json.loads((reference_dir / "outputs" / "xps" / sig / "history.json").read_text())
    assert [entry["epoch"] for entry in resumed] == [1, 2, 3]
    for got, expected in zip(resumed, reference):
        for section in ("train", "valid"):
            for key, value in expected[section].items():
                if key != "duration":
                    assert got[section][key] == value, (got["epoch"], section, key)
    state = load_checkpoint(folder)["model"]
    reference_state = load_checkpoint(reference_dir / "outputs" / "xps" / sig)["model"]
    for key, value in reference_state.items():
        assert torch.equal(state[key], value), key


@pytest.mark.slow
def test_continue_from_starts_from_the_parent_best_weights(tmp_path, cache_dir):
    dora(tmp_path, cache_dir, *TINY)
    parent = signature(tmp_path, cache_dir, *TINY)
    parent_state = load_checkpoint(tmp_path / "outputs" / "xps" / parent)["best_state"]
    # Fine-tune the way users do: replay the parent's overrides with -f, add the second stage.
    # A learning rate so small that one epoch cannot move the weights measurably.
    result = dora(tmp_path, cache_dir, "-f", parent, f"continue_from={parent}", "variant=finetune", "epochs=1",
                  "optim.lr=1e-12")
    assert f"initialised from the best state of XP {parent}" in result.stderr + result.stdout
    child_args = [*TINY, f"continue_from={parent}", "variant=finetune", "epochs=1", "optim.lr=1e-12"]
    child = load_checkpoint(tmp_path / "outputs" / "xps" / signature(tmp_path, cache_dir, *child_args))
    assert child["parent"] == parent
    for key, value in parent_state.items():
        if "running" not in key and "num_batches" not in key:  # BatchNorm statistics move at any lr
            torch.testing.assert_close(child["model"][key], value, rtol=0, atol=1e-6)



def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("demixlab: error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    return errors[0]


@pytest.mark.parametrize("value, message", [
    ("0123abcd", "continue_from=0123abcd: no experiment with that signature"),
    ("1234e567", "quote it"),
])
def test_continue_from_an_unknown_or_mangled_signature_is_a_one_line_error(in_process, capsys, value, message):
    assert in_process(*TINY, f"continue_from={value}") == 2
    assert message in _one_error_line(capsys.readouterr().err)


def write_track(folder: Path, stems: dict, samplerate: int = 44100) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, audio in stems.items():
        sf.write(folder / f"{name}.wav", audio.T, samplerate, subtype="FLOAT")


def stem(seconds: float = 2.0, samplerate: int = 44100) -> np.ndarray:
    return (0.1 * np.random.default_rng(0).standard_normal((2, int(seconds * samplerate)))).astype(np.float32)


def make_dataset(root: Path, broken: str) -> str:
    """A two-source folder dataset, broken in one way; returns the file or key the error must name."""
    for split in ("train", "valid", "test"):
        write_track(root / split / "song", {"a": stem(), "b": stem()})
    target = root / "train" / "song"
    if broken == "missing stem":
        (target / "b.wav").unlink()
        return "b"
    if broken == "length":
        write_track(target, {"b": stem(1.5)})
        return "b.wav"
    if broken == "samplerate":
        write_track(target, {"b": stem(samplerate=22050)}, samplerate=22050)
        return "b.wav"
    if broken == "corrupt":
        (target / "b.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
        return "b.wav"
    if broken == "nan":
        audio = stem()
        audio[0, 100] = np.nan
        write_track(target, {"b": audio})
        return "b.wav"
    raise ValueError(broken)


@pytest.mark.parametrize("broken", ["missing stem", "length", "samplerate", "corrupt", "nan"])
def test_bad_data_is_a_one_line_error_naming_the_file(tmp_path, in_process, capsys, broken):
    root = tmp_path / "stems"
    expected = make_dataset(root, broken)
    assert in_process("dset=folder", f"dset.root={root}", "dset.sources=[a,b]", *TINY_SOLVER) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert str(root / "train" / "song") in error and expected in error


@pytest.mark.parametrize("args, message", [
    (["model=foo"], "unknown model 'foo' in 'model=foo': choose one of "),
    (["dset=musdb18hq", "dset.toy.seed=3"], "unknown option dset.toy.seed: it exists with the default dset "
                                            "but not with dset=musdb18hq"),
    (["dset=folder", "dset.root=does/not/exist", "dset.sources=[a,b]"], "dset.root"),
    (["dset=musdb18hq"], "dset.root"),
    (["model.hiden_size=8"], "unknown option model.hiden_size: no such key in the configuration "
                             "(did you mean model.hidden_size?)"),
    (["epochs=0"], "epochs must be a positive integer"),
    (["epochs=many"], "epochs: Value 'many' of type 'str' could not be converted to Integer"),
    (["valid.overlap=1.5"], "valid.overlap must be in [0, 1)"),
    (["valid.audio_every=-1"], "valid.audio_every must be >= 0, got -1"),
    (["valid.audio_seconds=0"], "valid.audio_seconds must be a positive number of seconds, got 0"),
    (["model.hidden_size=big"], "model.hidden_size: Value 'big' of type 'str' could not be converted to Integer"),
    (["loss.source_weights={vocals: loud}"], "loss.source_weights.vocals: Value 'loud'"),
    (["best.mode=maximum"], "best.mode must be one of max, min, got 'maximum'"),
    (["test.sdr_backend=fast"], "test.sdr_backend must be one of torch, museval, check"),
    (["misc.num_workers=-1"], "misc.num_workers must be 'auto' or a non-negative integer"),
])
def test_bad_options_are_one_line_errors_naming_the_key(in_process, capsys, args, message):
    assert in_process(*TINY_SOLVER, *args) == 2
    assert message in _one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_a_user_error_reaches_the_shell_as_one_line_and_exit_code_2(tmp_path, cache_dir):
    result = dora(tmp_path, cache_dir, *TINY_SOLVER, "dset=musdb18hq", check=False)
    assert result.returncode == 2
    assert "dset.root is not set" in _one_error_line(result.stderr)

