"""Helpers for parity tests against PyTorch diffusers/transformers modules (the oracles).

A torch module's `state_dict()` goes through *our* converter (`convert.mapping.torch_to_flax`) onto
the abstract parameter tree of the Flax module, exactly as user checkpoints do.
"""

from __future__ import annotations

import jax
import numpy as np

from convert.mapping import torch_to_flax


def state_dict_numpy(torch_module) -> dict:
    """torch module -> {key: float32 numpy array}."""
    return {k: v.detach().cpu().float().numpy() for k, v in torch_module.state_dict().items()}


def randomize_norms(torch_module, seed: int = 0) -> None:
    """Give every GroupNorm/LayerNorm weight 1+0.1·N and bias 0.1·N so norms are exercised."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in torch_module.modules():
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and mod.weight is not None:
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))


def flax_params_from_torch(torch_module, flax_module, *init_args, **init_kwargs) -> dict:
    """Convert `torch_module`'s weights onto `flax_module`'s parameter tree (strict)."""
    abstract = jax.eval_shape(lambda: flax_module.init(jax.random.key(0), *init_args, **init_kwargs))["params"]
    return torch_to_flax(state_dict_numpy(torch_module), abstract, what=type(torch_module).__name__)


def nchw(x) -> np.ndarray:
    """NHWC (jax or numpy) -> NCHW numpy."""
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x) -> np.ndarray:
    """NCHW (torch or numpy) -> NHWC numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x).transpose(0, 2, 3, 1)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_close(got, want, *, atol: float = 1e-5, rtol: float = 1e-4) -> float:
    """compare.py's rule: max|got − want| ≤ atol + rtol·max|want|. Returns the max error."""
    err = max_diff(got, want)
    bound = atol + rtol * float(np.max(np.abs(np.asarray(want))))
    assert np.shape(got) == np.shape(want), (np.shape(got), np.shape(want))
    assert err <= bound, f"max |Δ| {err:.3g} > {bound:.3g}"
    return err
