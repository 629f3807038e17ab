"""The package's layout is its architecture: imports go one way, and there are no cycles.

    ops   -> _core, config                    (the torch.library ops over the compiled core)
    data  -> atomic                           (corpus, tokenizer, token files, loader)
    model -> ops, data, config, checkpoint    (the GPT, its layers, loading a checkpoint)
    optim, train, infer, eval, bench, cli, export, validate: the users of the above

Every import counts, lazy ones inside functions included: a lazy import is still a
dependency, it only hides the cycle from the interpreter.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nanochat
import torch

ROOT = Path(nanochat.__file__).parent
# packages that must never import from the higher layers
ABOVE = {"train", "infer", "optim", "bench", "cli", "export", "validate", "interop", "eval"}
LOWER = {"ops": ABOVE | {"model", "data"}, "data": ABOVE | {"model", "ops"}, "model": ABOVE}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    mods = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                while name and name not in mods:  # `from pkg import symbol` -> pkg
                    name = name.rpartition(".")[0]
                if name and name != mod and name.startswith("nanochat"):
                    graph[mod].add(name)
    return graph


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    graph = _graph()
    # packages import their own __init__ implicitly; an __init__ importing its children is fine
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if n == m.rpartition(".")[0] or m == n.rpartition(".")[0]:
                continue  # a module and its own package
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_lower_layers_import_nothing_above_them():
    bad = [f"{m} imports {n}" for m, deps in _graph().items() for n in deps
           if _layer(m) in LOWER and _layer(n) in LOWER[_layer(m)]]
    assert not bad, "\n".join(bad)


def test_the_checks_can_fail(monkeypatch):
    """The two checks above on a graph with a known cycle and a known upward import."""
    fake = {"nanochat.ops.a": {"nanochat.train.loop"}, "nanochat.train.loop": {"nanochat.ops.a"}}
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: fake)
    for check in (test_no_import_cycles, test_lower_layers_import_nothing_above_them):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a bad graph")


def test_one_model_builder():
    """A GPT is constructed in nanochat/model/build.py only: the trainer, the benches, the
    recipes and checkpoint loading all build through it, so a bench times the trainer's step.
    (model_info's shape-only build on the meta device, which counts parameters, is the one
    other call.)"""
    places = set()
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "GPT"):
                inner = max((f for f in funcs if f.lineno <= node.lineno <= f.end_lineno),
                            key=lambda f: f.lineno, default=None)
                places.add(f"{path.relative_to(ROOT)}:{inner.name if inner else '<module>'}")
    places = sorted(places - {"model/gpt.py:model_info"})
    assert places == ["model/build.py:build_model"], places


def test_the_builder_sets_the_trainers_choices():
    from nanochat.config import apply_overrides, load_config
    from nanochat.model.build import build_model

    cfg = apply_overrides(load_config("tiny"), ["train.fused_loss=on",
                                                "train.bitlinear=torch",
                                                "train.bitlinear_backward=float32"])
    m = build_model(cfg)
    assert (m.fused_loss, m.blocks[0].attn_q.kernel) == ("on", "torch")
    assert m.blocks[0].attn_q.backward_precision == "float32"
    m2 = build_model(cfg, bitlinear="cpp", fused_loss="off")  # a bench's variant
    assert (m2.fused_loss, m2.blocks[0].attn_q.kernel) == ("off", "cpp")
    assert torch.equal(m.token_embd.weight, m2.token_embd.weight)  # seeded alike
