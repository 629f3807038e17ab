"""nanochat: ternary (BitNet b1.58) language models you can train, export and embed.

`import nanochat` is cheap: the compiled core (`nanochat._C`) and torch load on
first use. Start with `nanochat info` on the command line.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("nanochat-ternary")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["Engine", "__version__"]


def __getattr__(name: str):
    if name == "Engine":  # lazy: importing nanochat loads no compiled code
        from nanochat.infer.engine import Engine

        return Engine
    raise AttributeError(f"module 'nanochat' has no attribute {name!r}")
