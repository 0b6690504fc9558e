"""The ``optax-gradflow`` command line: the demo end to end, and its argument errors."""

import io
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import optax_gradflow
from optax_gradflow import cli
from optax_gradflow._demo import app, results, scenario, training
from optax_gradflow.monitor import Monitor

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 25


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One short demo, with the progress bar and the event log on; (status, out, err, png)."""
    png = tmp_path_factory.mktemp("demo") / "demo.png"
    with pytest.MonkeyPatch.context() as mp:
        out_lines, err_lines = [], []

        class Stream:
            def __init__(self, lines):
                self.lines = lines

            def write(self, text):
                self.lines.append(text)
                return len(text)

            def flush(self):
                pass

            def isatty(self):
                return False

        mp.setattr(sys, "stdout", Stream(out_lines))
        mp.setattr(sys, "stderr", Stream(err_lines))
        status = cli.main(["demo", "--steps", str(STEPS), "--seed", "0", "--output", str(png)])
    return status, "".join(out_lines), "".join(err_lines), png


def test_demo_writes_a_png_and_a_table(demo_run):
    status, out, _, png = demo_run
    assert status == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    table = out[out.index("run ") : out.index("Best final eval loss")]
    rows = [line.split()[0] for line in table.splitlines()[2:] if line.strip()]
    # The optax user's answer to NaN batches is one of the three runs.
    assert rows == ["adam", "apply_if_finite", "adam+gradflow"]
    for column in (
        "final loss",
        "last 10%",
        "peak loss",
        "clipped",
        "explosions",
        "non-finite",
        "skipped",
        "diverged?",
    ):
        assert column in table
    assert "adam+gradflow vs apply_if_finite (lower is better): final loss" in out
    assert "Stability report of the stabilized run" in out
    assert "stability score" in out
    assert f"Plot written to {png}" in out


def test_demo_shows_timing_on_stderr_and_no_bar_off_a_terminal(demo_run):
    _, _, err, _ = demo_run
    # Not a terminal: tqdm draws no bar; one line per run says how long it took.
    for name in ("adam", "apply_if_finite", "adam+gradflow"):
        assert f"\n{name} " in "\n" + err
    assert err.count(f" {STEPS} steps in ") == 3
    assert "\r" not in err


def test_help_prints_no_doubled_percent(capsys):
    # argparse %-formats help strings, not descriptions: "%%" there is printed as is.
    for argv in (["--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = capsys.readouterr().out
        assert "%%" not in text
    assert "2% of the batches" in " ".join(text.split())


def test_the_comparison_is_computed_from_the_numbers():
    def run(name, losses):
        return training.RunResult(name, np.asarray(losses), np.ones(len(losses)), 1.0, None, 0.0)

    ours_better = [
        run("adam", [0.5, np.nan]),
        run("apply_if_finite", [0.5, 0.4]),
        run("adam+gradflow", [0.5, 0.2]),
    ]
    lines = results.findings(ours_better)
    assert lines[0].startswith("Best final eval loss: adam+gradflow (0.2)")
    assert "adam nan (diverged: yes: NaN from step 1)" in lines[0]
    assert "final loss 0.2 vs 0.4 (lower)" in lines[1]
    assert lines[2].startswith("So, against apply_if_finite, the stabilizer wins on final loss")
    theirs_better = [
        ours_better[0],
        run("apply_if_finite", [0.5, 0.2]),
        ours_better[1]._replace(name="adam+gradflow"),
    ]
    lines = results.findings(theirs_better)
    assert lines[0].startswith("Best final eval loss: apply_if_finite (0.2)")
    assert "final loss 0.4 vs 0.2 (higher)" in lines[1]
    assert "the stabilizer loses on final loss, mean loss over the last 10%" in lines[2]
    tied = [run("apply_if_finite", [0.5, 0.2]), run("adam+gradflow", [0.5, 0.201])]
    assert results.findings(tied)[-1] == (
        "So the stabilizer and apply_if_finite are within 5% of each other on every measure."
    )


def test_the_runs_are_the_ones_named():
    params = {"w": np.ones(3, np.float32)}
    aif = training._optimizer(scenario.AIF)
    state = aif.init(params)
    assert type(state).__name__ == "ApplyIfFiniteState"
    # A NaN gradient is dropped, with no give-up in sight.
    updates, state = aif.update({"w": np.full(3, np.nan, np.float32)}, state, params)
    assert np.all(np.asarray(updates["w"]) == 0) and int(state.total_notfinite) == 1
    assert scenario.MAX_CONSECUTIVE_ERRORS >= 10**6
    flow = training._optimizer(scenario.GRADFLOW).init(params)
    assert len(optax_gradflow.find_states(flow)) == 1


def test_the_stabilizer_run_feeds_a_monitor_and_its_loss(demo_run):
    monitor = Monitor(every=1)
    result = training.train(
        scenario.GRADFLOW, steps=2 * scenario.CHUNK + 3, seed=0, monitor=monitor
    )
    (path,) = monitor.paths
    records = monitor.records[path]
    # One read per chunk of steps; the padding of the last chunk is not a step.
    assert [(r.start, r.stop) for r in records] == [(0, 10), (10, 20), (20, 23)]
    # value=loss reaches the stabilizer; the loss is not scaled (no scale_loss).
    assert all(math.isfinite(r.loss) for r in records)
    assert all(r.loss_scale == 1.0 for r in records)
    assert len(result.eval_loss) == 23


def test_progress_bar_is_tqdm_on_a_terminal_and_optional(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = app._progress_bar(stream, "adam", 20, enabled=True)
    assert type(bar).__module__.startswith("tqdm")
    bar.update(20)
    bar.refresh()
    bar.close()
    assert "20/20" in stream.getvalue()
    assert app._progress_bar(stream, "adam", 20, enabled=False) is None
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed: no bar
    assert app._progress_bar(stream, "adam", 20, enabled=True) is None


def test_quiet_demo_prints_no_progress(tmp_path, capsys):
    png = tmp_path / "quiet.png"
    assert cli.main(["demo", "--steps", "5", "--output", str(png), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "adam+gradflow" in captured.out and "apply_if_finite" in captured.out
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--steps", "-5"], "must be a positive integer, got -5"),
        (["demo", "--steps", "0"], "must be a positive integer, got 0"),
        (["demo", "--steps", "ten"], "must be a positive integer, got 'ten'"),
        (["demo", "--seed", "-1"], "must be an integer >= 0, got -1"),
        (["demo", "--learning-rate", "1"], "unrecognized arguments: --learning-rate"),
        (["demo", "--output", "/no/such/dir/demo.png"], "does not exist"),
        (["launch"], "invalid choice: 'launch'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_output_that_is_a_directory_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "is a directory" in capsys.readouterr().err


def test_unwritable_output_directory_is_refused(tmp_path, capsys, monkeypatch):
    # os.access is faked: permission bits do not bind the root user tests may run as.
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--output", str(tmp_path / "demo.png")])
    assert exit_info.value.code == 2
    assert "cannot write there" in capsys.readouterr().err


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--steps", "--seed", "--output", "--quiet"):
        assert option in text


def test_python_dash_m_runs_the_same_parser():
    result = subprocess.run(
        [sys.executable, "-m", "optax_gradflow", "demo", "--steps", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "must be a positive integer" in result.stderr


def _result(losses, initial=1.0):
    n = len(losses)
    return training.RunResult("adam", np.asarray(losses), np.ones(n), initial, None, 0.0)


def test_verdict_by_hand():
    assert results.verdict(_result([0.9, 0.5, 0.2])) == "no"
    # The peak 10.0 is exactly 10x the initial loss: not above it, not diverged.
    assert results.verdict(_result([10.0, 0.5])) == "no"
    assert results.verdict(_result([0.5, 25.0, 0.4], initial=0.5)) == "yes: blow-up to 50x"
    assert results.verdict(_result([0.5, 3.0, np.nan, np.nan])) == "yes: NaN from step 2"


def test_the_command_line_loads_the_demo_only_when_it_runs():
    code = (
        "import sys, optax_gradflow.cli; "
        "assert optax_gradflow.cli.build_parser().prog == 'optax-gradflow'; "
        "print(sorted(m for m in sys.modules "
        "if m in ('jax', 'flax', 'optax_gradflow._demo.app', 'optax_gradflow._demo.training')))"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=root,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
