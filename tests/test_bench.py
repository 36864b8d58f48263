"""`tumorseg-bench` on a tiny net: the table rows, positive numbers, argument errors."""

import pytest

from tumorseg.bench.training import main


def table_rows(text: str) -> list[list[str]]:
    """Cells of the Markdown table's data rows."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_tiny_run_writes_table(tmp_path, capsys):
    out = tmp_path / "bench.md"
    args = ["--variants", "unet", "--sizes", "32", "--features", "4,8", "--batch-size", "2"]
    args += ["--warmup", "1", "--steps", "2", "--matmul-size", "128", "--output", str(out)]
    assert main(args) == 0

    text = out.read_text()
    assert text in capsys.readouterr().out
    assert "fp32" in text and "GFLOP/s" in text and "threads" in text
    rows = table_rows(text)
    assert [row[:4] for row in rows] == [
        ["unet", "4x32x32", "fp32", "2"],
        ["unet", "4x32x32", "bf16+cl", "2"],
    ]
    for row in rows:
        slices, gflops, percent = map(float, row[4:7])
        assert slices > 0 and gflops > 0 and percent > 0
    assert rows[0][7] == "-"
    assert float(rows[1][7].rstrip("x")) > 0


@pytest.mark.parametrize(
    "args",
    [
        ["--variants", "vgg"],
        ["--sizes", "100"],  # not a multiple of 8 with the default 4 levels
        ["--sizes", "a,b"],
        ["--steps", "0"],
        ["--features", "16"],
        ["--output", "/nonexistent/dir/bench.md"],
        ["--batch-size", "-1"],
        ["--bogus"],
    ],
)
def test_bad_arguments_return_2(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tumorseg-bench: error:") and err.count("\n") == 1
