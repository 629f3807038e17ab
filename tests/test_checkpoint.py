"""Checkpoints as untrusted, crash-prone files: a pickle payload is refused (never run) at
every entry point that reads one; saves leave no orphans and no moment without a
checkpoint; a corrupt latest checkpoint falls back to the one before; resume refuses
settings that would make it inexact and restores the saved loader position."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nanochat import checkpoint
from nanochat.data.loader import BatchLoader
from nanochat.train.loop import train
from test_train import _small_sets, data_dir, quiet, small_config  # noqa: F401 (fixture)


def tiny(**train):
    """small_config with a smaller model: these tests are about files, not learning."""
    from nanochat.config import apply_overrides

    return apply_overrides(small_config(**train), [
        "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_hidden=128",
        "train.eval_tokens=256"])


class _Payload:
    """Unpickling this runs `touch MARKER` (what an attacker's state.pt would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(ckpt: Path, marker: Path) -> Path:
    ckpt.mkdir(parents=True)
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1, "x": _Payload(marker)},
               ckpt / "state.pt")
    return ckpt / "state.pt"


def _cli(capsys, *args):
    """`nanochat ARGS` in this process (the payload would run here just the same)."""
    from nanochat.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


def _refused(result, bad: Path, marker: Path):
    rc, text = result
    assert not marker.exists(), "the pickle payload ran"
    assert rc == 2 and f"refusing to load {bad}" in text, text


