"""The one Markdown table formatter (licforge.tables): fixed width or compact, escaped cells."""
import pytest

from licforge.tables import markdown_table


def test_aligned_and_compact_tables():
    rows = [["16/16", "8x8", 156], ["8/8", "a|b", None]]
    assert markdown_table(["N/M", "PI x PO", "mults"], rows).split("\n") == [
        "| N/M   | PI x PO | mults |",
        "| ----- | ------- | ----- |",
        "| 16/16 | 8x8     | 156   |",
        "| 8/8   | a\\|b    | None  |",
    ]
    assert markdown_table(["a", "b"], [[1, "x\ny"]], aligned=False).split("\n") == [
        "| a | b |", "| --- | --- |", "| 1 | x y |"]


def test_a_short_row_is_refused():
    with pytest.raises(ValueError, match="table row 1 has 1 cells for 2 columns"):
        markdown_table(["a", "b"], [[1, 2], [3]])
