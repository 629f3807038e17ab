"""The torch.library ops over the compiled core (`nanochat._C`): ternary GEMM/GEMV, BitLinear's
op, attention, RMSNorm, SwiGLU, the fused head loss and row subsets, each with a fake kernel and
a pure-torch path. Imports nothing from the rest of the package but `_core`."""
