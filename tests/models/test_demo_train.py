"""Training pieces of the demo model, on tiny configs, and the shipped pipeline directory."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from latentrt.models.demo import dataset, evaluate, train  # noqa: E402

SHIPPED = Path(train.__file__).parent / "pipeline"
TINY = train.TrainConfig(
    num_images=300, vocab_size=384, text_hidden=32, text_layers=2, text_projection=16, vae_channels=(16, 16, 16),
    vae_steps=2, vae_batch=4, layers=1, heads=2, head_dim=16, steps=2, batch=4, warmup=1, threads=1,
)


@pytest.fixture(scope="module")
def tokenizer():
    _, captions, _ = dataset.make_dataset(300, seed=0)
    return train.train_tokenizer(captions, vocab_size=384, max_length=16)


def test_tokenizer_wraps_in_clip_special_tokens_and_round_trips(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded("a big red circle on the left", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and loaded.model_max_length == 16
    assert ids[0] == loaded.bos_token_id == 0 and loaded.eos_token_id == loaded.pad_token_id == 1
    assert ids[-1] == 1 and loaded.decode(ids, skip_special_tokens=True).strip() == "a big red circle on the left"
    assert loaded("").input_ids == [0, 1]


def test_conditioning_is_the_padded_penultimate_clip_states_with_no_t5_tokens(tokenizer):
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=train.build_transformer(TINY, 16),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=train.build_vae(TINY),
        text_encoder=train.build_text_encoder(TINY, tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=train.build_text_encoder(TINY, tokenizer),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    prompts = ["a small blue square at the top", ""]
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=0
    )
    ids = tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    out_l = pipe.text_encoder(ids, output_hidden_states=True)
    out_g = pipe.text_encoder_2(ids, output_hidden_states=True)
    expected = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    assert embeds.shape == (2, 16, pipe.transformer.config.joint_attention_dim) == expected.shape
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(pooled, torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1))
    assert pooled.shape[-1] == pipe.transformer.config.pooled_projection_dim


def test_tiny_training_run_saves_a_loadable_sd3_pipeline(tmp_path):
    out = tmp_path / "pipe"
    summary = train.train(out, TINY, record=tmp_path / "record.json")
    assert json.loads((tmp_path / "record.json").read_text())["denoiser_steps_done"] == 2
    index = json.loads((out / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    suffixes = {path.suffix for path in out.rglob("*") if path.is_file()}
    assert suffixes == {".json", ".safetensors"}
    assert summary["weights_bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    images = evaluate.generate_diffusers(out, ["a red circle on the left on a black background"], steps=2)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="the trained demo weights are not present")
def test_shipped_pipeline_loads_with_diffusers_and_generates():
    pipe = evaluate.load_diffusers(SHIPPED)
    assert isinstance(pipe, diffusers.StableDiffusion3Pipeline)
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels
    assert pipe.transformer.config.joint_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    size = sum(path.stat().st_size for path in SHIPPED.rglob("*") if path.is_file())
    assert size <= 20_000_000
    images = evaluate.generate_diffusers(SHIPPED, ["a large red circle on the left on a navy background"], steps=8,
                                         guidance=3.0, pipe=pipe)
    assert images.shape == (1, 64, 64, 3)
