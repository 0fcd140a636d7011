"""The run's console (coom_nemo/console.py, callbacks.StepMetrics).

The demo's command (scripts/demo.sh: recipes/llama31_405b.py --cpu
--size debug on indexed text) runs twice on tiny TinyStories-format
data, by default and with --verbose, stdout and stderr in one stream as
a terminal shows them. The default run is counted and checked against
its own TensorBoard scalars and its folder on disk; the verbose run
shows that no framework line is lost.
"""

import contextlib
import re
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, run_process
from tinystories import make_indexed_tinystories

from coom_nemo import console

STEPS = 6
STEP_LINE = re.compile(
    r"^step +(\d+)/(\d+) \| loss (\S+) \| lr \S+ \| \S+ tok/s \| \S+ model TFLOP/s/device "
    r"\| \d+ ms \| ETA (\d+:\d\d)$")


def _demo(folder, *extra):
    """The demo's command in ``folder`` (data made there: its index
    cache is written beside it), 6 steps, eval and a checkpoint every
    3."""
    folder.mkdir()
    prefix, spm_model = make_indexed_tinystories(folder)
    code, out = run_process(
        [PYTHON, str(ROOT / "recipes" / "llama31_405b.py"), "--cpu", "--size", "debug",
         "--no-mlperf", "--max-steps", str(STEPS), "--dir", str(folder / "run"), "--data", prefix,
         "--tokenizer", f"sentencepiece:{spm_model}", *extra,
         "trainer.val_check_interval=3", "log.ckpt.every_n_train_steps=3"],
        cwd=folder, merge=True)
    assert code == 0, out[-3000:]
    return out.splitlines()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("console")
    return tmp_path, _demo(tmp_path / "quiet"), _demo(tmp_path / "loud", "--verbose")


def _number(text):
    """A number as model_math.human writes it (5.94K)."""
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1], 1)
    return float(text.rstrip("KMG")) * scale


def _steps(lines):
    return [i for i, line in enumerate(lines) if STEP_LINE.match(line)]


def test_default_console_is_short_and_the_log_has_the_rest(runs):
    tmp_path, quiet, loud = runs
    first = _steps(quiet)[0]
    print("\n".join(quiet))
    assert first <= 15, quiet[:first]
    assert sum(line.startswith("model=llama31_debug ") for line in quiet) == 1
    assert not [line for line in quiet if "warn" in line.lower()], quiet
    (log,) = (tmp_path / "quiet").rglob("coom_log_rank0.txt")
    logged = log.read_text().splitlines()
    # the console's lines are in the log, in order, among the rest
    assert [line for line in logged if line in set(quiet)] == quiet
    assert len(logged) > len(quiet) + 50
    assert any("FutureWarning" in line or "Warning" in line for line in logged)
    # with --verbose the console has every line the quiet log has
    assert len(loud) > len(quiet) + 50
    assert _normal(logged) <= _normal(loud) | _normal(quiet), (
        sorted(_normal(logged) - _normal(loud))[:20])


def _normal(lines):
    """Lines without what differs between two runs: the folder's name,
    object addresses, numbers (times, speeds, dates)."""
    def normal(line):
        line = line.replace("loud", "RUN").replace("quiet", "RUN")
        line = re.sub(r"0x[0-9a-f]+", "ADDRESS", line)
        return re.sub(r"\d+(\.\d+)?", "#", line).strip()

    return {normal(line) for line in lines if line.strip()}


