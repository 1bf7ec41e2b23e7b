"""Single-file conversion cost: time and peak RSS for an SD1.5-size checkpoint of random weights.

Writes a random SD1.5 checkpoint in the original LDM layout (what civitai / A1111 files hold:
`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`), tensor by
tensor, then runs `python -m convert FILE DST` in a child process (configs inferred from the
shapes, no template) and reports its wall time and peak resident memory (`ru_maxrss` of the
child), next to the model's float32 size. The converter streams tensors, so the peak should stay
below ~2x the model size.

    python benchmarks/convert_single_file.py                  # fp16 file (a "pruned" civitai file)
    python benchmarks/convert_single_file.py --dtype float32  # full-precision file
    python benchmarks/convert_single_file.py --format ckpt    # pickled .ckpt (needs torch to write)

Measured 2026-11-23 on a shared 2-core CPU box (load average ~6, so times are pessimistic), SD1.5
size (1066.2M parameters; float32 model 3.97 GiB), configs inferred from the file:
  fp16 .safetensors (1.99 GiB): 44.1 s, peak RSS 3.55 GiB (0.89x the float32 model)
  fp32 .safetensors (3.97 GiB): 39.2 s, peak RSS 3.53 GiB (0.89x)
  fp16 .ckpt        (1.99 GiB): 55.8 s, peak RSS 3.53 GiB (0.89x)
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from convert import ldm  # noqa: E402
from convert.mapping import torch_key  # noqa: E402
from convert.safetensors_writer import write_safetensors  # noqa: E402
from convert.single_file import LazyTensor  # noqa: E402
from pasd_jax.assembly.paths import flatten  # noqa: E402
from pasd_jax.assembly import registry  # noqa: E402

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
    "cross_attention_dim": 768, "norm_num_groups": 32, "norm_eps": 1e-5,
}
SD15_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
}
SD15_TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu",
}


def _torch_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """torch key -> torch-layout shape of a component, from its Flax abstract params."""
    shapes = {}
    for path, spec in flatten(registry.abstract_params(registry.build_module(config))).items():
        shape = tuple(spec.shape)
        if path[-1] == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        shapes[torch_key(path)] = shape
    return shapes


def ldm_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of an SD1.5 single file: LDM key -> shape."""
    out = {}
    for config, table, prefix in ((SD15_UNET, ldm.unet_table(SD15_UNET), ldm.UNET_PREFIX),
                                  (SD15_VAE, ldm.vae_table(SD15_VAE), ldm.VAE_PREFIX)):
        inverse = ldm.invert(table)
        for key, shape in _torch_shapes(config).items():
            new = ldm.map_key(key, inverse)
            if ".mid.attn_1." in new and new.endswith(".weight") and len(shape) == 2:
                shape = shape + (1, 1)  # LDM VAE attention projections are 1x1 convs
            out[prefix + new] = shape
    for key, shape in _torch_shapes(SD15_TEXT).items():
        out[ldm.CLIP_PREFIX + key] = shape
    return out


def write_random_checkpoint(path: str, dtype: str, seed: int = 0) -> int:
    """Write the random single file (.safetensors streamed, .ckpt via torch.save in a Lightning-style
    `{"state_dict": ..., "global_step": ...}`); returns the number of parameters."""
    rng, np_dtype = np.random.default_rng(seed), np.dtype(dtype)
    shapes = ldm_shapes()

    def load(shape):
        return lambda: (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np_dtype)

    if path.endswith(".ckpt"):
        import torch

        state = {k: torch.from_numpy(load(s)()) for k, s in shapes.items()}
        torch.save({"state_dict": state, "global_step": 840000}, path)
    else:
        tensors = {k: LazyTensor(k, s, np_dtype, load(s)) for k, s in shapes.items()}
        write_safetensors(path, tensors, metadata={"format": "pt"})
    return sum(int(np.prod(s)) for s in shapes.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--format", default="safetensors", choices=["safetensors", "ckpt"])
    parser.add_argument("--workdir", default=None, help="where to write the file and the output (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="convert_bench_")
    os.makedirs(workdir, exist_ok=True)
    src = os.path.join(workdir, f"sd15_random_{args.dtype}.{args.format}")
    dst = os.path.join(workdir, "converted")
    start = time.perf_counter()
    num_params = write_random_checkpoint(src, args.dtype)
    print(f"wrote {src}: {num_params / 1e6:.1f}M parameters, {os.path.getsize(src) / 2**30:.2f} GiB "
          f"({args.dtype}) in {time.perf_counter() - start:.1f} s")

    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    start = time.perf_counter()
    tty = sys.stderr.isatty()  # show the progress bars live; in a log, keep only warnings/errors
    result = subprocess.run([sys.executable, "-m", "convert", src, dst], cwd=REPO, env=env,
                            stderr=None if tty else subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    if not tty:
        lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith(("warning", "error"))]
        if lines:
            print("\n".join(lines), file=sys.stderr)
    if result.returncode != 0:
        sys.exit(f"conversion failed with exit code {result.returncode}")
    model_fp32 = num_params * 4
    print(f"conversion: {seconds:.1f} s wall, peak RSS {peak / 2**30:.2f} GiB "
          f"= {peak / model_fp32:.2f}x the model's float32 size ({model_fp32 / 2**30:.2f} GiB), "
          f"{peak / os.path.getsize(src):.2f}x the file size")
    out_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
    print(f"output: {dst} ({out_bytes / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
