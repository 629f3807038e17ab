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
