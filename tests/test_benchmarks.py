"""The benchmarks' own rules, where a slip would misreport a result (benchmarks/ is not a package)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sublayer  # noqa: E402


def test_covering_point_is_chosen_as_its_study_ranks_it() -> None:
    """A confirming study ranks by the confirmed figure: the match must too, not by the 4096-token one."""
    method = {"removal": "a6,a7", "params_reduction": 0.05, "calib_ppl_ratio": 1.10, "test_ppl_ratio": 1.12}
    small = {"removal": "a5", "params_reduction": 0.01, "ppl_ratio": 1.01, "test_ppl_ratio": 1.02}
    noisy = {
        "removal": "14",
        "params_reduction": 0.06,
        "ppl_ratio": 1.08,
        "confirmed_ppl_ratio": 1.11,
        "test_ppl_ratio": 1.13,
    }
    held = {
        "removal": "a6,a8",
        "params_reduction": 0.05,
        "ppl_ratio": 1.09,
        "confirmed_ppl_ratio": 1.09,
        "test_ppl_ratio": 1.10,
    }
    (row,) = sublayer.compare([method], [small, noisy, held], "calib_ppl_ratio")
    assert row["match"] == "a6,a8" and row["match_confirmed"] == 1.09
    assert abs(row["test_gain"] - (1.12 / 1.10 - 1)) < 1e-12
    # Without confirmation the calibration figure decides, and a point smaller than the method's never covers it.
    (row,) = sublayer.compare(
        [method], [small, {k: v for k, v in noisy.items() if k != "confirmed_ppl_ratio"}], "calib_ppl_ratio"
    )
    assert row["match"] == "14" and row["match_confirmed"] is None
    (row,) = sublayer.compare([method], [small], "calib_ppl_ratio")
    assert row["match"] is None and row["test_gain"] is None
    assert sublayer._tally([row]) == "0 better by >= 1 %, 0 within, 0 worse by > 0.5 %, 1 uncovered"
