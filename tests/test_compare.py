"""`demixlab compare`: tiny toy XPs of two families (finished) and a third one interrupted after
epoch 1 on another test set, compared by signature and by grid, in this process. The tests that
train (about 20 s together) are slow; the argument errors are not."""
import csv
import io
import json
import typing as tp
from pathlib import Path

import pytest

from demixlab.commands import main as demixlab_main
from demixlab.training import solver as solver_module
from tests.cli import TINY, run_in_process

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("drums", "bass", "other", "vocals")
RUN = [*TINY, "misc.progress=false"]


def with_grids(path: Path) -> Path:
    """`path`, with the repository's grids linked into `path/grids` (`--grid` reads them there)."""
    (path / "grids").mkdir()
    for module in (REPO / "grids").glob("*.py"):
        (path / "grids" / module.name).symlink_to(module)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tp.Dict[str, tp.Any]:
    """A scratch directory (with the repository's grids) holding three XPs: `umx` and `xumx`
    (finished; the smoke grid's first two XPs) and `partial` (umx on a toy dataset with another
    test track count, tested with BSS Eval after epoch 1, interrupted during epoch 2)."""
    path = with_grids(tmp_path_factory.mktemp("compare"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)
        patch.setenv("DEMIXLAB_CACHE", str(cache_dir))
        assert run_in_process(path, cache_dir, *RUN) == 0
        assert run_in_process(path, cache_dir, *RUN, "model=xumx") == 0
        original = solver_module.Solver._train_epoch

        def crash_in_epoch_2(self: tp.Any, index: int) -> tp.Dict[str, float]:
            if index == 1:
                raise RuntimeError("simulated crash")
            return original(self, index)

        patch.setattr(solver_module.Solver, "_train_epoch", crash_in_epoch_2)
        with pytest.raises(RuntimeError, match="simulated crash"):  # tested after epoch 1, BSS Eval on
            run_in_process(path, cache_dir, *[arg for arg in RUN if arg != "test.sdr=false"],
                           "dset.toy.test_tracks=2", "test.every=1")
    signatures = {}
    for folder in (path / "outputs" / "xps").iterdir():
        argv = json.loads((folder / ".argv.json").read_text())
        name = "xumx" if "model=xumx" in argv else "partial" if "dset.toy.test_tracks=2" in argv else "umx"
        signatures[name] = folder.name
    assert len(signatures) == 3
    return {"path": path, **signatures}


def compare(workdir: tp.Dict[str, tp.Any], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
            *args: str) -> tp.Tuple[int, str, str]:
    """Run `demixlab compare ARGS` from the work directory; (exit code, stdout, stderr)."""
    monkeypatch.chdir(workdir["path"])
    try:
        demixlab_main(["compare", *args])
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path: Path) -> tp.List[tp.Dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.mark.slow
def test_two_families_side_by_side_with_their_differing_override_sorted_by_test_sdr(workdir, capsys, monkeypatch):
    out_dir = workdir["path"] / "two"
    code, out, err = compare(workdir, capsys, monkeypatch, workdir["umx"], workdir["xumx"], "-o", str(out_dir))
    assert code == 0, err
    assert "warning" not in err
    rows = read_csv(out_dir / "compare.csv")
    assert [row["family"] for row in sorted(rows, key=lambda row: row["xp"] != workdir["umx"])] == ["umx", "xumx"]
    columns = list(rows[0])
    # Only the override that differs is a column; the shared ones (TINY) are not.
    assert "model" in columns and "epochs" in columns and "model.hidden_size" not in columns
    assert {row["model"] for row in rows} == {"", "xumx"}
    for kind in ("valid.global", "test.global"):
        assert {f"{kind}.{source}" for source in (*SOURCES, "mean")} <= set(columns)
    assert not any(column.startswith("test.museval") for column in columns)  # TINY turns BSS Eval off
    for row in rows:
        assert row["epochs"] == row["planned_epochs"] == row["test_epoch"] == "2" and row["status"] == "done"
        assert int(row["params"]) > 0 and float(row["sec_per_epoch"]) > 0 and row["best_epoch"] in ("1", "2")
        assert row["test_set"] == "toy"
    # Sorted by the test global SDR (mean), best first, in the CSV and the Markdown (also printed).
    means = [float(row["test.global.mean"]) for row in rows]
    assert means == sorted(means, reverse=True)
    history = json.loads((workdir["path"] / "outputs" / "xps" / rows[0]["xp"] / "history.json").read_text())
    assert float(rows[0]["test.global.mean"]) == pytest.approx(history[-1]["test"]["nsdr"])
    markdown = (out_dir / "compare.md").read_text()
    assert markdown in out
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| xp | family | model | params |")
    assert [line.split(" | ")[0][2:] for line in table[1:]] == [row["xp"] for row in rows]
    assert "| umx | default |" in markdown and "| xumx | xumx |" in markdown
    assert (out_dir / "compare.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_sort_by_another_column_and_an_unknown_column(workdir, capsys, monkeypatch):
    out_dir = workdir["path"] / "sorted"
    args = [workdir["umx"], workdir["xumx"], "-o", str(out_dir)]
    for column, descending in (("valid.global.drums", True), ("sec_per_epoch", False)):
        assert compare(workdir, capsys, monkeypatch, *args, "--sort", column)[0] == 0
        values = [float(row[column]) for row in read_csv(out_dir / "compare.csv")]
        assert values == sorted(values, reverse=descending)
    code, _, err = compare(workdir, capsys, monkeypatch, *args, "--sort", "test.sdr")
    assert code == 2 and err.count("\n") == 1
    assert "--sort test.sdr: not a score column" in err and "test.global.mean" in err


@pytest.mark.slow
def test_a_running_xp_on_another_test_set_is_shown_apart_with_a_warning(workdir, capsys, monkeypatch):
    out_dir = workdir["path"] / "three"
    code, out, err = compare(workdir, capsys, monkeypatch, workdir["umx"], workdir["xumx"], workdir["partial"],
                             "-o", str(out_dir))
    assert code == 0, err
    assert "demixlab: warning: the XPs use 2 different test sets" in err
    assert "dset.toy.test_tracks=1" in err and "dset.toy.test_tracks=2" in err
    rows = {row["xp"]: row for row in read_csv(out_dir / "compare.csv")}
    partial = rows[workdir["partial"]]
    assert partial["epochs"] == "1" and partial["best_epoch"] == "1" and partial["status"] == "1/2 epochs"
    entry, = json.loads((workdir["path"] / "outputs" / "xps" / workdir["partial"] / "history.json").read_text())
    assert float(partial["valid.global.mean"]) == pytest.approx(entry["valid"]["nsdr"])
    # Its test after epoch 1 (test.every) is its latest; only it has BSS Eval (museval) scores.
    assert partial["test_epoch"] == "1" and float(partial["test.global.vocals"]) == pytest.approx(
        entry["test"]["nsdr_vocals"])
    assert float(partial["test.museval.mean"]) == pytest.approx(entry["test"]["sdr"])
    assert rows[workdir["umx"]]["test.museval.mean"] == "" and rows[workdir["umx"]]["test.global.mean"] != ""
    assert partial["test_set"] == "toy (dset.toy.test_tracks=2)"
    assert {rows[workdir[name]]["test_set"] for name in ("umx", "xumx")} == {"toy (dset.toy.test_tracks=1)"}
    markdown = (out_dir / "compare.md").read_text()
    assert markdown.count("## Test set: ") == 2 and "**Warning**" in markdown
    first, second = markdown.split("## Test set: toy (dset.toy.test_tracks=2)")
    assert workdir["partial"] in second and workdir["umx"] not in second
    assert "test.museval.mean" in second and "test.museval" not in first  # a group shows the scores it has
    assert (out_dir / "compare.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_a_grid_lists_its_xps_run_or_not_under_the_outputs_folder(workdir, capsys, monkeypatch):
    code, out, err = compare(workdir, capsys, monkeypatch, "--grid", "smoke")
    assert code == 0, err
    rows = {row["xp"]: row for row in read_csv(workdir["path"] / "outputs" / "compare" / "grid_smoke" / "compare.csv")}
    assert len(rows) == 4  # the smoke grid's umx and xumx XPs are the ones trained above
    assert rows[workdir["umx"]]["status"] == rows[workdir["xumx"]]["status"] == "done"
    others = [row for sig, row in rows.items() if sig not in (workdir["umx"], workdir["xumx"])]
    assert {row["family"] for row in others} == {"hdemucs", "umx"}
    assert all(row["status"] == "not started" and row["epochs"] == "0" for row in others)
    assert "model.channels" in next(iter(rows.values()))  # hdemucs' overrides differ from the others'


@pytest.mark.parametrize("args, message", [
    (["deadbeef"], "unknown experiment deadbeef: no folder"),
    (["nothex"], "SIG='nothex' is not an experiment signature"),
    (["--grid", "nosuch"], "no grid named 'nosuch'"),
    ([], "give either signatures or --grid NAME"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, monkeypatch, args, message):
    (with_grids(tmp_path) / "outputs" / "xps").mkdir(parents=True)
    code, out, err = compare({"path": tmp_path}, capsys, monkeypatch, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("demixlab: error: ") and message in err
