"""cmcore: consistency models (Song et al., 2023) and their baselines in plain PyTorch.

The contract between modules is the denoiser ``D(x, sigma) -> x0`` and the consistency
function ``f(x, t) -> x_eps``; losses, solvers and samplers take such callables.
"""

__version__ = "0.1.0"
