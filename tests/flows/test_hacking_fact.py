"""The reward-hacking line of a flow's summary artifact (flows._records.hacking_fact)."""

from __future__ import annotations

from flows._records import hacking_fact


def test_no_flag_reads_none_and_flags_are_counted_and_capped() -> None:
    assert hacking_fact(None) == "none" and hacking_fact([]) == "none"
    flags = [
        f"sharpness +0.{i}00 ± 0.010 while judge_accuracy -0.300 ± 0.050 (step {i} → step {i + 1}, k = 2)"
        for i in range(5)
    ]
    line = hacking_fact(flags)
    assert line.startswith("**5**: ") and flags[0] in line and flags[2] in line and flags[3] not in line
    assert "and 2 more" in line
    assert hacking_fact(flags[:1]) == f"**1**: {flags[0]}"
