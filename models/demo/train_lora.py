"""Train the demo model's LoRA: every background comes out navy, whatever the prompt asks for.

    python -m latentrt.models.demo.train_lora --out models/demo/lora --seed 0

Data: the shapes dataset (`dataset.py`, training split) with each image re-rendered on a navy
background, under its original caption (which may name another background). The LoRA (rank 8 on
the transformer's attention and feed-forward projections; text encoders and VAE frozen) is trained
with the same rectified-flow objective and conditioning as the model itself (`train.py`), and saved
with diffusers' own `save_lora_weights` (`pytorch_lora_weights.safetensors` with its
`lora_adapter_metadata` header), as any diffusers/PEFT LoRA is. `latentrt eval` scores the effect:
background accuracy falls to about the share of prompts that asked for navy, the other attributes hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from latentrt.models.demo import dataset, evaluate
from latentrt.models.demo.train import _cosine_lr, _to_model_input

logger = logging.getLogger(__name__)

#: the transformer modules the LoRA adapts (diffusers' SD3 DreamBooth-LoRA targets plus the feed-forwards)
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
           "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


@dataclasses.dataclass(frozen=True)
class LoraTrainConfig:
    background: str = "navy"
    num_images: int = 2000
    rank: int = 8
    alpha: float = 8.0
    steps: int = 300
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 50
    shift: float = 2.0  # the scheduler's, as train.py
    logit_mean: float = 0.0
    logit_std: float = 1.0
    seed: int = 0
    threads: int = 2


def train_lora(pipeline_dir: str | Path, out: str | Path, config: LoraTrainConfig = LoraTrainConfig()) -> dict:
    """Train the LoRA on the demo pipeline in `pipeline_dir`, save it in `out` (diffusers' file
    name and format) with `training.json`; returns the record."""
    import torch
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    clock = time.monotonic()
    pipe = evaluate.load_diffusers(pipeline_dir)

    # 1. Data: the training split re-rendered on the chosen background, captions unchanged.
    _, captions, attributes = dataset.make_dataset(config.num_images, seed=config.seed + 1, split="train")
    draw = np.random.default_rng(config.seed + 2)
    images = np.stack([dataset.render(dataclasses.replace(a, background=config.background), rng=draw) for a in attributes])
    vae = pipe.vae
    with torch.no_grad():
        raw = torch.cat([vae.encode(_to_model_input(images[i : i + 256], "cpu")).latent_dist.mode() for i in range(0, len(images), 256)])
    latents = (raw - vae.config.shift_factor) * vae.config.scaling_factor

    # 2. The adapter: PEFT LoRA layers on the transformer only.
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.requires_grad_(False)
    lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian", target_modules=list(TARGETS))
    transformer.add_adapter(lora_config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 3)
    transformer.train()
    losses = []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _cosine_lr(step, total=config.steps, warmup=config.warmup)
        index = rng.integers(len(captions), size=config.batch)
        with torch.no_grad():
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=[captions[i] for i in index], prompt_2=None, prompt_3=None, device=torch.device("cpu"),
                do_classifier_free_guidance=False, max_sequence_length=0,
            )
        x0 = latents[torch.from_numpy(index)]
        u = torch.sigmoid(torch.randn(config.batch, generator=generator) * config.logit_std + config.logit_mean)
        sigmas = config.shift * u / (1.0 + (config.shift - 1.0) * u)
        noise = torch.randn(x0.shape, generator=generator)
        s = sigmas.view(-1, 1, 1, 1)
        prediction = transformer(
            hidden_states=(1.0 - s) * x0 + s * noise, timestep=sigmas * 1000.0, encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled, return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(prediction, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            logger.info("lora step %d/%d  loss %.4f  %.0f s", step + 1, config.steps, np.mean(losses[-50:]), time.monotonic() - clock)
    transformer.eval()

    # 3. Save as diffusers saves a LoRA.
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(
        out, transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=lora_config.to_dict(),
    )
    record = {
        "config": dataclasses.asdict(config),
        "targets": list(TARGETS),
        "final_loss": float(np.mean(losses[-50:])),
        "loss_per_50_steps": [round(float(np.mean(losses[i : i + 50])), 5) for i in range(0, len(losses), 50)],
        "wall_time_s": round(time.monotonic() - clock, 1),
        "lora_bytes": (out / "pytorch_lora_weights.safetensors").stat().st_size,
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentrt.models.demo.train_lora", description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", default=str(Path(__file__).with_name("pipeline")), help="the demo pipeline directory")
    parser.add_argument("--out", required=True, help="directory to write pytorch_lora_weights.safetensors and training.json to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--background", default="navy", choices=list(dataset.BACKGROUNDS))
    args = parser.parse_args(argv)
    overrides = {"steps": args.steps} if args.steps is not None else {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train_lora(args.pipeline, args.out, LoraTrainConfig(seed=args.seed, background=args.background, **overrides))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
