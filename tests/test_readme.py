"""The README's two set-up commands are the ones .ci/run executes."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = dict(re.findall(r"^(README_MAIN|README_TEST)='(.*)'$", ci, flags=re.M))
    assert set(commands) == {"README_MAIN", "README_TEST"}
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert commands["README_MAIN"] in blocks
    assert commands["README_TEST"] in blocks
    assert "pytest" in commands["README_TEST"]


def test_collider_figures_are_the_benchmarks_pages():
    """Every figure in README's Collider paragraph is one docs/benchmarks.md states, so the
    README cannot keep quoting numbers the measurements have moved past."""
    readme = (ROOT / "README.md").read_text()
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    para = re.search(r"^Collider token filtering.*?(?=\n\n)", readme, flags=re.M | re.S).group(0)
    figures = re.findall(r"\+?\d+\.\d+(?:-\d+\.\d+)?x?(?: to \+\d+\.\d+)?", " ".join(para.split()))
    assert len(figures) >= 6, figures
    missing = [f for f in figures if f not in " ".join(docs.split()) and f != "0.35"]
    assert not missing, f"README's Collider figures not in docs/benchmarks.md: {missing}"
    for caveat in ("1.15x", "held-out loss"):  # the GPU result and the loss cost
        assert caveat in para


def test_run_all_runs_every_bench():
    """benchmarks/run_all.sh promises every `nanochat bench`: its list is the CLI's."""
    import argparse

    from nanochat.cli import build_parser

    bench = next(a for a in build_parser()._subparsers._group_actions[0].choices["bench"]
                 ._actions if isinstance(a, argparse._SubParsersAction))
    script = (ROOT / "benchmarks" / "run_all.sh").read_text()
    listed = re.search(r"^for name in (.*); do$", script, flags=re.M).group(1).split()
    assert sorted(listed) == sorted(bench.choices)
