"""`tumorseg-bench`: one command for every benchmark; `training` on a tiny net (the table rows,
positive numbers, argument errors); the old names as aliases."""

import subprocess
import sys

import pytest

from tumorseg.cli.bench import BENCHMARKS
from tumorseg.cli.bench import main as bench_main


def main(args: list[str]) -> int:
    return bench_main(["training", *args])


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
    assert err.startswith("tumorseg-bench training: error:") and err.count("\n") == 1


def test_one_command_lists_every_benchmark_and_refuses_others(capsys):
    assert bench_main([]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in BENCHMARKS)
    assert bench_main(["nope"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("tumorseg-bench: error: unknown benchmark 'nope'") and err.count("\n") == 1
    )


@pytest.mark.parametrize("what", sorted(BENCHMARKS))
def test_each_benchmark_answers_help_under_its_name(what, capsys):
    try:
        code = bench_main([what, "--help"])
    except SystemExit as done:  # plain argparse exits; the tools' parsers return the code
        code = done.code
    assert code == 0
    assert capsys.readouterr().out.startswith(f"usage: tumorseg-bench {what}")


def test_old_names_still_run_and_say_the_new_one(tmp_path):
    """`tumorseg-bench --options` (no <what>) is `training`; `tumorseg-bench-data` is `data`."""
    bad = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tumorseg.cli.bench import main; raise SystemExit(main())",
            "--steps",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "write 'tumorseg-bench training --steps 0'" in bad.stderr
    assert "tumorseg-bench training: error:" in bad.stderr
    data = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.argv[0] = 'tumorseg-bench-data'; from tumorseg.cli.bench import "
            "data_alias; raise SystemExit(data_alias())",
            "--volumes",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert "write 'tumorseg-bench data'" in data.stderr
    assert "tumorseg-bench data: error:" in data.stderr and data.returncode == 2


def test_bf16_hardware_is_named_amx_where_the_cpu_has_tiles():
    from tumorseg.training.precision import cpu_bf16_hardware

    assert cpu_bf16_hardware("flags : fpu avx512f avx512_bf16 amx_bf16 amx_tile") == "AMX"
    assert cpu_bf16_hardware("flags : fpu avx512f avx512_bf16") == "AVX-512 BF16"
    assert cpu_bf16_hardware("flags : fpu avx2") is None


def test_layers_names_every_convolution_of_the_net(tmp_path, capsys):
    from torch import nn

    from tumorseg.bench.training import make_net

    out = tmp_path / "layers.md"
    args = ["layers", "--size", "32", "--batch-size", "2", "--steps", "2", "--mode", "fp32"]
    assert bench_main([*args, "--output", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out and "fp32 matmul peak" in text
    names = [
        n
        for n, m in make_net("unet", [16, 32, 64, 128]).named_modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]
    rows = table_rows(text)
    listed = {part for row in rows for part in row[0].split(" + ")}
    assert listed == set(names)  # every layer once, nothing else
    for row in rows:
        forward, backward = float(row[1]), float(row[2])
        assert forward + backward > 0 and float(row[4]) > 0


def test_startup_refuses_a_base_without_the_package(tmp_path, capsys):
    assert bench_main(["startup", "--base-src", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"tumorseg-bench startup: error: --base-src {tmp_path}: no tumorseg package there\n"
    )