def test_payload_refused_by_sample_and_export(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = _plant(tmp_path / "run" / "checkpoints" / "step_000001", marker)
    for args in (["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", "x"],
                 ["sample", "--checkpoint", str(bad.parent), "--prompt", "x"],
                 ["export", "--gguf", str(tmp_path / "m.gguf"), "--checkpoint",
                  str(tmp_path / "run")]):
        _refused(_cli(capsys, *args), bad, marker)
    assert not (tmp_path / "m.gguf").exists()


def test_payload_refused_by_train_resume_and_collider_reference(data_dir, tmp_path,  # noqa: F811
                                                                capsys):
    marker = tmp_path / "pwned"
    bad = _plant(tmp_path / "run" / "checkpoints" / "step_000002", marker)
    _refused(_cli(capsys, "train", "--data", str(data_dir), "--out", str(tmp_path / "run"),
                  "--resume", "--no-progress", *_small_sets()), bad, marker)
    # a config file alone reaches the loader: [train.collider] reference
    ref = _plant(tmp_path / "ref", marker)
    toml = tmp_path / "c.toml"
    toml.write_text(f'[train.collider]\nenabled = true\nreference = "{ref.parent}"\n')
    _refused(_cli(capsys, "train", "--config", str(toml), "--data", str(data_dir), "--out",
                  str(tmp_path / "run2"), "--steps", "1", "--no-progress", *_small_sets()),
             ref, marker)


@pytest.mark.slow  # trains the validate micro model (~30-60 s)
def test_payload_refused_by_validate(tmp_path):
    marker = tmp_path / "pwned"
    bad = _plant(tmp_path / "keep" / "run" / "checkpoints" / "step_999999", marker)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    r = subprocess.run([sys.executable, "-m", "nanochat", "validate", "--keep",
                        str(tmp_path / "keep")], check=False, capture_output=True, text=True,
                       env=env, timeout=900)
    assert not marker.exists(), "the pickle payload ran"
    assert r.returncode != 0 and f"refusing to load {bad}" in r.stdout + r.stderr, r.stdout


@pytest.mark.parametrize("sets", [
    ["optim.name=muon", "optim.state=8bit", "optim.min_8bit_size=1024",
     "model.moe.experts=2", "model.moe.top_k=1"],
    ["optim.name=lion", "optim.rest=lion", "optim.state=8bit", "optim.min_8bit_size=1024"],
    ["optim.galore.enabled=true", "optim.galore.update_every=1", "optim.state=8bit",
     "optim.min_8bit_size=1024", "model.mhc.streams=2"],
], ids=["muon8-moe", "lion8", "galore8-mhc"])
def test_real_trainer_states_load_as_plain_data(data_dir, tmp_path, sets):  # noqa: F811
    from nanochat.config import apply_overrides

    cfg = apply_overrides(tiny(max_steps=2, checkpoint_every=2, eval_every=2), sets)
    train(cfg, data_dir, tmp_path / "run", progress_bar=False, log=quiet)
    state = checkpoint.load(tmp_path / "run")  # weights_only=True
    assert state["step"] == 2 and state["optimizer"]["state"]


def test_corrupt_latest_falls_back_with_a_warning(data_dir, tmp_path):  # noqa: F811
    cfg = tiny(max_steps=4, checkpoint_every=2, keep_checkpoints=2)
    straight = train(cfg, data_dir, tmp_path / "b", progress_bar=False, log=quiet)
    latest = tmp_path / "b" / "checkpoints" / "step_000004" / "state.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as by a full disk
    logs = []
    second = train(cfg, data_dir, tmp_path / "b", resume=True, progress_bar=False,
                   log=logs.append)
    assert any(str(latest) in m and "falling back" in m for m in logs), logs
    assert any("step_000002" in m and "resumed" in m for m in logs), logs
    assert second.losses == straight.losses[2:]  # the re-run steps, exactly
    assert checkpoint.load(tmp_path / "b")["step"] == 4


def test_resume_refuses_changed_batch_settings(data_dir, tmp_path):  # noqa: F811
    train(tiny(max_steps=1), data_dir, tmp_path / "run", progress_bar=False, log=quiet)
    other = tiny(max_steps=4, batch_size=2, grad_accum=2, seed=7)
    with pytest.raises(ValueError) as e:
        train(other, data_dir, tmp_path / "run", resume=True, progress_bar=False, log=quiet)
    msg = str(e.value)
    for k in ("train.batch_size (saved 4, now 2)", "train.grad_accum (saved 1, now 2)",
              "train.seed (saved 1337, now 7)"):
        assert k in msg, msg
    assert "seq_len" not in msg
    other = apply_seq(tiny(max_steps=4))
    with pytest.raises(ValueError, match=r"train\.seq_len \(saved 64, now 32\)"):
        train(other, data_dir, tmp_path / "run", resume=True, progress_bar=False, log=quiet)


def apply_seq(cfg):
    from nanochat.config import apply_overrides

    return apply_overrides(cfg, ["train.seq_len=32"])


def test_resume_restores_the_saved_loader_position(data_dir, tmp_path, monkeypatch):  # noqa: F811
    cfg = tiny(max_steps=3, checkpoint_every=2)
    train(cfg, data_dir, tmp_path / "run", progress_bar=False, stop_at_step=2, log=quiet)
    ckpt = checkpoint.list_checkpoints(tmp_path / "run")[-1] / "state.pt"
    state = torch.load(ckpt, weights_only=True)
    state["loader"]["step"] = 11  # a position that step * grad_accum would not give
    torch.save(state, ckpt)
    starts = []
    real_init = BatchLoader.__init__

    def spy(self, *a, **kw):
        starts.append(kw.get("start_step"))
        real_init(self, *a, **kw)

    monkeypatch.setattr(BatchLoader, "__init__", spy)
    train(cfg, data_dir, tmp_path / "run", resume=True, progress_bar=False, log=quiet)
    assert starts == [11]


def test_orphan_temp_dirs_are_removed_and_resave_keeps_a_checkpoint(data_dir, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    cfg = tiny(max_steps=2, checkpoint_every=2, keep_checkpoints=1)
    run = tmp_path / "run"
    train(cfg, data_dir, run, progress_bar=False, log=quiet)
    root = run / "checkpoints"
    # what a SIGKILL during a save leaves: a full-size temp directory
    orphan = root / ".step_000004.abcd1234"
    shutil.copytree(root / "step_000002", orphan)
    # re-saving step 2 (keep_checkpoints = 1), killed between its two renames
    real_rename = os.rename
    seen = []

    def rename(src, dst):
        real_rename(src, dst)
        if str(dst).endswith(".old"):
            seen.append([p.name for p in checkpoint.list_checkpoints(run)])
            raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data_dir, run, resume=True, progress_bar=False, log=quiet)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not orphan.exists()  # removed by the resume's recovery
    # between the renames the old step_000002, moved aside, is still the visible checkpoint
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith(".step_000002.")
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_000002"]
    # a hard kill at that point (no except block runs): the .old dir is all there is
    old = root / ".step_000002.dead.old"
    os.rename(root / "step_000002", old)
    assert checkpoint.list_checkpoints(run) == [old]
    assert checkpoint.load(run)["step"] == 2
    train(cfg, data_dir, run, resume=True, progress_bar=False, log=quiet)
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]


def test_kill_while_pruning_leaves_no_half_deleted_step(tmp_path, monkeypatch):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    run = tmp_path / "run"
    for step in (1, 2):
        checkpoint.save(run, step, {"step": step}, {}, tok, keep=2)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **k):  # deletes one file of the pruned step, then dies
        if not (Path(path) / "state.pt").is_file():
            return real_rmtree(path, *a, **k)
        (Path(path) / "state.pt").unlink()
        raise SystemExit(137)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(SystemExit):
        checkpoint.save(run, 3, {"step": 3}, {}, tok, keep=2)  # prunes step 1
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    checkpoint.save(run, 4, {"step": 4}, {}, tok, keep=2)  # the next save cleans up
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003",
                                                                     "step_000004"]


def test_fresh_run_over_a_killed_first_run_logs_each_step_once(data_dir, tmp_path):  # noqa: F811
    # the kill loop's finding: killed after logging step 1, before its first checkpoint
    cfg = tiny(max_steps=2, checkpoint_every=100)
    train(cfg, data_dir, tmp_path / "run", progress_bar=False, log=quiet)
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if killed before the save
    train(cfg, data_dir, tmp_path / "run", progress_bar=False, log=quiet)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows if "loss" in json.loads(r)] == [1, 2]
