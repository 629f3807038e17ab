"""The TOML config parser fuzzed with hypothesis: random documents built from the real keys
plus unknown ones, values of every TOML type (huge ints, nan/inf, nested tables, lists), raw
bytes, and random `--set` overrides must each load or raise ConfigError naming the file and
the key at fault; any other exception is a bug.

    python -m pytest tests/test_config_fuzz.py                            # ~300 examples each
    NANOCHAT_FUZZ_EXAMPLES=20000 python -m pytest tests/test_config_fuzz.py -s   # campaign

Deterministic (derandomized, no example database), so the default run is the same on every
machine; the campaign prints how many examples each property tried.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nanochat.config import ConfigError, RunConfig, apply_overrides, load_config

EXAMPLES = int(os.environ.get("NANOCHAT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))
TRIED: dict[str, int] = {}


def _schema(cls) -> dict:
    """{key: nested schema dict or the field's type} of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: _schema(hints[f.name]) if dataclasses.is_dataclass(hints[f.name])
            else hints[f.name] for f in dataclasses.fields(cls)}


SCHEMA = _schema(RunConfig)

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2, 3, 4, 64, 2**31, 2**62]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["auto", "cpp", "torch", "silu", "relu2", "SSL", "muon", "8bit", "fp32"]),
    st.booleans(),
    st.datetimes(min_value=datetime.datetime(1, 1, 1), max_value=datetime.datetime(9999, 1, 1)),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)
unknown_key = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)


@st.composite
def documents(draw, schema=SCHEMA, depth=0) -> dict:
    """A table with some of `schema`'s keys (right or wrong types) and maybe unknown keys."""
    doc = {}
    for key in draw(st.lists(st.sampled_from(sorted(schema)), max_size=4, unique=True)):
        sub = schema[key]
        if isinstance(sub, dict) and draw(st.integers(0, 4)):
            doc[key] = draw(documents(sub, depth + 1))
        else:
            doc[key] = draw(values)
    if draw(st.integers(0, 5)) == 0:
        doc[draw(unknown_key)] = draw(values)
    return doc


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(v, datetime.datetime):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


def _keys(doc) -> set[str]:
    out = set()
    for k, v in doc.items():
        out.add(k)
        if isinstance(v, dict):
            out |= _keys(v)
    return out


def _load(text: str | bytes) -> tuple[Path, object]:
    with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as f:
        f.write(text.encode() if isinstance(text, str) else text)
    path = Path(f.name)
    try:
        return path, load_config(str(path))
    except ConfigError as e:
        return path, e
    finally:
        path.unlink()


@FUZZ
@given(documents())
def test_random_documents_load_or_name_the_key(doc):
    TRIED["documents"] = TRIED.get("documents", 0) + 1
    text = "\n".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in doc.items())
    path, out = _load(text)
    if isinstance(out, ConfigError):
        msg = str(out)
        assert str(path) in msg, msg
        assert "invalid TOML" in msg or any(k in msg for k in _keys(doc)), (msg, doc)
    else:
        assert isinstance(out, RunConfig)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_random_bytes_load_or_raise_config_error(raw):
    TRIED["bytes"] = TRIED.get("bytes", 0) + 1
    path, out = _load(raw)
    assert isinstance(out, RunConfig) or str(path) in str(out)


@FUZZ
@given(st.lists(st.tuples(
    st.one_of(st.sampled_from(["model", "train", "optim", "model.moe", "optim.galore", "x",
                               "model.", ".", ""]),
              st.text(max_size=6)),
    st.one_of(st.sampled_from(sorted({k for t in SCHEMA.values() for k in t}) + ["", "moe"]),
              st.text(max_size=6)),
    st.one_of(values.map(_toml_value), st.text(max_size=10))), max_size=3))
def test_random_overrides_apply_or_raise_config_error(sets):
    TRIED["overrides"] = TRIED.get("overrides", 0) + 1
    items = [f"{t}.{k}={v}" for t, k, v in sets]
    try:
        assert isinstance(apply_overrides(RunConfig(), items), RunConfig)
    except ConfigError as e:
        assert "--set" in str(e)


@pytest.mark.parametrize("text, named", [
    ("[train]\nbatch_size = 99999999999999999999\n", "train.batch_size"),  # past int64
    ("[optim]\nlr = 1e999999\n", "optim.lr"),
    ("[optim]\nlr = 100000000000000000000000000000000000000000" + "0" * 300 + "\n", "optim.lr"),
    ("[train]\ntime_budget_s = nan\n", "train.time_budget_s"),
    ("[model.mtp]\nloss_weights = [1.0, inf]\n", "model.mtp.loss_weights[1]"),
    (b"[train]\nbatch_size = 4 # \xff\n", "not valid UTF-8"),
])
def test_found_by_the_fuzzer(text, named):
    path, out = _load(text)
    assert isinstance(out, ConfigError) and named in str(out) and str(path) in str(out), out


def teardown_module(module):
    if TRIED:
        print(f"\nconfig fuzz: examples tried {TRIED} (NANOCHAT_FUZZ_EXAMPLES={EXAMPLES})")
