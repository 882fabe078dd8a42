"""Clinical efficacy (r2gen.clinical, `r2gen-launch ce`): the published R2Gen's CE from the CheXpert labeler's
two CSV files (blank and uncertain count as negative; scikit-learn's precision, recall and F1, macro and
micro; per-observation AUROC and its mean), checked against values worked out by hand; bad files get exit 2
with the file, line and column named."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from child_env import run_cli
from r2gen.clinical import check_pair, clinical_efficacy, read_labelled, write_labeler_inputs
from r2gen.errors import UsageError

HEADER = ["Reports", "Atelectasis", "Cardiomegaly", "Edema"]
TRUTH = [["the truth 1", "1", "", "0"], ["the truth 2", "1.0", "-1.0", "1.0"], ["the truth 3", "0", "1", "1"],
         ["the truth 4", "", "1", "0"]]         # as 0/1: [1,0,0] [1,0,1] [0,1,1] [0,1,0]
GENERATED = [["gen 1", "1", "1", ""], ["gen 2", "0", "", "1"], ["gen 3", "0", "1", "-1"],
             ["gen 4", "1.0", "0.0", "0"]]      # as 0/1: [1,1,0] [0,0,1] [0,1,0] [1,0,0]


def _csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_the_published_scores_worked_out_by_hand(tmp_path: Path) -> None:
    """Per observation (TP, FP, FN): Atelectasis (1, 1, 1): P = R = F1 = 1/2; Cardiomegaly (1, 1, 1): 1/2 each;
    Edema (1, 0, 1): P 1, R 1/2, F1 2/3. Macro: P 2/3, R 1/2, F1 5/9. Micro (3, 2, 3): P 3/5, R 1/2, F1 6/11.
    AUROC of 0/1 predictions is (1 + TPR - FPR) / 2: 1/2, 1/2, 3/4; mean 7/12."""
    truth = read_labelled(_csv(tmp_path / "gts.csv", TRUTH), "--truth")
    generated = read_labelled(_csv(tmp_path / "res.csv", GENERATED), "--generated")
    assert truth.labels == ((1, 0, 0), (1, 0, 1), (0, 1, 1), (0, 1, 0))
    check_pair(truth, generated)
    ce = clinical_efficacy(truth, generated)
    assert ce["macro"] == pytest.approx({"precision": 2 / 3, "recall": 1 / 2, "f1": 5 / 9})
    assert ce["micro"] == pytest.approx({"precision": 3 / 5, "recall": 1 / 2, "f1": 6 / 11})
    assert ce["auroc_mean"] == pytest.approx(7 / 12)
    assert ce["observations"]["Edema"] == pytest.approx({"precision": 1, "recall": 1 / 2, "f1": 2 / 3, "support": 2,
                                                         "auroc": 3 / 4})
    assert ce["observations"]["Atelectasis"]["support"] == 2 and ce["studies"] == 4


def test_an_observation_of_one_class_has_no_auroc(tmp_path: Path) -> None:
    """All true Edema labels negative: no AUROC (the published code stops there), left out of the mean;
    its precision, recall and F1 are 0 (scikit-learn's zero_division=0), inside the macro averages."""
    truth_rows = [row[:3] + ["0"] for row in TRUTH]
    truth = read_labelled(_csv(tmp_path / "gts.csv", truth_rows), "--truth")
    generated = read_labelled(_csv(tmp_path / "res.csv", GENERATED), "--generated")
    ce = clinical_efficacy(truth, generated)
    assert ce["observations"]["Edema"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "auroc": None}
    assert ce["auroc_mean"] == pytest.approx(1 / 2)
    assert ce["macro"]["f1"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)


@pytest.mark.parametrize("rows,header,message", [
    ([["gen 1", "1", "yes", "0"]], HEADER, "line 2, column 'Cardiomegaly': 'yes' is not 1, 0, -1 or blank"),
    ([["gen 1", "2", "0", "0"]], HEADER, "line 2, column 'Atelectasis': '2'"),
    ([["gen 1", "1", "0"]], HEADER, "line 2: 3 cells, the header has 4"),
    ([["gen 1", "1", "0", "0"]], ["Text", *HEADER[1:]], "the first column is 'Text'"),
    ([], HEADER, "has no labelled reports"),
])
def test_a_bad_labelled_file_is_named_with_its_line_and_column(tmp_path: Path, rows, header, message) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        read_labelled(_csv(tmp_path / "res.csv", rows, header), "--generated")


def test_two_files_of_other_studies_or_observations_are_refused(tmp_path: Path) -> None:
    truth = read_labelled(_csv(tmp_path / "gts.csv", TRUTH), "--truth")
    fewer = read_labelled(_csv(tmp_path / "res3.csv", GENERATED[:3]), "--generated")
    with pytest.raises(UsageError, match="labels 3 reports.*4"):
        check_pair(truth, fewer)
    other = read_labelled(_csv(tmp_path / "other.csv", GENERATED, [*HEADER[:3], "Fracture"]), "--generated")
    with pytest.raises(UsageError, match="column 4: 'Fracture' vs 'Edema'"):
        check_pair(truth, other)
    written = [{"id": f"s{i}", "ground_truth": t[0], "generated": g[0]} for i, (t, g) in enumerate(zip(TRUTH, GENERATED))]
    generated = read_labelled(_csv(tmp_path / "res.csv", GENERATED), "--generated")
    check_pair(truth, generated, written)  # the order the inputs were written in
    swapped = read_labelled(_csv(tmp_path / "swapped.csv", [GENERATED[1], GENERATED[0], *GENERATED[2:]]),
                            "--generated")
    with pytest.raises(UsageError, match="line 2 is not study s0's report"):
        check_pair(truth, swapped, written)


def test_reports_that_are_not_an_evaluations_are_refused(tmp_path: Path) -> None:
    from r2gen.clinical import read_written

    records = [{"id": "a", "generated": "g", "ground_truth": "t"}]
    (tmp_path / "run.json").write_text(json.dumps(records))
    (tmp_path / "evaluate.json").write_text(json.dumps({"split": "test", "reports": records}))
    assert read_written(tmp_path / "run.json") == read_written(tmp_path / "evaluate.json") == records
    (tmp_path / "other.json").write_text(json.dumps({"reports": [{"id": "a"}]}))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UsageError, match="--reports: .*other.json is not an evaluation's reports"):
        read_written(tmp_path / "other.json")
    with pytest.raises(UsageError, match="--reports: .*broken.json cannot be read as JSON"):
        read_written(tmp_path / "broken.json")


