"""`fastmix info` and `fastmix bench`: what a user runs first to see what the install gives."""
from fastmix.cli import main
from fastmix.ops import _backends


def test_info_lists_versions_and_backend_per_op(capsys):
    main(["info"])
    out = capsys.readouterr().out
    assert "torch:" in out and "compiled extension:" in out
    for op in ("rowwise_bilinear", "ghost_dots", "batched_svd"):
        line = next(line for line in out.splitlines() if line.strip().startswith(op + ":"))
        assert line.split()[1] == _backends.choose(op, "cpu")


def test_bench_times_every_backend_against_torch(capsys):
    main(["bench", "--device", "cpu", "--rows", "64", "--width", "16", "--domains", "4", "--batch", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["op", "backend", "median", "ms", "speed-up"]
    baselines = [line for line in lines if "torch (baseline)" in line]
    assert len(baselines) == 2 and all(line.endswith("1.00x") for line in baselines)
    if _backends.COMPILED:
        assert sum(line.split()[0] == "cpu" for line in lines) == 2
