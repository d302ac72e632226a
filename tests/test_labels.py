"""Tests of phenotype label loading (bids_regionmae.bids.labels)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bids_regionmae.bids.labels import detect_kind, load_labels, participants_file_candidates
from bids_regionmae.errors import (
    EXIT_INPUT_MISSING,
    EXIT_USAGE,
    InputDataError,
    InputMissingError,
    UsageError,
)


def write_tsv(path: Path, header: list[str], rows: list[list[str]], sep: str = "\t") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sep.join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def participants(tmp_path: Path) -> Path:
    rows = [
        ["sub-01", "1", "ADHD", "10.5", "A", "0"],
        ["sub-02", "0", "TDC", "12.25", "A", "1"],
        ["sub-03", "1", "ADHD", "9.0", "B", "2"],
        ["sub-04", "n/a", "TDC", "n/a", "B", "3"],
        ["sub-05", "", "n/a", "11", "", "0"],
        ["sub-06", "0", "TDC", "14", "C", "1"],
        ["sub-07", "0", "TDC", "8.5", "C", "2"],
        ["sub-08", "1", "ADHD", "13", "C", "3"],
    ]
    return write_tsv(tmp_path / "raw" / "participants.tsv",
                     ["participant_id", "dx", "group", "age", "site", "subtype"], rows)


def test_binary_numeric_with_exclusions(participants):
    labels = load_labels(participants, target="dx")
    assert labels.kind == "binary" and labels.classes == [0, 1]
    assert labels.values == {"01": 1, "02": 0, "03": 1, "06": 0, "07": 0, "08": 1}
    assert set(labels.excluded) == {"04", "05"}
    assert "missing 'dx' value ('n/a')" in labels.excluded["04"]
    assert "'empty'" in labels.excluded["05"]
    assert labels.encoded()["01"] == 1.0 and labels.counts() == {0: 3, 1: 3}
    assert labels.source == participants and "binary" in labels.summary()


def test_binary_text_multiclass_and_continuous(participants):
    text = load_labels(participants, target="group")
    assert text.kind == "binary" and text.classes == ["TDC", "ADHD"] and text.values["04"] == "TDC"
    assert text.encoded()["02"] == 0.0 and text.encoded()["01"] == 1.0  # ADHD (classes[1]) is positive
    multi = load_labels(participants, target="subtype")
    assert multi.kind == "multiclass" and multi.classes == [0, 1, 2, 3] and multi.values["08"] == 3
    cont = load_labels(participants, target="age")
    assert cont.kind == "continuous" and cont.classes == [] and cont.values["02"] == 12.25
    assert "04" in cont.excluded and cont.counts() == {}


def test_participants_selection_and_missing_rows(participants):
    labels = load_labels(participants, target="dx", participants=["sub-01", "02", "99"])
    assert labels.values == {"01": 1, "02": 0}
    assert labels.excluded == {"99": "no row in participants.tsv"}


def test_numeric_ids_match_despite_padding(tmp_path):
    csv = write_tsv(tmp_path / "pheno.csv", ["ScanDir ID", "DX"], [["10001", "0"], ["10002", "1"],
                                                                   ["10003", "1"]], sep=",")
    labels = load_labels(csv, target="DX", participants=["0010001", "0010002", "0010004"])
    assert labels.values == {"0010001": 0, "0010002": 1} and "0010004" in labels.excluded


def test_groups(participants):
    labels = load_labels(participants, target="dx", group_column="site")
    assert labels.groups == {"01": "A", "02": "A", "03": "B", "06": "C", "07": "C", "08": "C"}
    with pytest.raises(UsageError, match="group column 'scanner' not found"):
        load_labels(participants, target="dx", group_column="scanner")


def test_missing_group_value_excludes(tmp_path):
    path = write_tsv(tmp_path / "p.tsv", ["participant_id", "y", "site"],
                     [["sub-1", "a", "X"], ["sub-2", "b", "n/a"], ["sub-3", "b", "Y"]])
    labels = load_labels(path, target="y", group_column="site")
    assert set(labels.values) == {"1", "3"} and "site" in labels.excluded["2"]


def test_unknown_column_lists_available(participants):
    with pytest.raises(UsageError) as exc:
        load_labels(participants, target="diagnosis")
    assert exc.value.exit_code == EXIT_USAGE
    assert "participant_id, dx, group, age, site, subtype" in str(exc.value)


def test_candidates_order_and_fallback(tmp_path, participants):
    raw = participants.parent
    fmriprep = tmp_path / "fmriprep"
    write_tsv(fmriprep / "participants.tsv", ["participant_id", "sex"], [["sub-01", "F"], ["sub-02", "M"]])
    pheno = write_tsv(tmp_path / "pheno.csv", ["participant_id", "iq"],
                      [["sub-01", "100"], ["sub-02", "110"], ["sub-03", "95"]], sep=",")
    candidates = participants_file_candidates(fmriprep, raw, pheno)
    assert candidates == [pheno, raw / "participants.tsv", fmriprep / "participants.tsv"]
    assert load_labels(*candidates, target="iq").source == pheno
    assert load_labels(*candidates, target="dx").source == raw / "participants.tsv"
    assert load_labels(*candidates, target="sex").source == fmriprep / "participants.tsv"
    with pytest.raises(InputMissingError) as exc:
        participants_file_candidates(fmriprep, raw, tmp_path / "nope.tsv")
    assert exc.value.exit_code == EXIT_INPUT_MISSING
    with pytest.raises(InputMissingError, match="no participants table found"):
        load_labels(tmp_path / "a.tsv", tmp_path / "b.tsv", target="dx")


def test_single_class_and_no_usable_values(tmp_path):
    path = write_tsv(tmp_path / "p.tsv", ["participant_id", "y", "z"],
                     [["sub-1", "1", "n/a"], ["sub-2", "1", ""]])
    with pytest.raises(InputDataError, match="only one distinct value"):
        load_labels(path, target="y")
    with pytest.raises(InputDataError, match="no participant has a usable 'z' value"):
        load_labels(path, target="z")


def test_conflicting_duplicates_and_kind_override(tmp_path):
    path = write_tsv(tmp_path / "p.tsv", ["participant_id", "score"],
                     [["sub-1", "1"], ["sub-1", "2"], ["sub-2", "3"], ["sub-2", "3"], ["sub-3", "4"],
                      ["sub-4", "3"], ["sub-5", "4"], ["sub-6", "3"]])
    labels = load_labels(path, target="score")
    assert labels.kind == "binary" and labels.classes == [3, 4]
    assert "conflicting rows" in labels.excluded["1"] and labels.values["2"] == 3
    forced = load_labels(path, target="score", kind="continuous")
    assert forced.kind == "continuous" and forced.values["3"] == 4.0
    with pytest.raises(UsageError):
        load_labels(path, target="score", kind="ordinal")


def test_detect_kind_rules():
    assert detect_kind(["1", "2", "3", "1", "2", "3"]) == ("multiclass", [1, 2, 3])
    assert detect_kind(["7", "8", "9", "10"])[0] == "continuous"  # too few samples per value
    assert detect_kind(["0.5", "1.5"]) == ("binary", [0.5, 1.5])
    assert detect_kind(["a", "b", "c"]) == ("multiclass", ["a", "b", "c"])
    assert detect_kind([str(v) for v in range(30)] * 2)[0] == "continuous"


def test_bom_and_sniffed_delimiter(tmp_path):
    path = tmp_path / "pheno.txt"
    path.write_text("\ufeffparticipant_id;dx\nsub-1;yes\nsub-2;no\n", encoding="utf-8")
    labels = load_labels(path, target="dx")
    assert labels.values == {"1": "yes", "2": "no"} and labels.kind == "binary"


def test_control_group_is_the_negative_class():
    from bids_regionmae.bids.labels import detect_kind

    assert detect_kind(["ADHD", "control", "ADHD"]) == ("binary", ["control", "ADHD"])
    assert detect_kind(["patient", "HC"]) == ("binary", ["HC", "patient"])
    assert detect_kind(["a", "b", "a"]) == ("binary", ["a", "b"])  # no control-like name: sorted
    assert detect_kind(["1", "0", "1"]) == ("binary", [0, 1])
