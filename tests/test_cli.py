"""The ``optax-gradflow`` command line: the demo end to end, and its argument errors."""

import subprocess
import sys

import numpy as np
import pytest

from optax_gradflow import cli

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
    table = out[out.index("run ") : out.index("Stability report")]
    rows = [line.split()[0] for line in table.splitlines()[2:] if line.strip()]
    assert rows == ["adam", "adam+clip", "adam+gradflow"]
    for column in ("final loss", "peak loss", "clipped", "explosions", "non-finite", "diverged?"):
        assert column in table
    assert "Stability report of the stabilized run" in out
    assert "stability score" in out
    assert f"Plot written to {png}" in out


def test_demo_shows_progress_on_stderr(demo_run):
    _, _, err, _ = demo_run
    # Not a terminal: one finished bar per run, no carriage returns.
    for name in ("adam", "adam+clip", "adam+gradflow"):
        assert f"\n{name} " in "\n" + err
    assert f"100% {STEPS}/{STEPS} steps" in err
    assert "\r" not in err


def test_quiet_demo_prints_no_progress(tmp_path, capsys):
    png = tmp_path / "quiet.png"
    assert cli.main(["demo", "--steps", "5", "--output", str(png), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "adam+gradflow" in captured.out
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
    return cli.RunResult("adam", np.asarray(losses), np.ones(n), initial, None, 0.0)


def test_verdict_by_hand():
    assert cli.verdict(_result([0.9, 0.5, 0.2])) == "no"
    # The peak 10.0 is exactly 10x the initial loss: not above it, not diverged.
    assert cli.verdict(_result([10.0, 0.5])) == "no"
    assert cli.verdict(_result([0.5, 25.0, 0.4], initial=0.5)) == "yes: blow-up to 50x"
    assert cli.verdict(_result([0.5, 3.0, np.nan, np.nan])) == "yes: NaN from step 2"
