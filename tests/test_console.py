"""What a user sees on the console: the one error policy, the logging setup, the progress bar and log lines, and the
throughput timer. (A whole run's lines and summary: test_train.py::test_a_run_outside_a_terminal_logs_...)"""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest
from runs import ROOT, clean_env

from phi_jax import cli
from phi_jax.metrics import MetricsWriter, StepTimer


@pytest.fixture
def restore_logging():
    """configure_logging replaces the root logger's handlers: put pytest's back afterwards."""
    root, absl = logging.getLogger(), logging.getLogger("absl")
    handlers, root_level, absl_level = root.handlers[:], root.level, absl.level
    yield
    root.handlers = handlers
    root.setLevel(root_level)
    absl.setLevel(absl_level)


@pytest.mark.parametrize("error,message", [
    (ValueError("seq_len=0 must be >= 1."), "error: seq_len=0 must be >= 1."),
    (FileNotFoundError("/data does not exist"), "error: /data does not exist"),
    (cli.RunFailure("3 consecutive updates had a non-finite loss"), "error: 3 consecutive updates had a non-finite"),
    (OSError(28, "No space left on device"), "error: written: [Errno 28] No space left on device"),
], ids=["value", "path", "run-failure", "failed-write"])
def test_one_error_policy(error, message, monkeypatch, restore_logging):
    monkeypatch.setenv("PHI_JAX_HUGE_PAGES", "0")

    def main():
        raise error

    with pytest.raises(SystemExit) as exit_:
        cli.run(main, failed_write=lambda e: f"written: {e}")
    assert str(exit_.value.code).startswith(message)


def test_a_bug_keeps_its_traceback(monkeypatch, restore_logging):
    monkeypatch.setenv("PHI_JAX_HUGE_PAGES", "0")
    with pytest.raises(KeyError):
        cli.run(lambda: {}["missing"])


def test_logging_leaves_out_library_info_but_not_warnings(restore_logging):
    stream = io.StringIO()
    cli.configure_logging(stream)
    logging.getLogger("absl").info("Finished saving checkpoint to `/w/checkpoints/3`.")  # orbax, through absl
    logging.getLogger("absl").warning("a library warning")
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu': NOT_FOUND: no TPU")
    logging.getLogger("jax._src.xla_bridge").warning("An NVIDIA GPU may be present on this machine")
    logging.getLogger("phi_jax").info("compiling the train step")
    lines = stream.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "a library warning", "An NVIDIA GPU may be present on this machine", "compiling the train step"]
    assert lines[-1].startswith("I") and "test_console.py" in lines[-1]  # absl's prefix: level, time, file:line


def test_no_tpu_probe_line_on_a_cpu_host():
    """JAX as a CPU host starts it (JAX_PLATFORMS unset: it tries the TPU first): the INFO line it logs when that
    fails appears with a plain INFO setup, and not with phi_jax's."""
    env = clean_env()
    env.pop("JAX_PLATFORMS")
    plain = "import logging; logging.basicConfig(level=logging.INFO)"
    ours = "from phi_jax.cli import configure_logging; configure_logging()"
    out = {}
    for name, setup in [("plain", plain), ("ours", ours)]:
        code = f"{setup}; import jax, logging; jax.devices(); logging.getLogger('phi_jax').info('started')"
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        out[name] = r.stderr
    if "Unable to initialize backend" not in out["plain"]:
        pytest.skip("this JAX tried no platform that is missing here")
    assert "Unable to initialize backend" not in out["ours"] and "started" in out["ours"], out["ours"][-2000:]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_go_above_the_bar_and_the_final_bar_keeps_the_loss(tmp_path, monkeypatch, restore_logging):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    cli.configure_logging()  # a handler on sys.stderr, as the entry points have
    writer = MetricsWriter(tmp_path, total_steps=10, initial_step=0)
    writer.advance()
    writer.write(1, {"loss": 1.5, "tokens_per_sec": 1000.0, "eta_sec": 90.0})
    logging.getLogger("phi_jax").info("a log line while the bar is drawn")
    writer.advance(9)
    writer.write(10, {"val_loss": 2.25})
    writer.close()
    logging.getLogger("phi_jax").info("after the bar")
    text = terminal.getvalue()
    line = next(line for line in text.split("\n") if "a log line while" in line)
    assert line.split("\r")[-1].startswith("I"), repr(line)  # on a line of its own, not after the bar's text
    final_bar = [s for s in text.split("\r") if "10/10" in s][-1]
    assert "loss=1.5, val_loss=2.25, tokens_per_sec=1000" in final_bar, repr(final_bar)
    assert text.rstrip("\n").split("\n")[-1].startswith("I") and "after the bar" in text  # logging restored


def test_lines_outside_a_terminal_carry_step_of_total_and_eta(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="phi_jax")
    writer = MetricsWriter(tmp_path, total_steps=100, initial_step=0)
    writer.write(0, {"val_loss": 6.0})
    writer.write(1, {"loss": 5.5, "skipped": 0.0})
    writer.write(10, {"loss": 4.25, "tokens_per_sec": 2000.0, "mfu": 0.25, "eta_sec": 3725.0})
    writer.write(10, {"val_loss": 4.5})
    writer.close()
    assert caplog.messages == ["step 0 of 100 val_loss=6 eta ?", "step 1 of 100 loss=5.5 eta ?",
                               "step 10 of 100 loss=4.25 tokens_per_sec=2000 mfu=0.25 eta 1:02:05",
                               "step 10 of 100 val_loss=4.5 eta 1:02:05"]


def test_step_timer_starts_after_the_first_step():
    """Seconds per step between laps, from `start` on: a first step of 100 s (the first run of the executable, the
    data pipeline's start) is not a sample."""
    now = iter([100.0, 100.0 + 3 * 0.5, 100.0 + 3 * 0.5 + 2 * 0.25])  # start at step 1, laps at steps 4 and 6
    timer = StepTimer(clock=lambda: next(now))
    assert timer.lap(1) is None  # before the start
    timer.start(1)
    assert timer.lap(1) is None  # no step since the start: the first step has no throughput
    assert timer.lap(4) == 0.5
    assert timer.lap(6) == 0.25


def test_an_unretrieved_orbax_failure_is_left_out_but_not_others(restore_logging):
    """asyncio reports a failed checkpoint write's collected futures after phi_jax's own error line; only orbax's."""
    def raised_in(filename: str) -> tuple:
        namespace: dict = {}
        exec(compile("def write():\n    raise ValueError('Failed to write: File too large')", filename, "exec"),
             namespace)
        try:
            namespace["write"]()
        except ValueError:
            return sys.exc_info()

    stream = io.StringIO()
    cli.configure_logging(stream)
    for filename in ("/site-packages/orbax/checkpoint/serialization.py", "/site-packages/other/lib.py"):
        logging.getLogger("asyncio").error("_GatheringFuture exception was never retrieved",
                                           exc_info=raised_in(filename))
    text = stream.getvalue()
    assert "other/lib.py" in text and "orbax" not in text
