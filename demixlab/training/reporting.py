"""What an XP shows while it trains: log lines, TensorBoard scalars, `curves.png` and Dora's history.

Everything here runs on rank 0 only; other processes call the same methods, which do nothing.
"""
import logging
import math
import typing as tp
from pathlib import Path

from ..evaluation.metrics import format_table
from . import distrib
from .plots import plot_history

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
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events that a crashed run logged after its last checkpoint.
            self._writer = SummaryWriter(log_dir=str(self.folder / "tensorboard"), purge_step=entry["epoch"])
        for section in ("train", "valid", "test"):
            for key, value in entry.get(section, {}).items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{section}/{key}", value, entry["epoch"])
        self._writer.flush()

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
