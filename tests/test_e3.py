"""nanochat bench e3: the five setups' configs, the numbers taken from a run's metrics, the
claim arithmetic and verdicts, and (slow) the whole report from a short real run."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from nanochat.bench import e3
from nanochat.data import corpus


def test_setups_differ_only_in_their_feature():
    cfgs = e3.setup_configs(e3.SETUPS, "cpu", None, [])
    base = cfgs["baseline"]
    assert (base.optim.name, base.optim.state, base.model.mtp.heads) == ("adamw", "fp32", 1)
    assert cfgs["mtp_only"].model.mtp.heads == 4
    assert (cfgs["muon_8bit"].optim.name, cfgs["muon_8bit"].optim.state) == ("muon", "8bit")
    assert cfgs["galore2"].optim.galore.enabled
    full = cfgs["full"]
    assert full.model.mtp.heads == 4 and full.optim.state == "8bit"
    assert full.train.collider.enabled and full.train.collider.sparsity == 0.35
    for c in cfgs.values():  # same data, seed, steps and shape
        assert (c.train.seed, c.train.max_steps, c.train.batch_size, c.model.d_model) == (
            base.train.seed, base.train.max_steps, base.train.batch_size, base.model.d_model)
    assert e3.setup_configs(["full"], "cpu", 7, ["train.eval_every=3"])["full"].train.max_steps == 7
    gpu = e3.setup_configs(["baseline"], "gpu", None, [])["baseline"]
    assert (gpu.model.d_model, gpu.model.n_layers, gpu.train.device) == (768, 12, "cuda")


def test_tokens_to_reach_interpolates_between_evals():
    curve = [{"tokens": 100, "val_loss": 5.0}, {"tokens": 200, "val_loss": 4.0},
             {"tokens": 300, "val_loss": 3.0}]
    assert e3.tokens_to_reach(curve, 4.5) == pytest.approx(150)
    assert e3.tokens_to_reach(curve, 3.0) == pytest.approx(300)
    assert e3.tokens_to_reach(curve, 6.0) == 100
    assert e3.tokens_to_reach(curve, 2.9) is None


def test_verdict_rule():
    assert e3.verdict(0.86, 0.86) == "confirmed"
    assert e3.verdict(0.82, 0.86) == "confirmed"  # within 5 points
    assert e3.verdict(0.50, 0.86) == "partly"
    assert e3.verdict(0.40, 0.86) == "refuted"
    assert e3.verdict(-0.1, 0.15) == "refuted"
    assert e3.verdict(None, 0.15) == "refuted"


def _run(tokens, losses, state, peak, wait=0.01):
    curve = [{"tokens": t, "val_loss": v, "train_s": i + 1.0} for i, (t, v) in
             enumerate(zip(tokens, losses))]
    return {"tokens": tokens[-1], "final_val_loss": losses[-1], "curve": curve,
            "optim_state_bytes": state, "peak_memory_bytes": peak, "data_wait_fraction": wait}


def test_claims_from_measured_numbers():
    t = [1000, 2000, 3000, 4000]
    results = {
        "baseline": _run(t, [5.0, 4.0, 3.5, 3.0], 800, 1000),
        "mtp_only": _run(t, [4.8, 3.8, 3.0, 2.8], 900, 1100),  # reaches 3.0 at 3000 tokens
        "muon_8bit": _run(t, [5.0, 4.0, 3.5, 3.0], 112, 900),
        "galore2": _run(t, [5.0, 4.0, 3.5, 3.0], 440, 950),
        "full": _run(t, [5.0, 4.0, 3.5, 3.0], 120, 800, wait=0.2),
    }
    rows = {c["claim"].split(":")[0]: c for c in e3.claims(
        results, {"backward_ratio": 0.7, "step_ratio": 0.8, "sparsity": 0.35, "rounds": 3})}
    assert rows["MTP"]["measured"] == pytest.approx(0.25)
    assert rows["MTP"]["verdict"] == "confirmed"
    assert rows["Collider"]["measured"] == pytest.approx(0.30)
    assert rows["Collider"]["verdict"] == "confirmed"
    assert rows["8-bit Muon"]["measured"] == pytest.approx(0.86)
    assert rows["GaLore 2"]["measured"] == pytest.approx(0.45)
    assert rows["GaLore 2"]["verdict"] == "partly"
    assert rows["Async loader"]["measured"] == pytest.approx(0.8)  # the worst setup counts
    assert rows["~95% combined memory reduction"]["measured"] == pytest.approx(0.85)
    # an MTP run that never gets there is refuted, and the note says so
    results["mtp_only"] = _run(t, [5.5, 4.5, 3.9, 3.4], 900, 1100)
    mtp = e3.claims(results, None)[0]
    assert mtp["measured"] is None and mtp["verdict"] == "refuted"
    assert "never reached" in mtp["note"]


def test_summarize_run_reads_the_trainer_metrics(tmp_path):
    lines = [{"step": 10, "loss": 6.0, "tokens_per_s": 100.0, "train_s": 20.0, "data_wait_s": 2.0,
              "peak_memory_bytes": 5, "optim_state_bytes": 7},
             {"step": 10, "val_loss": 5.5, "val_bpb": 2.0, "train_s": 20.0},
             {"step": 20, "loss": 5.0, "tokens_per_s": 200.0, "train_s": 25.0, "data_wait_s": 0.5,
              "peak_memory_bytes": 9, "optim_state_bytes": 7},
             {"step": 20, "val_loss": 4.5, "val_bpb": 1.8, "train_s": 25.0}]
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = e3.summarize_run(p, tokens_per_step=100)
    assert r["tokens_per_s"] == 200.0  # the warm-up window is left out
    assert r["step_seconds"] == pytest.approx(0.5)
    assert r["data_wait_fraction"] == pytest.approx(0.5 / 5.0)
    assert (r["peak_memory_bytes"], r["optim_state_bytes"], r["tokens"]) == (9, 7, 2000)
    assert [c["tokens"] for c in r["curve"]] == [1000, 2000]
    assert r["final_val_bpb"] == 1.8


def test_unknown_setup_is_an_error():
    import argparse

    p = argparse.ArgumentParser()
    e3.add_arguments(p)
    with pytest.raises(ValueError, match="unknown setup"):
        list(e3.run(p.parse_args(["--only", "baseline,fast"])))


@pytest.mark.slow
def test_short_e3_run_writes_the_report(tmp_path, run_nanochat):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src = tmp_path / "src"
    src.mkdir()
    for f in ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py", "heapq.py"):
        (src / f).write_text((stdlib / f).read_text())
    data = corpus.prepare([str(src)], tmp_path / "data", vocab_size=512, val_fraction=0.2,
                          progress=False).out_dir
    out = tmp_path / "report"
    sets = ["model.vocab_size=512", "model.n_layers=1", "model.max_seq_len=64",
            "train.batch_size=2", "train.seq_len=64", "train.eval_every=2",
            "train.eval_tokens=512", "train.log_every=1", "schedule.warmup_steps=1"]
    r = run_nanochat(["bench", "e3", "--steps", "4", "--data", str(data), "--out", str(out),
                      "--collider-rounds", "1", "--json"]
                     + [a for s in sets for a in ("--set", s)], timeout=900)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["setup"] for x in rows if x["part"] == "setup"] == list(e3.SETUPS)
    assert len([x for x in rows if x["part"] == "claim"]) == 6
    res = json.loads((out / "results.json").read_text())
    assert set(res["setups"]) == set(e3.SETUPS)
    assert res["setups"]["muon_8bit"]["optim_state_bytes"] < res["setups"]["baseline"][
        "optim_state_bytes"]
    report = (out / "REPORT.md").read_text()
    assert "| baseline |" in report and "8-bit Muon" in report and "nanochat bench e3" in report
    for png in ("loss_vs_tokens.png", "loss_vs_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
