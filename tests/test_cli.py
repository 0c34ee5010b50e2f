"""``python -m moe_fusion``: errors are one line on stderr with exit status 2 (usage) or 1 (a
failure while running), ``--help`` shows every default, export produces exactly the opsets it
accepts, and the timing summary of the demo and the benchmarks says when a difference is noise."""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from moe_fusion.__main__ import build_parser
from moe_fusion.__main__ import main as moe_fusion_main
from moe_fusion.demo.run import _timing_summary
from moe_fusion.demo.timing import Comparison, group_cpu_seconds, interleave, median_interval, spread
from moe_fusion.launch import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PROG = "python -m moe_fusion"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "moe_fusion", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)


def _one_error_line(stderr: str, command: str) -> str:
    """The message of the single error line in ``stderr`` (and nothing else there)."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    prefix = f"{PROG} {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.setattr(sys, "path", [str(EXAMPLES)] + sys.path)


# -- errors, in a real process: exit status and stderr -------------------------------------------

def test_opset_the_exporter_cannot_produce_is_a_usage_error(tmp_path):
    """Was: a version-converter traceback, then "wrote ..." and exit 0 with an opset-18 model."""
    pytest.importorskip("onnx")
    out = tmp_path / "m.onnx"
    done = _cli("export", "mlp_factory:make_mlp", str(out), "--opset", "9")
    assert done.returncode == 2 and done.stdout == ""
    assert _one_error_line(done.stderr, "export") == (
        "argument --opset: opset 9 is not one the export produces: give 18..25 (default 20)")
    assert not out.exists()


def test_bad_factory_name_is_a_usage_error(tmp_path):
    done = _cli("export", "mlp_factory:no_such_factory", str(tmp_path / "m.onnx"))
    assert done.returncode == 2
    assert _one_error_line(done.stderr, "export") == (
        "module 'mlp_factory' has no function 'no_such_factory' (factory 'mlp_factory:no_such_factory')")


# -- errors, in process: every kind, and the status of each --------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["explain", "mlp_factory"],
     "give the factory as module:function (returning (model, inputs)), got 'mlp_factory'"),
    (["explain", "no_such_module:make"],
     "no module named 'no_such_module' for factory 'no_such_module:make' (is its directory on PYTHONPATH?)"),
    (["explain", "mlp_factory:Mlp.__init__"],
     "module 'mlp_factory' has no function 'Mlp.__init__' (factory 'mlp_factory:Mlp.__init__')"),
    (["export", "mlp_factory:make_mlp", "{tmp}/m.onnx", "--opset", "26"],
     "argument --opset: opset 26 is not one the export produces: give 18..25 (default 20)"),
    (["export", "mlp_factory:make_mlp", "{tmp}/m.onnx", "--opset", "17"],
     "argument --opset: opset 17 is not one the export produces: give 18..25 (default 20)"),
    (["export", "mlp_factory:make_mlp", "{tmp}"],
     "output {tmp} is a directory; give the path of the .onnx file to write"),
    (["export", "mlp_factory:make_mlp", "{tmp}/no_such_dir/m.onnx"],
     "cannot write {tmp}/no_such_dir/m.onnx: {tmp}/no_such_dir is not a directory"),
])
def test_usage_errors_exit_2(examples_on_path, tmp_path, capsys, argv, message):
    if argv[0] == "export":
        pytest.importorskip("onnx")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert moe_fusion_main(argv) == 2
    captured = capsys.readouterr()
    assert _one_error_line(captured.err, argv[0]) == message.format(tmp=tmp_path)


def test_argparse_errors_are_one_line_with_status_2(capsys):
    with pytest.raises(SystemExit) as done:
        moe_fusion_main(["demo", "--layout", "3"])
    assert done.value.code == 2
    assert _one_error_line(capsys.readouterr().err, "demo") == (
        f"argument --layout: give EPxTP such as 2x2 or 4x1, or 'all'; got '3' (see {PROG} demo --help)")


def _factory_module(tmp_path: pathlib.Path, monkeypatch, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_failure_inside_the_factory_exits_1(tmp_path, monkeypatch, capsys):
    name = _factory_module(tmp_path, monkeypatch, "cli_raising_factory",
                           "def make():\n    raise RuntimeError('weights file missing\\nsecond line')\n")
    assert moe_fusion_main(["explain", f"{name}:make"]) == 1
    assert _one_error_line(capsys.readouterr().err, "explain") == (
        "RuntimeError: weights file missing [more with --traceback]")
    with pytest.raises(RuntimeError, match="weights file missing"):
        moe_fusion_main(["--traceback", "explain", f"{name}:make"])


def test_missing_import_inside_the_factory_module_is_not_a_usage_error(tmp_path, monkeypatch, capsys):
    """The factory's module exists but imports something missing: its error, exit status 1."""
    name = _factory_module(tmp_path, monkeypatch, "cli_factory_with_missing_import",
                           "import no_such_dependency_xyz\n\ndef make():\n    pass\n")
    assert moe_fusion_main(["explain", f"{name}:make"]) == 1
    assert _one_error_line(capsys.readouterr().err, "explain") == (
        "ModuleNotFoundError: No module named 'no_such_dependency_xyz'")


