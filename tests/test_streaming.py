"""Constant-memory separation: block resampling, the streamed overlap-add, block-wise reading and
writing, and `demixlab separate` giving the stems of the in-memory path."""
import itertools
import shutil
import subprocess

import julius
import numpy as np
import pytest
import soundfile as sf
import torch

from demixlab.audio import AudioReader, BlockResampler, load_audio_file, write_audio
from demixlab.commands.separate import main
from demixlab.errors import EXIT_USER_ERROR, DemixError
from demixlab.evaluation.metrics import global_sdr, streamed_global_sdr
from demixlab.models import SeparationModel
from demixlab.release.repository import Bag, BagMember
from demixlab.separation import Separator, apply_bag, apply_model, stream_model
from demixlab.separation.output import prevent_clip, select_stems
from demixlab.separation.streaming import stream_bag
from tests.test_separate import SOURCES, repo, track  # noqa: F401  (fixtures)


def _blocks(signal: torch.Tensor, sizes: tuple = (13, 250, 1, 77)):
    position = 0
    for size in itertools.cycle(sizes):
        if position >= signal.shape[-1]:
            return
        yield signal[..., position:position + size]
        position += size


@pytest.mark.parametrize("old,new", [(44100, 48000), (48000, 44100), (22050, 44100), (44100, 16000)])
def test_block_resampling_is_julius_on_the_whole_signal(old, new):
    for length in (5, 1000, 23456):
        signal = torch.randn(2, 3, length, generator=torch.Generator().manual_seed(length))
        resampler = BlockResampler(old, new)
        pieces = [resampler.push(block) for block in _blocks(signal, (700, 1, 3001))] + [resampler.finish()]
        torch.testing.assert_close(torch.cat(pieces, dim=-1), julius.resample_frac(signal, old, new),
                                   rtol=0, atol=1e-6)


class Warp(SeparationModel):
    """Nonlinear and not shift-invariant (a ramp over each chunk), with padding to a valid length:
    any misplaced chunk, context or crop changes its output."""

    def __init__(self, pad: int, sources=("a", "b")):
        super().__init__(list(sources), samplerate=100, audio_channels=2)
        self.pad = pad
        self.chunks = 0

    def valid_length(self, length):
        return length + self.pad

    def forward(self, mixture):
        self.chunks += 1
        ramp = torch.linspace(0.5, 1.5, mixture.shape[-1])
        return torch.stack([torch.tanh(mixture * ramp + k) * (k + 1) for k in range(len(self.sources))], dim=1)


def _bag(*members) -> Bag:
    sources = []
    for model, _ in members:
        sources += [source for source in model.sources if source not in sources]
    return Bag("bag", [BagMember(f"m{index}", {"sources": model.sources, "segment": None}, weights, model=model.eval())
                       for index, (model, weights) in enumerate(members)], sources, 100, 2)


@pytest.mark.parametrize("length", [1, 57, 1000, 2345])
@pytest.mark.parametrize("options", [dict(segment=1.0), dict(segment=0.5, overlap=0.5, shifts=3),
                                     dict(segment=3.0, overlap=0.0, jobs=3), dict(split=False, shifts=2),
                                     dict(segment=0.5, shifts=2, batch_chunks=3),
                                     dict(segment=0.4, overlap=0.5, jobs=2, batch_chunks=2)])
def test_the_streamed_bag_is_the_in_memory_bag(length, options):
    mixture = torch.randn(2, 2, length, generator=torch.Generator().manual_seed(length))
    bag = _bag((Warp(7), [1.0, 1.0, 0.0]), (Warp(60, ("b", "c")), [0.0, 2.0, 1.0]))
    expected = apply_bag(bag, mixture, generator=torch.Generator().manual_seed(3), **options)
    streamed = list(stream_bag(bag, _blocks(mixture), generator=torch.Generator().manual_seed(3), **options))
    assert torch.equal(torch.cat(streamed, dim=-1), expected)
    if "batch_chunks" in options:  # Warp does not mix examples: batching changes no bit
        unbatched = {key: value for key, value in options.items() if key != "batch_chunks"}
        assert torch.equal(apply_bag(bag, mixture, generator=torch.Generator().manual_seed(3), **unbatched), expected)
    single = _bag((Warp(0), [1.0, 2.0]))  # the bag's sources are the model's: the estimate is scaled in place
    expected = apply_bag(single, mixture, generator=torch.Generator().manual_seed(3), **options)
    streamed = list(stream_bag(single, _blocks(mixture), generator=torch.Generator().manual_seed(3), **options))
    assert torch.equal(torch.cat(streamed, dim=-1), expected)


