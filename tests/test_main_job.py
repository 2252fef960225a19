"""The main job as CI runs it (``python -m groupnorm --quick``): the correctness table, the
speed table with its summary, the plot; the compile notices and the compile-ahead process."""
import importlib.util

import pytest
import torch
from numba import njit

import groupnorm.__main__ as main_job
from groupnorm.backends.numba_cpu.warmup import compile_notices
from groupnorm.bench import overview
from groupnorm.bench.compile_ahead import CompileAhead
from groupnorm.bench.suite import QUICK_SUITE

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_quick_main_job_prints_checks_speed_summary_and_plot(tmp_path, capsys):
    plot = tmp_path / "speed.png"
    argv = ["--quick", "--no-compile", "--dtypes", "float32", "--budget", "0.01"]
    if HAS_MATPLOTLIB:
        argv += ["--plot", str(plot)]
    assert main_job.main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("groupnorm main job, ") and "commit " in lines[0]
    checks = [line for line in lines if line.endswith("| PASS |")]
    assert len(checks) == len(QUICK_SUITE) * 2                 # every case in both layouts
    assert not any(line.endswith("| FAIL |") for line in lines)
    assert overview.HEADER.splitlines()[0] in out
    speed = [line for line in lines if line.startswith("| ") and line.count("|") == 11 and "x |" in line]
    assert len(speed) == 2 * 2                                  # QUICK_SUITE[:2] x (nchw, nhwc)
    for line in speed:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[6]) > 0      # forward and training-step ms
        assert cells[4].endswith("x") and float(cells[4][:-1]) > 0
        assert cells[5] == "-" and cells[8] == "-"              # --no-compile: no peer columns
    assert "Against torch eager (4 rows, geometric mean): forward " in out
    assert "Against torch.compile: not measured; share of the memory floor: forward " in out
    assert "Worst row: " in out
    assert "all 6 correctness checks passed" in out
    if HAS_MATPLOTLIB:
        assert plot.stat().st_size > 10_000
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_check_fails_the_job(monkeypatch, capsys):
    real = main_job.check_case

    def wrong(*args, **kwargs):
        row = real(*args, **kwargs)
        return dict(row, ok=False)

    monkeypatch.setattr(main_job, "check_case", wrong)
    assert main_job.main(["--quick", "--no-bench", "--dtypes", "float32"]) == 1
    out = capsys.readouterr()
    assert "| FAIL |" in out.out and "correctness check(s) FAILED" in out.err


def test_gpu_rows_map_onto_the_table():
    # bench.gpu's rows on a CPU tensor (its timing works on any device): the columns the
    # main job reads from them, and the floor share from its copy bandwidth.
    row = overview.gpu_row(QUICK_SUITE[0], torch.float32, "nhwc", compile_peer=False, device="cpu")
    assert (row.case, row.dtype, row.layout) == (QUICK_SUITE[0].name, "float32", "nhwc")
    assert row.fwd_us > 0 and row.train_us > 0 and row.fwd_vs_eager > 0 and row.train_vs_eager > 0
    assert row.fwd_vs_compile is None and row.train_vs_compile is None
    assert abs(row.fwd_floor - row.fwd_gbps / row.floor_gbps) < 1e-9
    assert "| nhwc |" in overview.format_row(row)


def _row(name, fwd_eager, train_eager, fwd_compile=None, train_compile=None):
    return overview.Row(name, (1, 2), "float32", "nchw", 100.0, 300.0, fwd_eager, train_eager, fwd_compile,
                        train_compile, 0.5, 0.25, 10.0, 5.0, 20.0)


def test_summary_is_geometric_means_and_the_worst_cell():
    rows = [_row("a", 2.0, 1.0, 4.0, 1.5), _row("b", 0.5, 4.0, 1.0, 0.6)]
    lines = overview.summary(rows).splitlines()
    assert len(lines) == 3
    assert lines[0] == "Against torch eager (2 rows, geometric mean): forward 1.00x, training step 2.00x"
    assert lines[1] == ("Against torch.compile (2 rows): forward 2.00x, training step 0.95x; "
                        "share of the memory floor: forward 50%, training step 25%")
    assert lines[2] == "Worst row: b float32 nchw, forward vs eager 0.50x"


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed")
def test_plot_of_rows(tmp_path):
    from groupnorm.bench.plot import plot_rows

    path = tmp_path / "rows.png"
    plot_rows([_row("a", 2.0, 1.0, 4.0, 1.5), _row("b", 0.5, 4.0)], str(path), "title")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000


