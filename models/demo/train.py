"""Train the demo text-to-image model from scratch on the procedural shapes dataset.

The result is a diffusers Stable Diffusion 3 pipeline directory (two tiny CLIP text encoders, no T5, a small
``SD3Transformer2DModel`` and a small ``AutoencoderKL``) that ``StableDiffusion3Pipeline.from_pretrained``
loads (pass ``text_encoder_3=None, tokenizer_3=None``: its ``model_index.json`` lists them as ``[null, null]``);
generate with ``max_sequence_length=0`` (no T5 tokens)::

    python -m latentrt.models.demo.train --out DIR --seed 0 --record DIR.json              # CPU, steps-bound
    python -m latentrt.models.demo.train --out DIR --device cuda --steps 4000 --minutes 2.7  # the shipped run

The stages, in order:

1. tokenizer: a byte-level BPE trained on training captions (the same one for both CLIP slots);
2. VAE: an ``AutoencoderKL`` (64x64x3 -> 16x16x4) trained with L1 + a small KL term; then
   ``shift_factor`` and ``scaling_factor`` are set from the latent mean and standard deviation, as in SD3;
3. latents: the dataset is encoded once and cached;
4. denoiser: the transformer and both text encoders are trained jointly with the rectified-flow objective of
   SD3 (https://arxiv.org/abs/2403.03206): ``x_t = (1 - sigma) x_0 + sigma noise``, target ``noise - x_0``,
   timestep ``1000 sigma``, ``sigma`` logit-normal then shifted like the scheduler's. The conditioning comes
   from the pipeline's own ``encode_prompt(..., max_sequence_length=0)``, with 10% empty prompts for
   classifier-free guidance. An EMA of the weights is what gets saved.

With the default config the run is bound by steps and reproducible from ``--seed`` on a given machine; per-step
timings measured on an idle 2-core CPU (0.26 s per VAE step, 0.65 s per denoiser step) put it at about
40 minutes there. ``--minutes`` bounds the denoiser stage by wall time instead (see ``TrainConfig.minutes``).
See ``TRAINING.md`` for the shipped weights' record.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import analyser, dataset

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every hyper-parameter of a training run; the defaults are the shipped model's."""

    seed: int = 0
    num_images: int = 30000  # training images (pre-generated once, seen many times)
    # Tokenizer and text encoders (both CLIP slots get the same architecture, different initialisations).
    vocab_size: int = 384
    max_length: int = 16
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 2
    text_projection: int = 64
    # VAE: 64x64x3 <-> 16x16x4.
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # Denoiser.
    layers: int = 6
    heads: int = 4
    head_dim: int = 32
    steps: int = 2400
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.998
    prompt_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 2.0  # of the training sigmas and of the shipped scheduler
    # Wall-clock budget of the denoiser stage: the learning-rate schedule follows whichever of steps and
    # time runs out first, and training stops there. None: steps alone (bit-reproducible on one machine).
    minutes: float | None = None
    threads: int = 2
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.max_length < 16:
            raise ValueError(f"TrainConfig.max_length: got {self.max_length}, expected >= 16 to fit every caption.")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"TrainConfig.prompt_dropout: got {self.prompt_dropout}, expected a value in [0, 1).")


# --- tokenizer --------------------------------------------------------------------------------------


