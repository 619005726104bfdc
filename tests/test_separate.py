"""Separation end to end (train -> export -> `demixlab separate`), the CLI options and the Python API."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from demixlab.audio import load_audio_file
from demixlab.separation import Separator
from demixlab.errors import EXIT_USER_ERROR, DemixError
from demixlab.models import get_family
from demixlab.release.model_file import package_model, save_package
from demixlab.commands import main as cli
from demixlab.commands.separate import main
from tests.cli import TINY, dora
from tests.progress import run_until_stalled
from tools.export import main as export_main

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["drums", "bass", "other", "vocals"]
TINY_UMX = dict(n_fft=512, hop_length=128, hidden_size=8, nb_layers=1, bandwidth=8000.0, wiener_iterations=0)


def _python(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return run_until_stalled([sys.executable, *args], cwd=workdir, env=env, progress=[workdir])


# TINY, cheaper still: one epoch, a small STFT, no Wiener filtering.
QUICK = [arg for arg in TINY if not arg.startswith("epochs=")] + [
    "epochs=1", "model.n_fft=1024", "model.hop_length=256", "model.wiener_iterations=0", "misc.progress=false"]


@pytest.mark.slow
def test_train_export_and_separate_end_to_end(tmp_path, cache_dir):
    dora(tmp_path, cache_dir, *QUICK)
    xp, = (tmp_path / "outputs" / "xps").iterdir()
    sig = xp.name
    export_main([sig, "--dora-dir", str(tmp_path / "outputs"), "-o", str(tmp_path / "release_models")])
    signed = _python(tmp_path, "-m", "tools.export", sig, "--sign", "--half", "-o", "signed")
    assert signed.returncode == 0, signed.stderr
    plain = torch.load(tmp_path / "release_models" / f"{sig}.th", weights_only=True)
    assert {"format", "family", "kwargs", "state", "sources", "samplerate", "audio_channels", "segment", "config",
            "signature", "metrics", "origin", "demixlab_version", "git_commit"} <= set(plain)
    assert plain["family"] == "umx" and plain["signature"] == sig and plain["sources"] == SOURCES
    assert plain["config"]["segment"] == 1.0 and plain["metrics"]["epoch"] == 1 and plain["origin"]["kind"] == "xp"
    half_file, = (tmp_path / "signed").iterdir()
    assert half_file.name.startswith(f"{sig}-") and len(half_file.stem) == 17
    half = torch.load(half_file, weights_only=True)
    assert {value.dtype for value in half["state"].values() if value.is_floating_point()} == {torch.float16}

    track = sorted((cache_dir / "toy").glob("toy-*/test/*/mixture.wav"))[0]
    mono = tmp_path / "mono22k.flac"
    sf.write(mono, np.random.default_rng(0).uniform(-0.5, 0.5, 22050 + 7).astype(np.float32), 22050)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt not really audio")
    result = _python(tmp_path, "-m", "demixlab", "separate", "--repo", "release_models", "-n", sig, str(track),
                     str(broken), str(mono), "-o", "out", "--no-progress")
    assert result.returncode == EXIT_USER_ERROR
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "broken.wav" in errors[0] and "Traceback" not in result.stderr
    info = sf.info(str(track))
    for stem in SOURCES:
        written = sf.info(str(tmp_path / "out" / "mixture" / f"{stem}.wav"))
        assert (written.frames, written.samplerate, written.channels) == (info.frames, info.samplerate, 2)
        assert written.subtype == "PCM_16"
        written = sf.info(str(tmp_path / "out" / "mono22k" / f"{stem}.wav"))
        assert (written.frames, written.samplerate, written.channels) == (22057, 22050, 1)
    assert not (tmp_path / "out" / "broken").exists()


@pytest.fixture
def repo(tmp_path) -> Path:
    torch.manual_seed(0)
    model = get_family("umx").build_model(SOURCES, 44100, 2, TINY_UMX)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    folder = tmp_path / "repo"
    save_package(package_model("umx", TINY_UMX, model.state_dict(), sources=SOURCES, samplerate=44100,
                               audio_channels=2), folder / "tiny.th")
    return folder


@pytest.fixture
def track(tmp_path) -> Path:
    path = tmp_path / "song.wav"
    t = np.arange(30000) / 44100
    wav = np.stack([np.sin(2 * np.pi * 220 * t), np.sign(np.sin(2 * np.pi * 55 * t))]) * 0.5
    sf.write(path, wav.T.astype(np.float32), 44100, subtype="FLOAT")
    return path


def test_two_stems_is_the_stem_and_the_mixture_minus_it(repo, track, tmp_path):
    main(["--repo", str(repo), "-n", "tiny", str(track), "-o", str(tmp_path / "out"), "--two-stems", "vocals",
          "--float32", "--clip-mode", "none", "--no-progress", "--segment", "0.3"])
    folder = tmp_path / "out" / "song"
    assert sorted(path.name for path in folder.iterdir()) == ["no_vocals.wav", "vocals.wav"]
    vocals, _ = sf.read(folder / "vocals.wav", always_2d=True)
    rest, _ = sf.read(folder / "no_vocals.wav", always_2d=True)
    mixture, _ = sf.read(track, always_2d=True)
    np.testing.assert_allclose(vocals + rest, mixture, atol=1e-6)
    assert np.abs(vocals).max() > 1e-3


def test_formats_templates_subsets_and_the_console_script_dispatch(repo, track, tmp_path):
    out = tmp_path / "out"
    cli(["separate", "--repo", str(repo), "-n", "tiny", str(track), "-o", str(out), "--stems", "bass,drums",
         "--flac", "--int24", "--filename", "{name}-{track}-{stem}.{ext}", "--no-progress", "--jobs", "2"])
    assert sorted(path.name for path in out.iterdir()) == ["tiny-song-bass.flac", "tiny-song-drums.flac"]
    assert sf.info(str(out / "tiny-song-bass.flac")).subtype == "PCM_24"
    main(["--repo", str(repo), "-n", "tiny", str(track), "-o", str(out), "--mp3", "--stems", "vocals",
          "--no-progress"])
    info = sf.info(str(out / "song" / "vocals.mp3"))
    assert info.format == "MP3" and info.samplerate == 44100 and abs(info.frames - 30000) < 3000


def test_chunks_shifts_and_parallel_jobs_give_consistent_results(repo, track):
    wav = torch.from_numpy(sf.read(track, always_2d=True, dtype="float32")[0].T.copy())[:, :15000]
    whole = Separator(repo, "tiny", split=False).separate_tensor(wav, 44100)
    chunked = Separator(repo, "tiny", segment=0.25, overlap=0.5).separate_tensor(wav, 44100)
    parallel = Separator(repo, "tiny", segment=0.25, overlap=0.5, jobs=3).separate_tensor(wav, 44100)
    for stem in SOURCES:
        assert whole[stem].shape == (2, 15000)
        torch.testing.assert_close(parallel[stem], chunked[stem])
        # UMX is not shift-invariant at chunk edges, but chunks blend into nearly the same estimate.
        assert (chunked[stem] - whole[stem]).abs().mean() < 0.1 * whole[stem].abs().mean() + 1e-4
    stems, samplerate = Separator(repo, "tiny", shifts=2, segment=0.4).separate_file(track)
    assert samplerate == 44100 and stems["drums"].shape == (2, 30000)
    resampled = Separator(repo, "tiny").separate_tensor(torch.randn(3, 2, 4800), 48000)
    assert resampled["bass"].shape == (3, 2, 4800)


def test_model_options_from_the_command_line_override_the_model_file(repo, track, tmp_path):
    outputs = {}
    for name, extra in (("stored", []), ("wiener", ["--option", "wiener_iterations=1", "--option", "softmask=true"])):
        main(["--repo", str(repo), "-n", "tiny", str(track), "-o", str(tmp_path / name), "--stems", "vocals",
              "--float32", "--clip-mode", "none", "--no-progress", *extra])
        outputs[name], _ = sf.read(tmp_path / name / "song" / "vocals.wav", always_2d=True)
    assert outputs["stored"].shape == outputs["wiener"].shape
    assert np.abs(outputs["stored"] - outputs["wiener"]).max() > 1e-4  # the Wiener filter ran


def test_user_errors_are_one_line(repo, track, tmp_path, capsys):
    cases = [
        (["--repo", str(repo), "-n", "nope", str(track)], "no model or bag named 'nope'"),
        (["--repo", str(tmp_path / "nowhere"), "-n", "tiny", str(track)], "no such folder"),
        (["--repo", str(repo), "-n", "tiny", str(track), "--two-stems", "piano"], "unknown stem 'piano'"),
        (["--repo", str(repo), "-n", "tiny", str(track), "--stems", "bass,guitar"], "unknown stem 'guitar'"),
        (["--repo", str(repo), "-n", "tiny", str(track), "--filename", "{song}.{ext}"], "bad template"),
        (["--repo", str(repo), "-n", "tiny", str(track), "--segment", "0"], "--segment must be a positive"),
        (["--repo", str(repo), "-n", "tiny", str(track), "--batch-chunks", "0"], "--batch-chunks must be at least 1"),
        (["--repo", str(repo), "-n", "tiny", str(track), "--stems", "bass", "--two-stems", "bass"],
         "cannot be combined"),
        (["--repo", str(repo), "-n", "tiny", str(tmp_path / "absent.wav"), "-o", str(tmp_path / "o")],
         "absent.wav: no such file"),
        (["--repo", str(repo), "-n", "tiny", str(track), "--option", "wiener_iterations"], "expected KEY=VALUE"),
        (["--repo", str(repo), "-n", "tiny", str(track), "--option", "wiener_iteration=1"], "wiener_iteration"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--no-progress"])
        assert exit_info.value.code == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    with pytest.raises(DemixError, match="expected a"):
        Separator(repo, "tiny").separate_tensor(torch.zeros(10), 44100)


def test_a_model_with_a_maximum_segment_runs_in_chunks_of_its_file_segment(tmp_path):
    options = dict(channels=8, nfft=1024, depth=3, t_layers=1, t_heads=4, bottom_channels=16, segment=0.2)
    model = get_family("htdemucs").build_model(SOURCES, 44100, 2, options)
    save_package(package_model("htdemucs", options, model.state_dict(), sources=SOURCES, samplerate=44100,
                               audio_channels=2, segment=0.2), tmp_path / "ht.th")
    wav = torch.randn(2, 20000)
    stems = Separator(tmp_path, "ht").separate_tensor(wav, 44100)
    assert stems["vocals"].shape == (2, 20000) and stems["vocals"].abs().max() > 0
    batched = Separator(tmp_path, "ht", batch_chunks=3).separate_tensor(wav, 44100)  # no example interaction
    for source in SOURCES:
        torch.testing.assert_close(batched[source], stems[source], rtol=0, atol=1e-5 * float(stems[source].abs().max()))
    with pytest.raises(DemixError, match="HTDemucs separates at most its training segment"):
        Separator(tmp_path, "ht", segment=0.4).separate_tensor(torch.randn(2, 20000), 44100)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_formats_soundfile_cannot_read_go_through_ffmpeg(track, tmp_path, monkeypatch):
    m4a = tmp_path / "song.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(track), str(m4a)], check=True)
    wav, samplerate = load_audio_file(m4a)
    assert samplerate == 44100 and wav.shape[0] == 2 and abs(wav.shape[1] - 30000) < 3000
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DemixError, match="song.m4a: cannot read this audio format"):
        load_audio_file(m4a)