def _as_ours(fn):
    fn.__module__ = "groupnorm.backends.numba_cpu.test_only"
    return fn


def test_compile_notices_report_outermost_compiles_of_our_kernels_only():
    inner = njit(_as_ours(lambda v: v * 2.0))

    def outer_py(v):
        return inner(v) + 1.0
    outer = njit(_as_ours(outer_py))
    foreign = njit(lambda v: v - 1.0)
    heard = []
    with compile_notices(lambda name, seconds: heard.append((name, seconds))):
        assert outer(1.5) == 4.0        # compiles outer, and inner inside it
        assert foreign(1.5) == 0.5      # not ours: quiet
        assert outer(2.5) == 6.0        # compiled already: quiet
    assert [name for name, _ in heard] == ["outer_py", "outer_py"]
    assert heard[0][1] is None and heard[1][1] >= 0.0
    heard.clear()
    assert outer(1) == 3.0              # a new signature, after the block: nobody listens
    assert heard == []


def test_compile_ahead_runs_units_in_a_second_process(monkeypatch):
    # The reference backend in the child: no Numba compile, so this stays fast on a cold cache.
    monkeypatch.setenv("GROUPNORM_BACKEND_CPU", "reference")
    ahead = CompileAhead([["calls", (2, 4, 3, 3), 2, "float32", "float32", "nchw"],
                          ["calls", (1, 6, 2, 2, 2), 3, "bfloat16", "float32", "nhwc"]])
    try:
        ahead.wait_for(1)
        ahead.wait_for(None)
        assert ahead.done == {0, 1}
    finally:
        ahead.close()


def test_compile_ahead_ending_early_does_not_hang(monkeypatch):
    monkeypatch.setenv("GROUPNORM_BACKEND_CPU", "reference")
    ahead = CompileAhead([["calls", (2, 4, 3, 3), 2, "float32", "float32", "nchw"],
                          ["calls", (2, 4, 3, 3), 2, "no_such_dtype", "float32", "nchw"],
                          ["calls", (2, 4, 3, 3), 2, "float32", "float32", "nchw"]])
    try:
        ahead.wait_for(None)             # returns once the child has failed on unit 1
        assert ahead.done == {0} and not ahead.running
    finally:
        ahead.close()


def test_ahead_units_leave_the_first_dtype_to_the_main_process():
    args = main_job.parse(["--dtypes", "float32,bfloat16"])
    checks = [(case, dtype, layout) for dtype in (torch.float32, torch.bfloat16) for case in QUICK_SUITE
              for layout in ("nchw", "nhwc")]
    plan = main_job._bench_plan(args)
    units, owned = main_job.ahead_units(args, checks, plan)
    n = len(QUICK_SUITE) * 2
    assert sorted(owned) == list(range(n, 2 * n))              # the bfloat16 checks ...
    assert [units[owned[i]] for i in range(n, 2 * n)] == [
        ["calls", case.shape, case.num_groups, "bfloat16", "float32", layout] for case, _, layout in checks[n:]]
    calls = units[n:n + len(plan)]                              # ... every speed row, largest first ...
    sizes = [torch.Size(u[1]).numel() for u in calls]
    assert sizes == sorted(sizes, reverse=True) and all(u[0] == "calls" and u[3] == u[4] == "float32" for u in calls)
    assert units[n + len(plan):] == [                           # ... then the rows' torch.compile peers
        ["peers", case.shape, case.num_groups, "float32", layout] for case, _, layout in plan]
    no_peer = main_job.parse(["--dtypes", "float32,bfloat16", "--no-compile"])
    assert len(main_job.ahead_units(no_peer, checks, plan)[0]) == n + len(plan)
    quick = main_job.parse(["--quick", "--no-compile"])        # the checks' own shapes: nothing ahead
    assert main_job.ahead_units(quick, checks[:n], main_job._bench_plan(quick)) == ([], {})
