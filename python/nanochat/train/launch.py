"""The torchrun command line every launcher here runs: `nanochat train --nproc N`,
`nanochat recipe NAME --nproc N` and `nanochat bench train --nproc N` (one builder, so they
start ranks the same way).

    torchrun --standalone --nproc_per_node N -m nanochat train ...   # what it spells out

It runs torchrun as `python -m torch.distributed.run` with this interpreter, so the ranks
import the same nanochat and torch as the launching process.
"""

from __future__ import annotations

import sys


def check_nproc(nproc, what: str = "--nproc") -> int:
    """nproc as a positive int, or a ValueError naming `what`."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {nproc!r}")
    return nproc


def torchrun_command(nproc: int, module_args: list[str], module: str = "nanochat") -> list[str]:
    """argv of `torchrun --standalone --nproc_per_node nproc -m module *module_args`."""
    check_nproc(nproc)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", module, *module_args]


def display(cmd: list[str]) -> str:
    """The command as a user would type it: `torchrun ...` for the python -m prefix."""
    import shlex

    prefix = [sys.executable, "-m", "torch.distributed.run"]
    if cmd[:3] == prefix:
        cmd = ["torchrun", *cmd[3:]]
    return " ".join(shlex.quote(a) for a in cmd)
