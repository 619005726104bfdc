"""What an XP shows while it trains: log lines, TensorBoard scalars (and, every `valid.audio_every`
epochs, audio and spectrograms of a validation excerpt), `curves.png` and Dora's history.

Everything here runs on rank 0 only; other processes call the same methods, which do nothing.
"""
import logging
import math
import typing as tp
from pathlib import Path

import numpy as np

from ..evaluation.metrics import format_table
from . import distrib
from .plots import log_magnitude, plot_history, spectrogram_images
from .validation import MediaExcerpt

logger = logging.getLogger(__name__)


class Reporter:
    """Reports the epochs and test scores of the XP in `folder`.

    Args:
        folder: the XP folder (`tensorboard/`, `curves.png`).
        sources: the source names (per-source metrics are `<metric>_<source>`).
        epochs: the planned number of epochs (for the log lines).
        title: the title of `curves.png`.
    """

    def __init__(self, folder: Path, sources: tp.Sequence[str], epochs: int, title: str):
        self.folder = folder
        self.sources = list(sources)
        self.epochs = epochs
        self.title = title
        self._writer: tp.Any = None

    def epoch(self, entry: tp.Mapping[str, tp.Any], history: tp.Sequence[tp.Mapping[str, tp.Any]]) -> None:
        """One finished epoch: Dora's history, TensorBoard, the log line and the curves."""
        self.sync_history(history)
        self.scalars(entry)
        self._log_epoch(entry)
        if distrib.is_master():
            plot_history(history, self.sources, self.folder / "curves.png", title=self.title)

    def sync_history(self, history: tp.Sequence[tp.Mapping[str, tp.Any]]) -> None:
        """Mirror the history into Dora's history.json (what `dora info` and grids read)."""
        from dora import get_xp, is_xp

        if distrib.is_master() and is_xp():
            get_xp().link.update_history(list(history))

    def scalars(self, entry: tp.Mapping[str, tp.Any]) -> None:
        """TensorBoard scalars of one epoch, under train/, valid/ and test/."""
        if not distrib.is_master():
            return
        writer = self._writer_from(entry["epoch"])
        for section in ("train", "valid", "test"):
            for key, value in entry.get(section, {}).items():
                if isinstance(value, (int, float)):
                    writer.add_scalar(f"{section}/{key}", value, entry["epoch"])
        writer.flush()

    def _writer_from(self, step: int) -> tp.Any:
        """The TensorBoard writer, opened at `step` the first time."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events that a crashed run logged after its last checkpoint.
            self._writer = SummaryWriter(log_dir=str(self.folder / "tensorboard"), purge_step=step)
        return self._writer

    def media(self, epoch: int, excerpt: MediaExcerpt) -> None:
        """TensorBoard audio (mono down-mixes) and log-magnitude spectrograms of a validation
        excerpt: `audio/mixture`, `audio/SOURCE/reference`, `audio/SOURCE/estimate`, and the same
        tags under `spectrogram/`. All signals share one gain, so that the loudest peaks at 1 at most
        and their levels stay comparable; the spectrograms share one colour scale."""
        if not distrib.is_master():
            return
        writer = self._writer_from(epoch)
        signals = {"mixture": excerpt.mixture}
        for index, source in enumerate(excerpt.sources):
            signals[f"{source}/reference"] = excerpt.references[index]
            signals[f"{source}/estimate"] = excerpt.estimates[index]
        mono = {name: signal.mean(dim=0) for name, signal in signals.items()}
        gain = 1.0 / max(1.0, max(float(signal.abs().max()) for signal in mono.values()))
        hop = 512
        decibels = {name: log_magnitude(signal, hop=hop) for name, signal in signals.items()}
        top = float(np.quantile(decibels["mixture"], 0.999))
        end = excerpt.start + excerpt.mixture.shape[-1] / excerpt.samplerate
        where = f"epoch {epoch}, {excerpt.track} {excerpt.start:.1f}-{end:.1f} s"
        images = spectrogram_images(decibels, {name: f"{name.replace('/', ' ')}, {where}" for name in decibels},
                                    excerpt.samplerate, hop, top=top)
        for name, signal in mono.items():
            writer.add_audio(f"audio/{name}", signal * gain, epoch, sample_rate=excerpt.samplerate)
            writer.add_image(f"spectrogram/{name}", images[name], epoch, dataformats="HWC")
        writer.flush()

    def _log_epoch(self, entry: tp.Mapping[str, tp.Any]) -> None:
        valid = entry["valid"]
        parts = [f"Epoch {entry['epoch']}/{self.epochs}", f"train loss {entry['train']['loss']:.4f}",
                 f"valid loss {valid.get('loss', math.nan):.4f}", f"valid nSDR {valid['nsdr']:.3f} dB"]
        parts += [f"{source} {valid[f'nsdr_{source}']:.2f}" for source in self.sources]
        parts.append(f"{entry['train']['duration'] + valid['duration']:.0f} s")
        if entry["best"]:
            parts.append("(best)")
        logger.info(" | ".join(parts))

    def test_table(self, test: tp.Mapping[str, float], epoch: int) -> None:
        """Log the final test scores as a table."""
        if distrib.is_master():
            logger.info("Test set scores (best state, after epoch %d; museval SDR: median of frames and tracks, "
                        "global SDR: mean over tracks), %s:\n%s", epoch, self.folder / "test_results.json",
                        format_table(dict(test), self.sources))

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