def test_factory_returning_the_wrong_thing_is_a_usage_error(tmp_path, monkeypatch, capsys):
    name = _factory_module(tmp_path, monkeypatch, "cli_model_only_factory", "def make():\n    return 1\n")
    assert moe_fusion_main(["explain", f"{name}:make"]) == 2
    assert _one_error_line(capsys.readouterr().err, "explain") == (
        f"factory '{name}:make' must return (model, inputs), returned int")


# -- --help ------------------------------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_shows_every_default():
    """Every option of every command ends its help with its default (a flag's: off)."""
    parser = build_parser()
    for name, sub in [("", parser)] + list(_subparsers(parser).items()):
        options = [a for a in sub._actions if a.option_strings and a.default is not argparse.SUPPRESS]
        assert options or name == "bench", name
        for action in options:
            rendered = " ".join(sub._get_formatter()._format_action(action).split())
            assert rendered in " ".join(sub.format_help().split())
            shown = "off" if action.nargs == 0 else str(action.default)
            assert rendered.endswith(f"(default: {shown})"), (name, rendered)


def test_demo_help_in_a_process_shows_defaults():
    done = _cli("demo", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for shown in ("(default: deepspeed-bmm)", "(default: all)", "(default: 256)", "(default: 20)",
                  "(default: inductor)"):
        assert shown in text


def test_bench_script_help_shows_defaults(monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))     # bench puts benchmarks/ on it
    monkeypatch.setattr(sys, "argv", list(sys.argv))     # and gives the script its arguments
    with pytest.raises(SystemExit) as done:
        moe_fusion_main(["bench", "local_ops", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--repeats REPEATS timed calls of each kernel and baseline (update_expert: 50x as many) (default: 7)" in text
    assert "(default: off)" in text


# -- export: the opsets it accepts are the ones it produces ------------------------------------

@pytest.mark.parametrize("end", ["MIN_OPSET", "MAX_OPSET"])
def test_export_produces_each_end_of_its_opset_range(examples_on_path, tmp_path, capsys, end):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import torch
    from mlp_factory import make_mlp

    from moe_fusion.onnx.export import MAX_OPSET, MIN_OPSET

    opset = {"MIN_OPSET": MIN_OPSET, "MAX_OPSET": MAX_OPSET}[end]
    out = tmp_path / "m.onnx"
    assert moe_fusion_main(["export", "mlp_factory:make_mlp", str(out), "--opset", str(opset)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: ")
    model = onnx.load(str(out))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset
    onnx.checker.check_model(model, full_check=True)
    mlp, (x,) = make_mlp()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {model.graph.input[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), mlp(x).detach(), atol=1e-5, rtol=1e-5)


# -- the timing summary ------------------------------------------------------------------------

def _busy(seconds: float) -> None:
    """Spin on this process's CPU clock for ``seconds`` of CPU time."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


def _cpu_timings(rank: int, world: int) -> tuple[float, float]:
    """``group_cpu_seconds`` of 50 ms of CPU work on every rank, and of rank 0 waiting 200 ms in a
    barrier for rank 1 (which sleeps meanwhile)."""
    def wait() -> None:
        if rank == 1:
            time.sleep(0.2)
        dist.barrier()

    return group_cpu_seconds(lambda: _busy(0.05)), group_cpu_seconds(wait)


def test_group_cpu_seconds_sums_the_ranks_work_and_not_their_waiting():
    for busy, waiting in run_ranks(2, _cpu_timings, timeout=120):
        assert 0.1 <= busy < 0.2          # 50 ms on each of the 2 ranks, counted on every rank
        assert waiting < 0.05             # a barrier and a sleep put no work on the machine


def test_median_interval_order_statistics():
    seven = median_interval([7, 1, 6, 2, 5, 3, 4])
    assert (seven.low, seven.high) == (1, 7) and seven.coverage == pytest.approx(1 - 2 / 2 ** 7)
    twenty = median_interval(range(1, 21))
    assert (twenty.low, twenty.high) == (6, 15) and twenty.coverage == pytest.approx(0.9586, abs=1e-4)
    assert median_interval([3.0]).coverage == 0.0
    with pytest.raises(ValueError, match="no samples"):
        median_interval([])


def test_clear_speedup_is_outside_the_noise():
    kernel = (0.80, 0.82, 0.79, 0.81, 0.85, 0.80, 0.78)
    baseline = (1.00, 1.01, 0.99, 1.02, 1.05, 1.00, 0.97)
    timing = Comparison(kernel, baseline)
    assert timing.ratio == pytest.approx(0.80 / 1.00)
    assert timing.interval.high < 1.0 and not timing.inside_noise()
    assert timing.noise_verdict("fused") == "fused faster"
    assert timing.target_verdict(1.10) == "ok"
    assert timing.target_verdict(0.70) == "MISSED"
    assert timing.target_verdict(0.80) == "ok (within noise)"


def test_swinging_ratios_are_inside_the_noise():
    """The outside review's case: ratios from 0.79 to 1.01 on one machine."""
    kernel = (0.79, 0.95, 1.01, 0.88, 0.99, 0.83, 0.92)
    baseline = (1.0,) * 7
    timing = Comparison(kernel, baseline)
    assert timing.inside_noise()
    assert timing.noise_verdict("fused") == "inside the noise"
    assert timing.format_ratio() == "0.920 [0.790, 1.010]"
    assert _timing_summary(timing) == "fused/unfused 0.920 [0.790, 1.010] (98% interval): inside the noise"


def test_slower_kernel_misses_its_target():
    """As bench local_ops's bf16 FFN at 1.145 against <= 1.10, here outside the noise."""
    timing = Comparison((1.15, 1.14, 1.16, 1.145, 1.13, 1.15, 1.14), (1.0,) * 7)
    assert timing.ratio == pytest.approx(1.145)
    assert timing.noise_verdict() == "kernel slower"
    assert timing.target_verdict(1.10) == "MISSED"


def test_comparison_needs_one_pair_per_repeat():
    with pytest.raises(ValueError, match="one pair per repeat"):
        Comparison((1.0, 2.0), (1.0,))


def test_spread_keeps_three_significant_digits():
    assert spread([0.0101, 0.0123, 0.0150]) == "10.1/12.3/15.0"
    assert spread([12.0, 15.0, 15.5], scale=1.0) == "12.0/15.0/15.5"
    assert spread([0.0000123, 0.0000456, 0.0001]) == "0.0123/0.0456/0.1000"


def test_interleave_rotates_the_order_and_warms_up():
    calls: list[str] = []
    clock = iter(range(100))

    def timer(fn) -> float:
        fn()
        return float(next(clock))

    a, b = interleave((lambda: calls.append("a"), lambda: calls.append("b")), repeats=3, warmup=1, timer=timer)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert a == (0.0, 3.0, 4.0) and b == (1.0, 2.0, 5.0)


def test_benchmark_table_marks_each_target(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _timing import Row, print_table

    met = Comparison((0.5,) * 7, (1.0,) * 7)
    missed = Comparison((0.00115, 0.00114, 0.00116, 0.001145, 0.00113, 0.00115, 0.00114), (0.001,) * 7)
    print_table([Row("fast case", met, 1.10), Row("bf16 ffn", missed, 1.10), Row("no target", met, None)])
    lines = capsys.readouterr().out.splitlines()
    fast, ffn, untargeted = (next(line for line in lines if line.startswith(case))
                             for case in ("fast case", "bf16 ffn", "no target"))
    assert fast.endswith("<=1.10  ok") and "0.500 [0.500, 0.500]" in fast
    assert ffn.endswith("<=1.10  MISSED") and "1.13/1.15/1.16" in ffn and "1.00/1.00/1.00" in ffn
    assert untargeted.endswith("-  kernel faster")
    assert "98.4% at 7 repeats" in lines[-1]


@pytest.mark.parametrize("layer,layout,fusions", [("allgather-ep", "2x1", 1), ("deepspeed-bmm", "2x2", 2)])
def test_demo_train_checks_output_and_gradients(capsys, layer, layout, fusions):
    """``demo --train``: training steps of a demo layer's trainable form fused on real ranks (the
    AllGather-EP block; the DeepSpeed-style layer's BMM pair), checked against the eager step's
    output and gradients."""
    status = moe_fusion_main(["demo", "--train", "--layer", layer, "--layout", layout, "--tokens", "8",
                              "--hidden", "16", "--ffn-hidden", "24", "--experts", "4", "--steps", "2",
                              "--compiler", "eager"])
    out = capsys.readouterr().out
    assert status == 0, out
    ep, tp = layout.split("x")
    assert f"== {layer} EP={ep} x TP={tp}: OK ({fusions} fusions, max error" in out
