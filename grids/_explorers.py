"""The explorer shared by demixlab's grids: what `dora grid NAME` shows for each XP."""
import typing as tp

import treetable as tt
from dora import Explorer

SOURCES = ("drums", "bass", "other", "vocals")


class DemixExplorer(Explorer):
    """Shows, per XP: epochs done, last train loss, the best epoch's valid loss and global SDR
    (mean and per source), and the test SDR (museval and global) once available."""

    sources: tp.Sequence[str] = SOURCES

    def get_grid_metrics(self) -> tp.List[tp.Any]:
        return [
            tt.group("train", [tt.leaf("epoch"), tt.leaf("loss", ".4f")], align=">"),
            tt.group("valid", [tt.leaf("loss", ".4f"), tt.leaf("nsdr", ".2f")]
                     + [tt.leaf(source[:5], ".2f") for source in self.sources], align=">"),
            tt.group("test", [tt.leaf("sdr", ".2f"), tt.leaf("nsdr", ".2f")], align=">"),
        ]

    def process_history(self, history: tp.List[dict]) -> dict:
        if not history:
            return {}
        last = history[-1]
        best = next((entry for entry in reversed(history) if entry.get("best")), last)
        valid = best.get("valid", {})
        test = next((entry["test"] for entry in reversed(history) if "test" in entry), {})
        return {
            "train": {"epoch": last.get("epoch"), "loss": last.get("train", {}).get("loss")},
            "valid": {"loss": valid.get("loss"), "nsdr": valid.get("nsdr"),
                      **{source[:5]: valid.get(f"nsdr_{source}") for source in self.sources}},
            "test": {"sdr": test.get("sdr"), "nsdr": test.get("nsdr")},
        }