def train_tokenizer(captions: Sequence[str], *, vocab_size: int, max_length: int):
    """A byte-level BPE over ``captions`` wrapped as a ``transformers.PreTrainedTokenizerFast``.

    ``<|startoftext|>`` and ``<|endoftext|>`` (ids 0 and 1) wrap every sequence; padding uses
    ``<|endoftext|>``, as CLIP's tokenizer does, and ``model_max_length`` is ``max_length``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, tokenizer.token_to_id(BOS_TOKEN)), (EOS_TOKEN, tokenizer.token_to_id(EOS_TOKEN))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=max_length,
    )


# --- models -----------------------------------------------------------------------------------------


def build_text_encoder(config: TrainConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=4 * config.text_hidden,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length,
        projection_dim=config.text_projection,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(text_config)


def build_vae(config: TrainConfig):
    import torch
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=8,
        sample_size=dataset.IMAGE_SIZE,
        force_upcast=False,
        mid_block_add_attention=False,
    )
    # Start the posterior's log-variance near -8 (std ~0.02): with the tiny KL weight the decoder then
    # learns from nearly clean latents from the first step instead of from std ~1 noise.
    with torch.no_grad():
        vae.quant_conv.bias[config.latent_channels :] -= 8.0
    return vae


def build_transformer(config: TrainConfig, latent_size: int):
    from diffusers import SD3Transformer2DModel

    width = config.heads * config.head_dim
    return SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=2,
        in_channels=config.latent_channels,
        num_layers=config.layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.heads,
        # The pipeline pads [CLIP-L | CLIP-G] penultimate states to this width (no T5 tokens).
        joint_attention_dim=2 * config.text_hidden,
        caption_projection_dim=width,
        pooled_projection_dim=2 * config.text_projection,
        out_channels=config.latent_channels,
        pos_embed_max_size=latent_size // 2,
    )


# --- stages -----------------------------------------------------------------------------------------


def _cosine_lr(step: int, *, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _to_model_input(images: np.ndarray, device) -> "torch.Tensor":  # noqa: F821
    import torch

    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae, images: np.ndarray, config: TrainConfig, *, rng: np.random.Generator, log_every: int = 100) -> float:
    """Fit ``vae`` to reconstruct ``images`` (uint8 [N, 64, 64, 3]); returns the mean L1 of the last steps."""
    import torch

    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    vae.train()
    losses: list[float] = []
    for step in range(config.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * _cosine_lr(step, total=config.vae_steps, warmup=50)
        x = _to_model_input(images[rng.integers(len(images), size=config.vae_batch)], config.device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        l1 = (recon - x).abs().mean()
        loss = l1 + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(l1.item())
        if (step + 1) % log_every == 0:
            logger.info("vae step %d/%d  l1 %.4f", step + 1, config.vae_steps, np.mean(losses[-log_every:]))
    vae.eval()
    return float(np.mean(losses[-log_every:]))


@dataclasses.dataclass
class _EMA:
    """Exponential moving average of a set of modules' parameters (decay warms up as (1+n)/(10+n))."""

    modules: list
    decay: float
    shadow: list = dataclasses.field(default_factory=list)
    updates: int = 0

    def __post_init__(self) -> None:
        self.shadow = [p.detach().clone() for m in self.modules for p in m.parameters()]

    def update(self) -> None:
        import torch

        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            params = [p for m in self.modules for p in m.parameters()]
            torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1.0 - decay)

    def copy_to_modules(self) -> None:
        import torch

        with torch.no_grad():
            for shadow, p in zip(self.shadow, [p for m in self.modules for p in m.parameters()]):
                p.copy_(shadow)


def train_denoiser(
    pipe, latents, captions: Sequence[str], config: TrainConfig, *, rng: np.random.Generator, log_every: int = 50
) -> dict[str, float]:
    """Train ``pipe.transformer`` and both text encoders on cached, normalised ``latents`` [N, C, h, w].

    Returns ``{"loss": mean loss of the last ``log_every`` steps, "steps": steps done, "stopped_early": 0 or 1}``.
    """
    import torch

    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay)
    ema = _EMA(modules, config.ema_decay)
    for m in modules:
        m.train()
    generator = torch.Generator(device="cpu").manual_seed(config.seed + 1)
    start, losses, step = time.monotonic(), [], 0
    stopped_early = 0
    for step in range(config.steps):
        # Progress through the schedule: by steps, or by time when a budget is set and runs out sooner.
        progress = step / config.steps
        if config.minutes is not None:
            progress = max(progress, (time.monotonic() - start) / (60.0 * config.minutes))
            if progress >= 1.0:
                logger.warning("denoiser: stopped at step %d, the %.1f minute budget is spent", step, config.minutes)
                stopped_early = 1
                break
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _cosine_lr(
                int(progress * config.steps), total=config.steps, warmup=config.warmup
            )
        index = rng.integers(len(captions), size=config.batch)
        drop = rng.random(config.batch) < config.prompt_dropout
        prompts = ["" if dropped else captions[i] for i, dropped in zip(index, drop)]
        x0 = latents[torch.from_numpy(index)].to(config.device)

        # The conditioning exactly as inference computes it: CLIP-L | CLIP-G penultimate states, no T5 tokens.
        prompt_embeds, _, pooled_embeds, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=torch.device(config.device),
            do_classifier_free_guidance=False, max_sequence_length=0,
        )
        # Rectified flow: logit-normal sigma, shifted like FlowMatchEulerDiscreteScheduler(shift).
        u = torch.sigmoid(torch.randn(config.batch, generator=generator) * config.logit_std + config.logit_mean)
        sigmas = (config.shift * u / (1.0 + (config.shift - 1.0) * u)).to(config.device)
        noise = torch.randn(x0.shape, generator=generator).to(config.device)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1.0 - s) * x0 + s * noise
        prediction = pipe.transformer(
            hidden_states=noisy, timestep=sigmas * 1000.0, encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled_embeds, return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), (noise - x0).float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            logger.info(
                "denoiser step %d/%d  loss %.4f  lr %.2e  %.0f s",
                step + 1,
                config.steps,
                np.mean(losses[-log_every:]),
                optimizer.param_groups[0]["lr"],
                time.monotonic() - start,
            )
    else:
        step = config.steps
    for m in modules:
        m.eval()
    ema.copy_to_modules()
    return {"loss": float(np.mean(losses[-log_every:])), "steps": float(step), "stopped_early": float(stopped_early)}