@pytest.mark.parametrize("length", [1, 57, 2345])
@pytest.mark.parametrize("segment,overlap", [(100, 0.25), (40, 0.5), (None, 0.25)])
def test_one_streamed_model_is_apply_model_and_its_global_sdr_is_the_same(length, segment, overlap):
    mixture = torch.randn(1, 2, length, generator=torch.Generator().manual_seed(length))
    model = Warp(13).eval()
    expected = apply_model(model, mixture, segment=segment, overlap=overlap)
    streamed = list(stream_model(model, _blocks(mixture), segment=segment, overlap=overlap))
    assert torch.equal(torch.cat(streamed, dim=-1), expected)
    references = torch.randn(2, 2, length, generator=torch.Generator().manual_seed(1))
    blocks = (block[0] for block in stream_model(model, _blocks(mixture), segment=segment, overlap=overlap))
    torch.testing.assert_close(streamed_global_sdr(references, blocks), global_sdr(references, expected[0]),
                               rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="the estimate has"):
        streamed_global_sdr(references, [expected[0, ..., :-1]])


def test_stems_follow_the_input_with_a_lag_that_does_not_grow_with_its_length():
    bag = _bag((Warp(40), [1.0, 1.0]))
    lags = {}
    for seconds in (20, 200):
        mixture = torch.randn(1, 2, seconds * 100)
        pulled, emitted, worst = 0, 0, 0

        def blocks():
            nonlocal pulled
            for block in _blocks(mixture, (50,)):
                pulled += block.shape[-1]
                yield block

        for stems in stream_bag(bag, blocks(), segment=2.0, shifts=2, generator=torch.Generator().manual_seed(0)):
            emitted += stems.shape[-1]
            worst = max(worst, pulled - emitted)
        assert emitted == seconds * 100
        lags[seconds] = worst
    assert lags[200] == lags[20] and lags[20] <= 2 * 200 + 40 + 50 + 50  # a chunk, its context, a shift, a block


@pytest.mark.parametrize("samplerate,channels,options", [
    (44100, 2, dict(segment=0.2)), (48000, 2, dict(segment=0.3, shifts=2)), (22050, 1, dict(split=False)),
    (44100, 6, dict(segment=0.25, jobs=2)), (48000, 2, dict(segment=0.1, batch_chunks=4))])