def test_steps_show_progress_and_the_summary_matches_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp_path, quiet, _ = runs
    steps = [STEP_LINE.match(quiet[i]) for i in _steps(quiet)]
    assert [(int(m[1]), int(m[2])) for m in steps] == [(s, STEPS) for s in range(1, 7)]
    assert steps[-1][4] == "0:00"
    (events,) = (tmp_path / "quiet").rglob("events.out.tfevents.*")
    tb = EventAccumulator(str(events))
    tb.Reload()

    def scalars(tag):
        return [event.value for event in tb.Scalars(tag)]

    summary = quiet[quiet.index(next(line for line in quiet if line.startswith("done: "))):]
    text = "\n".join(summary)
    tokens = STEPS * 8 * 128  # debug preset: GBS 8, seq 128
    assert summary[0].startswith(f"done: steps 1-{STEPS} of {STEPS} ({STEPS} steps, "
                                 f"{tokens:,} tokens) in ")
    train_loss = float(re.search(r"loss: train (\S+) \(step 6\)", text)[1])
    assert train_loss == pytest.approx(scalars("reduced_train_loss")[-1], abs=1e-4)
    assert train_loss == pytest.approx(float(steps[-1][3]), abs=1e-4)
    val_loss, val_step = re.search(r"validation (\S+) \(step (\d+)\)", text).groups()
    assert f"step {val_step} | val_loss {val_loss}" in quiet
    assert float(val_loss) == pytest.approx(scalars("val_loss")[-1], abs=1e-4)
    seconds = sum(scalars("step_time_s"))
    mean = _number(re.search(r"mean: (\S+) tok/s", text)[1])
    assert mean == pytest.approx(tokens / seconds, rel=0.01)
    tflops = float(re.search(r"\| (\S+) model TFLOP/s/device", summary[2])[1])
    per_token = sum(scalars("model_tflops_per_gpu")[i] / scalars("tokens_per_sec")[i]
                    for i in range(STEPS)) / STEPS
    assert tflops == pytest.approx(per_token * tokens / seconds, rel=0.02)
    assert "energy" not in text and "GPU" not in text  # CPU run: no J/token
    last = re.search(r"last checkpoint: (\S+)", text)[1]
    assert Path(last).is_dir() and (Path(last) / "weights").is_dir()
    assert re.search(r"logs: log \S+coom_log_rank0.txt \| TensorBoard ", text)


def test_checkpoint_lines_name_the_step_and_the_folder_on_disk(runs):
    tmp_path, quiet, _ = runs
    saved = [re.fullmatch(r"checkpoint: step (\d+) saved to (\S+)", line) for line in quiet
             if line.startswith("checkpoint:")]
    assert saved and all(saved), quiet
    folders = {p for p in (tmp_path / "quiet").rglob("checkpoints/*") if p.is_dir()}
    named = {Path(m[2]) for m in saved}
    assert named <= folders and all((path / "weights").is_dir() for path in named)
    # the folders on disk are these and their "-last" copies
    assert {p for p in folders if not p.name.endswith("-last")} == named
    assert [int(m[1]) for m in saved] == [3, 6]  # one line a step, "-last" copies aside
    # each follows its step's line, before the next step's
    for match in saved:
        index = quiet.index(match[0])
        before = [line for line in quiet[:index] if STEP_LINE.match(line)]
        assert STEP_LINE.match(before[-1])[1] == match[1]


# -- the console's routing, in this process ----------------------------


@contextlib.contextmanager
def quiet():
    """A quiet console in this process (capsys's streams are made per
    test phase, so it starts in the test itself)."""
    assert console.start(verbose=False)
    try:
        yield
    finally:
        console.stop()


def test_framework_output_goes_to_the_log_and_errors_name_their_rank(tmp_path, capsys):
    import logging

    framework = logging.getLogger("framework.example")
    framework.propagate = False  # as under no handler at all: Python's last resort
    with quiet():
        console.info("a console line")
        framework.warning("a framework warning")
        exec("print('a framework print')", {"__name__": "lightning.example"})
        path = console.attach(tmp_path, rank=1)
        console.info("rank 1 says this")
        console.error("went wrong", rank=console.rank())
        framework.error("a framework error")
    captured = capsys.readouterr()
    assert captured.out == "a console line\n"
    assert captured.err == ("error [rank 1]: went wrong\n"
                            "error [rank 1]: a framework error\n")
    logged = path.read_text()
    for text in ("a console line", "a framework warning",
                 "a framework print", "rank 1 says this", "went wrong"):
        assert text in logged


def test_a_failing_run_leaves_one_line_and_its_traceback_in_the_log(tmp_path, capsys):
    with quiet(), pytest.raises(ValueError), console.session():
        path = console.attach(tmp_path, rank=0)
        raise ValueError("data.paths: no such file")
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error [rank 0]: ValueError: data.paths: no such file (traceback in {path})"]
    assert "Traceback (most recent call last)" in path.read_text()