def test_the_labelers_inputs_hold_one_report_per_row_in_order(tmp_path: Path) -> None:
    records = [{"id": "a", "generated": 'the heart is normal, "no" effusion.', "ground_truth": "line one"},
               {"id": "b", "generated": "", "ground_truth": "two, with a comma"}]
    generated, truth = write_labeler_inputs(records, tmp_path / "test_epoch003")
    assert generated.name == "test_epoch003.generated.csv" and truth.name == "test_epoch003.truth.csv"
    with open(generated, newline="") as f:
        assert [row for row in csv.reader(f)] == [[records[0]["generated"]], [""]]
    with open(truth, newline="") as f:
        assert [row[0] for row in csv.reader(f)] == ["line one", "two, with a comma"]


def test_the_ce_command_prints_and_writes_the_scores(tmp_path: Path) -> None:
    gts, res = _csv(tmp_path / "gts.csv", TRUTH), _csv(tmp_path / "res.csv", GENERATED)
    result = run_cli(["ce", "--generated", str(res), "--truth", str(gts)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((tmp_path / "ce.json").read_text())
    assert written["micro"]["f1"] == pytest.approx(6 / 11) and written["studies"] == 4
    assert "Cardiomegaly" in result.stdout and "micro" in result.stdout
    bad = run_cli(["ce", "--generated", str(res), "--truth", str(tmp_path / "missing.csv")], tmp_path)
    assert bad.returncode == 2 and "--truth" in bad.stderr and "missing.csv" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