def test_separate_stream_gives_the_stems_of_separate_tensor(repo, samplerate, channels, options):  # noqa: F811
    separator = Separator(repo, "tiny", **options)
    wav = 0.3 * torch.randn(channels, 23456, generator=torch.Generator().manual_seed(channels))
    expected = separator.separate_tensor(wav, samplerate)
    mixtures, stems = [], {source: [] for source in SOURCES}
    for mixture, block in separator.separate_stream(_blocks(wav, (4000, 333)), samplerate):
        mixtures.append(mixture)
        for source in SOURCES:
            stems[source].append(block[source])
    assert torch.equal(torch.cat(mixtures, dim=-1), wav)
    for source in SOURCES:
        torch.testing.assert_close(torch.cat(stems[source], dim=-1), expected[source], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_the_command_writes_what_the_in_memory_path_writes(repo, track, tmp_path):  # noqa: F811
    resampled = tmp_path / "song48k.flac"
    wav, _ = load_audio_file(track)
    sf.write(resampled, julius.resample_frac(wav, 44100, 48000).numpy().T, 48000, subtype="PCM_24")
    cases = ((track, ["--float32", "--batch-chunks", "3"], None, "wav", "float32"),  # batching: the same stems
             (resampled, ["--two-stems", "vocals", "--flac", "--int24"], "vocals", "flac", "int24"),
             (track, ["--stems", "bass", "--clip-mode", "clamp"], None, "wav", "int16"))
    for path, extra, two_stems, ext, subtype in cases:
        out = tmp_path / "out" / "-".join(extra)
        main(["--repo", str(repo), "-n", "tiny", str(path), "-o", str(out), "--segment", "0.3", "--shifts", "1",
              "--no-progress", *extra])
        mixture, samplerate = load_audio_file(path)
        expected = Separator(repo, "tiny", segment=0.3, shifts=1).separate_tensor(mixture, samplerate)
        expected = select_stems(expected, mixture, two_stems, ["bass"] if "--stems" in extra else None)
        assert sorted(p.name for p in (out / path.stem).iterdir()) == sorted(f"{stem}.{ext}" for stem in expected)
        clip = "clamp" if "clamp" in extra else "rescale"
        for stem, signal in expected.items():  # the in-memory path's files, then the streamed ones
            write_audio(tmp_path / f"expected.{ext}", prevent_clip(signal, clip), samplerate, subtype=subtype)
            reference, _ = sf.read(tmp_path / f"expected.{ext}", dtype="float32", always_2d=True)
            data, rate = sf.read(out / path.stem / f"{stem}.{ext}", dtype="float32", always_2d=True)
            assert rate == samplerate and data.shape == (mixture.shape[-1], 2)
            step = 2.0 ** -23 if subtype == "int24" else 2.0 ** -15 if subtype == "int16" else 0
            np.testing.assert_allclose(data, reference, rtol=0, atol=1e-6 + step)  # a rounding step at most
            assert np.mean(data != reference) < 0.01


def test_a_failure_midway_leaves_no_stem_and_exits_non_zero(repo, track, tmp_path, monkeypatch, capsys):  # noqa: F811
    calls = {"count": 0}
    original = sf.SoundFile.write

    def write(self, data):
        calls["count"] += 1
        if calls["count"] == 3:
            raise OSError(28, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", write)
    for clip in ("none", "rescale"):
        calls["count"] = 0
        out = tmp_path / clip
        with pytest.raises(SystemExit) as exit_info:
            main(["--repo", str(repo), "-n", "tiny", str(track), "-o", str(out), "--no-progress", "--segment", "0.2",
                  "--clip-mode", clip])
        assert exit_info.value.code == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert "No space left on device" in err and "Traceback" not in err
        assert list(out.rglob("*")) == []  # no stem, no temporary file, no track folder


def test_an_output_folder_that_cannot_be_written_fails_before_separating(repo, track, tmp_path, monkeypatch,  # noqa
                                                                           capsys):
    monkeypatch.setattr(Separator, "separate_stream", lambda *args: pytest.fail("separation started"))
    regular = tmp_path / "file"
    regular.write_text("not a folder")
    for out, template in ((regular / "x", "{track}/{stem}.{ext}"), (tmp_path / "ok", "x/{track}/{stem}.{ext}")):
        if template.startswith("x/"):
            (tmp_path / "ok").mkdir()
            (tmp_path / "ok" / "x").write_text("a file where a folder should be")
        with pytest.raises(SystemExit) as exit_info:
            main(["--repo", str(repo), "-n", "tiny", str(track), "-o", str(out), "--filename", template,
                  "--no-progress"])
        assert exit_info.value.code == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert "cannot write in the folder" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_the_reader_gives_the_samples_of_the_whole_file_reader(track, tmp_path):  # noqa: F811
    with AudioReader(track, blocksize=1000) as reader:
        blocks = list(reader)
        assert reader.frames == 30000 and reader.samplerate == 44100 and reader.channels == 2
    assert {block.shape[-1] for block in blocks[:-1]} == {1000}
    assert torch.equal(torch.cat(blocks, dim=-1), load_audio_file(track)[0])
    bad = tmp_path / "nan.wav"
    sf.write(bad, np.full((100, 1), np.nan, dtype=np.float32), 8000, subtype="FLOAT")
    with pytest.raises(DemixError, match="nan.wav: audio contains NaN"):
        list(AudioReader(bad))


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_formats_soundfile_cannot_read_stream_through_an_ffmpeg_pipe(track, tmp_path):  # noqa: F811
    m4a = tmp_path / "song.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(track), str(m4a)], check=True)
    with AudioReader(m4a, blocksize=4096) as reader:
        assert reader.frames is None and reader.samplerate == 44100 and reader.channels == 2
        streamed = torch.cat(list(reader), dim=-1)
    assert torch.equal(streamed, load_audio_file(m4a)[0])
    broken = tmp_path / "broken.m4a"
    broken.write_bytes(m4a.read_bytes()[:200])
    with pytest.raises(DemixError, match="broken.m4a: cannot read audio"):
        with AudioReader(broken) as reader:
            list(reader)
