"""The tiny end-to-end PASD case and its PyTorch oracle, shared by `tests/sampling/e2e_test.py` and
`benchmarks/bf16_parity.py` (torch, diffusers and transformers are imported on use: the `[test]` extra).

`build_e2e_dir(root, steps)` lays out the folder `python -m pasd_jax.golden --e2e` reads: the PASD
UNet and RRDB ControlNet of the golden fixtures, a seeded diffusers VAE and transformers CLIP, SD1.5
DDIM, a 128² LQ image and every noise supplied. `torch_reference` runs the reference procedure
(PASD_REFERENCE §7.3–7.4) with the PyTorch pieces themselves: CLIP, the VAE posterior sample and
decode, `DDIMScheduler.add_noise` twice (ANS) and `step`, with the ControlNet + PASD UNet noise
prediction from our Flax nets (proven against the PyTorch PASD goldens in tests/models).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
from safetensors.numpy import save_file

from golden import harness as golden
from tests.torch_oracle import nchw, nhwc, randomize_norms

GOLDEN_FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "golden"
GUIDANCE, COND_SCALE, ADDED_LEVEL, SCALING = 7.5, 0.9, 900, 0.18215


def copy_nets(root: pathlib.Path, unet_dir: str = "pasd/unet", controlnet_dir: str = "pasd/controlnet") -> None:
    """The golden fixtures' PASD UNet and RRDB ControlNet under `root`."""
    shutil.copytree(GOLDEN_FIXTURES / "pasd" / "unet", root / unet_dir)
    shutil.copytree(GOLDEN_FIXTURES / "pasd_rrdb" / "controlnet", root / controlnet_dir)


def write_vae_and_clip(e2e: pathlib.Path):
    """Seeded tiny diffusers VAE and transformers CLIP (norms randomised), saved under `e2e`."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32),
                                  layers_per_block=1, norm_num_groups=8, sample_size=64).eval()
    randomize_norms(vae, seed=1)
    vae.save_pretrained(e2e / "vae")
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, eos_token_id=2)).eval()
    randomize_norms(clip, seed=2)
    clip.save_pretrained(e2e / "text_encoder")
    return vae, clip


def write_inputs(e2e: pathlib.Path, sched, guidance: float, cond_scale: float, added_level: int) -> dict:
    """Seeded prompt ids, 128² LQ image and every noise (latent 16²) -> `e2e/inputs.safetensors`."""
    import torch

    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 999, (2, 77), generator=gen)
    ids[:, 0], ids[0, 9:], ids[1, 14:] = 1, 2, 2  # BOS, prompt, EOS padding (eos id 2: legacy argmax rule)
    latent = (1, 4, 16, 16)
    inputs = {"lq_image": torch.rand((1, 3, 128, 128), generator=gen),
              "input_ids": ids[1:], "negative_input_ids": ids[:1],
              "noise.vae_posterior": torch.randn(latent, generator=gen),
              "noise.first_timestep": torch.randn(latent, generator=gen),
              "noise.added_noise_level": torch.randn(latent, generator=gen),
              "guidance_scale": torch.tensor(guidance), "conditioning_scale": torch.tensor(cond_scale),
              "added_noise_level": torch.tensor(added_level), "timesteps": sched.timesteps.clone()}
    save_file({k: v.numpy() for k, v in inputs.items()}, str(e2e / "inputs.safetensors"))
    return inputs


def build_e2e_dir(root: pathlib.Path, steps: int = 3, note: str = "tiny e2e folder of tests/e2e_case.py"):
    """Write the tiny e2e folder under `root` (SD1.5 DDIM); returns the torch (vae, clip, scheduler, inputs)."""
    import diffusers

    copy_nets(root)
    e2e = root / "e2e"
    vae, clip = write_vae_and_clip(e2e)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.save_config(e2e / "scheduler")
    sched.set_timesteps(steps)
    inputs = write_inputs(e2e, sched, GUIDANCE, COND_SCALE, ADDED_LEVEL)
    (e2e / "meta.json").write_text(json.dumps({"note": note}))
    return vae, clip, sched, inputs


def torch_reference(root: pathlib.Path, vae, clip, sched, inputs) -> dict:
    """The reference procedure in PyTorch, ControlNet + UNet from our golden-proven Flax nets: every
    tensor the e2e harness writes (NCHW float32)."""
    import torch

    unet, unet_p = golden.load_unet(str(root / "pasd" / "unet"))
    cn, cn_p = golden.load_controlnet(str(root / "pasd" / "controlnet"))

    @jax.jit
    def eps_fn(x, t, text, cond):
        tb = jnp.full((x.shape[0],), t, jnp.int32)
        _, down, mid = cn.apply({"params": cn_p}, x, tb, text, cond, conditioning_scale=COND_SCALE)
        return unet.apply({"params": unet_p}, x, tb, text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)

    out = {}
    with torch.no_grad():
        ids = torch.cat([inputs["negative_input_ids"], inputs["input_ids"]])
        text = clip(ids).last_hidden_state
        out["prompt_embeds"] = text.numpy()
        lq = inputs["lq_image"]
        dist = vae.encode(2 * lq - 1).latent_dist
        z0 = SCALING * (dist.mean + dist.std * inputs["noise.vae_posterior"])
        out["vae_latent_z0"] = z0.numpy()
        t0 = sched.timesteps[:1]
        x = sched.add_noise(z0, inputs["noise.first_timestep"], t0)
        x = sched.add_noise(x, inputs["noise.added_noise_level"], torch.tensor([ADDED_LEVEL]))
        out["init_latents"] = x.numpy()
        cond = nhwc(torch.cat([lq, lq]))
        for i, t in enumerate(sched.timesteps):
            x_in = nhwc(torch.cat([x, x]))
            eps = torch.from_numpy(nchw(eps_fn(x_in, int(t), text.numpy(), cond)).copy())
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + GUIDANCE * (e_c - e_u), t, x).prev_sample
            out[f"step{i}.latents"] = x.numpy()
        out["final_latents"] = x.numpy()
        decoded = vae.decode(x / SCALING).sample
        out["decoded"] = decoded.numpy()
        out["image"] = (decoded / 2 + 0.5).clamp(0, 1).numpy()
    return out