def save_pipeline(pipe, out: str | os.PathLike) -> None:
    """``pipe.save_pretrained(out)``, with the tokenizers declared as ``PreTrainedTokenizerFast``.

    transformers 5 names the class ``TokenizersBackend`` (``PreTrainedTokenizerFast`` is its alias); the
    alias is what older transformers versions and ``AutoTokenizer`` everywhere understand.
    """
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    for name in ("tokenizer", "tokenizer_2"):
        index[name] = ["transformers", "PreTrainedTokenizerFast"]
        config_path = out / name / "tokenizer_config.json"
        tokenizer_config = json.loads(config_path.read_text())
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def train(
    out: str | os.PathLike, config: TrainConfig = TrainConfig(), *, record: str | os.PathLike | None = None
) -> dict:
    """Run every stage and save the pipeline to ``out``; returns (and optionally writes) the training record.

    The record holds the config, the wall time of each stage, the final losses and the latent statistics.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    times: dict[str, float] = {}
    clock = time.monotonic()

    # 0. Data.
    images, captions, attributes = dataset.make_dataset(config.num_images, seed=config.seed, split="train")
    times["data_s"] = time.monotonic() - clock
    logger.info("data: %d images in %.0f s", len(images), times["data_s"])

    # 1. Tokenizer.
    tokenizer = train_tokenizer(captions, vocab_size=config.vocab_size, max_length=config.max_length)
    longest = max(len(tokenizer(text).input_ids) for text in captions[:5000])
    if longest > config.max_length:
        raise ValueError(f"train: captions need {longest} tokens, more than max_length={config.max_length}.")
    logger.info("tokenizer: %d tokens, longest caption %d tokens", len(tokenizer), longest)

    # 2. VAE.
    stage = time.monotonic()
    vae = build_vae(config).to(config.device)
    vae_l1 = train_vae(vae, images, config, rng=rng)
    times["vae_s"] = time.monotonic() - stage

    # 3. Latents, and SD3-style normalisation from their statistics.
    stage = time.monotonic()
    with torch.no_grad():
        chunks = [
            vae.encode(_to_model_input(images[i : i + 256], config.device)).latent_dist.mode().cpu()
            for i in range(0, len(images), 256)
        ]
    raw = torch.cat(chunks)
    shift_factor, scaling_factor = raw.mean().item(), 1.0 / raw.std().item()
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    latents = ((raw - shift_factor) * scaling_factor).to(config.device)
    with torch.no_grad():
        recon = vae.decode(raw[:256].to(config.device)).sample.clamp(-1, 1).add(1).mul(127.5).round()
    recon = recon.byte().permute(0, 2, 3, 1).cpu().numpy()
    vae_accuracy = analyser.score(zip(recon, attributes[:256]))["overall"]
    times["encode_s"] = time.monotonic() - stage
    logger.info(
        "latents %s: shift %.4f scale %.4f; analyser on VAE reconstructions %.3f",
        tuple(latents.shape), shift_factor, scaling_factor, vae_accuracy,
    )

    # 4. Denoiser and text encoders.
    stage = time.monotonic()
    pipe = StableDiffusion3Pipeline(
        transformer=build_transformer(config, latents.shape[-1]).to(config.device),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.shift),
        vae=vae,
        text_encoder=build_text_encoder(config, tokenizer).to(config.device),
        tokenizer=tokenizer,
        text_encoder_2=build_text_encoder(config, tokenizer).to(config.device),
        tokenizer_2=copy.deepcopy(tokenizer),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    result = train_denoiser(pipe, latents, captions, config, rng=rng)
    times["denoiser_s"] = time.monotonic() - stage

    pipe.to("cpu")
    save_pipeline(pipe, out)
    times["total_s"] = time.monotonic() - clock
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    summary = {
        "config": dataclasses.asdict(config),
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "final_loss": {"vae_l1": vae_l1, "denoiser_mse": result["loss"]},
        "vae_reconstruction_accuracy": vae_accuracy,
        "denoiser_steps_done": int(result["steps"]),
        "stopped_early": bool(result["stopped_early"]),
        "latent_stats": {"shift_factor": shift_factor, "scaling_factor": scaling_factor},
        "weights_bytes": size,
        "torch": torch.__version__,
    }
    logger.info("done in %.0f s; pipeline %s (%.1f MB)", times["total_s"], out, size / 1e6)
    if record is not None:
        Path(record).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentrt.models.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the diffusers pipeline to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock cap of the denoiser stage")
    parser.add_argument("--steps", type=int, default=None, help="denoiser steps (default: the config's)")
    parser.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: the config's)")
    parser.add_argument("--num-images", type=int, default=None, help="training images (default: the config's)")
    parser.add_argument("--device", default="cpu", help="torch device (the shipped model is trained on cpu)")
    parser.add_argument("--record", default=None, help="write the training record (json) to this path")
    args = parser.parse_args(argv)
    overrides = {
        key: value
        for key, value in (("steps", args.steps), ("vae_steps", args.vae_steps), ("num_images", args.num_images))
        if value is not None
    }
    config = TrainConfig(seed=args.seed, minutes=args.minutes, device=args.device, **overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(args.out, config, record=args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
