"""SAELens's own code against our dictionary files, both ways (slow: the first run builds SAELens's environment).

SAELens 6.x needs transformer-lens < 4, so it runs in its own virtual environment (benchmarks/saelens_env.py,
cached under ~/.cache/interp/saelens-venv); dictionaries, inputs and encodings travel as files.
benchmarks/saelens_interop.py does the work and prints the same comparison as a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives beside the packages

from benchmarks import saelens_env  # noqa: E402


@pytest.mark.slow
def test_saelens_reads_ours_and_we_read_saelens(tmp_path):
    try:
        saelens_env.saelens_python()
    except saelens_env.SAELensEnvError as err:
        pytest.skip(f"could not build SAELens's environment (needs PyPI for {saelens_env.SAELENS_SPEC}): "
                    f"{str(err).splitlines()[0]}")
    from benchmarks.saelens_interop import LEGACY, OURS, THEIRS, compare, format_table

    rows, versions = compare(tmp_path)
    print(versions)
    print(format_table(rows))
    assert versions["sae-lens"].startswith("6.")
    assert [r["dictionary"] for r in rows] == [n for n, _ in OURS + LEGACY] + [n for n, _, _ in THEIRS]
    for row in rows:
        assert row["max_abs_diff_acts"] <= 1e-6 and row["max_abs_diff_recons"] <= 1e-6, row
        assert row["mean_l0"] > 1, row  # the codes compared are not all zero
    by_name = {(r["direction"], r["dictionary"]): r for r in rows}
    assert by_name["ours -> SAELens", "batchtopk"]["saelens_architecture"] == "jumprelu"
    assert by_name["SAELens -> ours", "skip-transcoder"]["ours_architecture"] == "relu"
