"""nanochat report RUN: every section, a valid PNG, stable JSON keys, missing parts listed
with their commands, an unreadable eval file named without sinking the report.

    pytest tests/test_report.py
"""

from __future__ import annotations

import json
import shutil

import pytest
from nanochat.eval import report

SECTIONS = ["## Environment", "## Config", "## Training", "## Held-out bits per byte",
            "## Evaluations", "## Model size", "## Export", "## Engine speed", "## Not run"]
HUMANEVAL = {"task": "humaneval", "model": "model.gguf", "n": 1, "problems": 164,
             "pass@1": 0.0061, "pass@10": None, "temperature": 0.2, "seconds": 812.5}


@pytest.fixture
def run(trained_tiny, tmp_path):
    """trained_tiny's run in a directory of its own (the report writes into it), with a
    longer metrics log (one torn line) and eval results: one valid, one corrupt."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(trained_tiny["run"] / "checkpoints")
    shutil.copy(trained_tiny["run"] / "config.json", run / "config.json")
    lines = [json.dumps({"step": s, "loss": 7 - s / 40, "tokens_per_s": 1000.0,
                         "train_s": s / 10}) for s in range(10, 170, 10)]
    lines += [json.dumps({"step": s, "val_loss": 6.5 - s / 50, "val_bpb": 2.5 - s / 200})
              for s in (80, 160)]
    lines.insert(3, '{"step": 40, "loss": 5.')  # a line torn by a crash
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "eval").mkdir()
    (run / "eval" / "humaneval.json").write_text(json.dumps(HUMANEVAL))
    (run / "eval" / "broken.json").write_text('{"task": "bpb", "bpb": ')
    return run


def test_report_has_every_section(run, trained_tiny, capsys):
    (run / "model.gguf").symlink_to(trained_tiny["gguf"])
    rep = report.write(run, speed_tokens=8)
    assert tuple(rep) == report.KEYS
    saved = json.loads((run / "report.json").read_text())
    assert tuple(saved) == report.KEYS
    md = (run / "report.md").read_text()
    for s in SECTIONS:
        assert s in md, s
    png = (run / report.CURVE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(run / report.CURVE).shape[2] in (3, 4)
    assert rep["curve"]["points"] == {"loss": 16, "val_loss": 2, "val_bpb": 2}
    assert rep["training"]["unreadable_lines"] == 1 and rep["training"]["steps"] == 160
    assert rep["bpb"]["val_bpb"] == pytest.approx(2.5 - 160 / 200)
    assert rep["evals"]["humaneval"]["pass@1"] == HUMANEVAL["pass@1"]
    assert "pass@1 0.0061" in md
    # the corrupt file: named, in the report and on stderr, and the report still complete
    assert rep["evals"]["broken"]["status"] == "unreadable"
    assert "broken.json" in rep["evals"]["broken"]["file"]
    assert "broken.json" in md and "broken.json" in capsys.readouterr().err
    # what was not run, with the command that would produce it
    missing = {n["section"]: n["command"] for n in rep["not_run"]}
    assert set(missing) == {"eval bpb", "eval humaneval-rs"}
    assert missing["eval bpb"].startswith(f"nanochat eval bpb --model {run}")
    assert f"`{missing['eval humaneval-rs']}`" in md
    m = rep["model"]
    assert m["params"]["total"] == trained_tiny["model"].num_params()["total"]
    assert m["checkpoint_bytes"] > m["weights_bytes"] > 0  # state.pt holds the optimizer too
    assert rep["export"]["bytes"] == trained_tiny["gguf"].stat().st_size
    e = rep["engine"]
    assert e["status"] == "ok" and e["generated_tokens"] == 8 and e["decode_tokens_per_s"] > 0


def test_report_exports_a_temporary_gguf_and_lists_what_is_missing(run, run_nanochat):
    (run / "eval" / "broken.json").unlink()
    p = run_nanochat(["report", str(run), "--speed-tokens", "0"], NANOCHAT_NUM_THREADS="1")
    assert p.returncode == 0, p.stderr
    rep = json.loads((run / "report.json").read_text())
    assert rep["export"]["status"] == "not run" and rep["engine"]["status"] == "not run"
    assert "nanochat export --gguf" in rep["export"]["command"]
    p = run_nanochat(["report", str(run), "--export", "--speed-tokens", "4", "--json"],
                     NANOCHAT_NUM_THREADS="1")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["export"]["status"] == "ok" and rep["export"]["temporary"] is True
    assert rep["engine"]["generated_tokens"] == 4
    assert not list(run.glob("*.gguf"))  # the temporary export is gone
    assert tuple(rep) == report.KEYS


def test_report_of_a_directory_that_is_no_run(tmp_path, run_nanochat):
    p = run_nanochat(["report", str(tmp_path)])
    assert p.returncode == 2 and "no checkpoint" in p.stderr
