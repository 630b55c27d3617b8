"""Optimization profiles from the tiny-sd3 manifest and user requests (pure Python, no TensorRT)."""

from __future__ import annotations

import dataclasses

import pytest

from latentrt.engines.profiles import (
    ComponentProfile,
    ShapeRequest,
    component_roles,
    parse_batch,
    parse_image_size,
    parse_text_length,
    profile_from_shapes,
    resolve_profiles,
)
from latentrt.errors import InputError
from latentrt.bundle.manifest import AxisRange, TensorSpec

# tiny-sd3: vae_scale_factor 8, latent axes 4..96 (multiple of 2), batch 1..8 (VAE 1..4),
# T5 sequence 1..512 (opt 256), context_length 77..589, CLIP length 77.


def test_parse_batch_range_and_static():
    assert parse_batch("1:2:4") == (1, 2, 4)
    assert parse_batch("3") == (3, 3, 3)


@pytest.mark.parametrize("text", ["4:2:1", "0:1:2", "1:2", "a:b:c", "1:2:3:4"])
def test_parse_batch_rejects(text):
    with pytest.raises(InputError, match="batch"):
        parse_batch(text)


def test_parse_text_length_allows_zero_min():
    assert parse_text_length("0:77:128") == (0, 77, 128)
    assert parse_text_length("256") == (256, 256, 256)


def test_parse_image_size_forms():
    assert parse_image_size("512x512:1024x768:1024x1024") == ((512, 512), (1024, 768), (1024, 1024))
    assert parse_image_size("1024x768") == ((1024, 768),) * 3
    assert parse_image_size("512") == ((512, 512),) * 3


@pytest.mark.parametrize("text", ["512x512:256x256:1024x1024", "512y512", "1x2x3", "512x512:1024x1024"])
def test_parse_image_size_rejects(text):
    with pytest.raises(InputError, match="image"):
        parse_image_size(text)


def test_roles(manifest):
    assert component_roles(manifest) == {
        "text_encoder": "text_encoder",
        "text_encoder_2": "text_encoder",
        "text_encoder_3": "text_encoder",
        "transformer": "denoiser",
        "vae_decoder": "vae_decoder",
    }


def test_default_profile_is_the_manifest_ranges(manifest):
    profiles = resolve_profiles(manifest)
    assert list(profiles) == list(manifest.components)
    for name, profile in profiles.items():
        for axis, value in profile.axes.items():
            want = manifest.components[name].axes[axis]
            assert value.as_tuple() == (want.min, want.opt, want.max)
    assert profiles["transformer"].shapes["hidden_states"] == ((1, 16, 4, 4), (2, 16, 16, 16), (8, 16, 96, 96))
    assert profiles["transformer"].shapes["encoder_hidden_states"] == ((1, 77, 96), (2, 333, 96), (8, 589, 96))
    assert profiles["vae_decoder"].shapes["latent_sample"] == ((1, 16, 4, 4), (1, 16, 16, 16), (4, 16, 96, 96))


def test_shared_axis_is_consistent_across_inputs(manifest):
    profile = resolve_profiles(manifest, ShapeRequest(batch=(1, 2, 3)))["transformer"]
    for level in range(3):
        batches = {shape[level][0] for shape in profile.shapes.values()}
        assert len(batches) == 1
    assert profile.shapes["timestep"] == ((1,), (4,), (6,))


def test_batch_doubles_for_cfg_components_but_not_the_vae(manifest):
    profiles = resolve_profiles(manifest, ShapeRequest(batch=(1, 1, 2)))
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer"):
        assert profiles[name].axes["batch"].as_tuple() == (1, 2, 4), name
    assert profiles["vae_decoder"].axes["batch"].as_tuple() == (1, 1, 2)


def test_batch_without_guidance_is_the_images(manifest):
    profiles = resolve_profiles(manifest, ShapeRequest(batch=(1, 1, 2), guidance="none"))
    assert {p.axes["batch"].as_tuple() for p in profiles.values()} == {(1, 1, 2)}


def test_batch_too_large_for_cfg(manifest):
    with pytest.raises(InputError) as err:
        resolve_profiles(manifest, ShapeRequest(batch=(1, 1, 5)))
    message = str(err.value)
    assert "up to 10 sequences" in message and "at most 8" in message and "batch max of at most 4" in message


def test_batch_too_large_for_the_vae_without_guidance(manifest):
    with pytest.raises(InputError, match="exceeds vae_decoder's maximum batch 4"):
        resolve_profiles(manifest, ShapeRequest(batch=(1, 1, 5), guidance="none"))


def test_image_size_becomes_latent_size(manifest):
    profiles = resolve_profiles(manifest, ShapeRequest(image_size=parse_image_size("64x32:128x96:256x256")))
    for name in ("transformer", "vae_decoder"):
        assert profiles[name].axes["latent_height"].as_tuple() == (8, 16, 32)
        assert profiles[name].axes["latent_width"].as_tuple() == (4, 12, 32)
    assert profiles["vae_decoder"].shapes["latent_sample"] == ((1, 16, 8, 4), (1, 16, 16, 12), (4, 16, 32, 32))


def test_static_image_size(manifest):
    profile = resolve_profiles(manifest, ShapeRequest(image_size=parse_image_size("128x96")))["transformer"]
    assert profile.axes["latent_height"].as_tuple() == (16, 16, 16)
    assert profile.axes["latent_width"].as_tuple() == (12, 12, 12)


def test_image_size_not_a_multiple(manifest):
    # 120 / 8 = 15 latents, but the latent must be even (patch size 2): pixels must be multiples of 16.
    with pytest.raises(InputError) as err:
        resolve_profiles(manifest, ShapeRequest(image_size=parse_image_size("120x128")))
    message = str(err.value)
    assert "image height 120" in message and "multiple of 16" in message and "nearest valid: 112 or 128" in message


def test_image_size_out_of_range(manifest):
    with pytest.raises(InputError) as err:
        resolve_profiles(manifest, ShapeRequest(image_size=parse_image_size("128x128:128x128:1024x1024")))
    message = str(err.value)
    assert "image height 1024" in message and "image width 1024" in message and "32..768 pixels" in message


def test_text_length_sets_t5_sequence_and_transformer_context(manifest):
    profiles = resolve_profiles(manifest, ShapeRequest(text_length=(0, 77, 128)))
    assert profiles["text_encoder_3"].axes["sequence"].as_tuple() == (1, 77, 128)
    assert profiles["transformer"].axes["context_length"].as_tuple() == (77, 154, 205)
    # CLIP encoders always see 77 tokens: their ranges stay the manifest's.
    assert profiles["text_encoder"].axes["sequence"].as_tuple() == (1, 77, 77)


def test_text_length_out_of_range(manifest):
    with pytest.raises(InputError) as err:
        resolve_profiles(manifest, ShapeRequest(text_length=(1, 256, 600)))
    message = str(err.value)
    assert "maximum of 512 T5 tokens" in message and "at most 589" in message


def test_all_problems_reported_together(manifest):
    with pytest.raises(InputError) as err:
        resolve_profiles(manifest, ShapeRequest(batch=(1, 1, 9), image_size=parse_image_size("100x100")))
    assert "batch" in str(err.value) and "image height 100" in str(err.value)


def test_component_subset_and_unknown(manifest):
    assert list(resolve_profiles(manifest, components=["vae_decoder", "transformer"])) == ["transformer", "vae_decoder"]
    with pytest.raises(InputError, match="unknown component.*'unet'.*this bundle has text_encoder"):
        resolve_profiles(manifest, components=["unet"])


def test_profile_from_shapes_matches_resolved(manifest):
    resolved = resolve_profiles(manifest)["transformer"]
    explicit = profile_from_shapes("transformer", manifest.components["transformer"], resolved.shapes)
    assert explicit == resolved


def test_profile_from_shapes_rejects_inconsistent_batch(manifest):
    shapes = dict(resolve_profiles(manifest)["transformer"].shapes)
    shapes["timestep"] = ((1,), (1,), (8,))  # opt batch 1 here, 2 in the other inputs
    with pytest.raises(InputError) as err:
        profile_from_shapes("transformer", manifest.components["transformer"], shapes)
    message = str(err.value)
    assert "axis 'batch' is 2 in input 'hidden_states' but 1 in input 'timestep' (opt shapes)" in message


def test_profile_from_shapes_rejects_fixed_dim_and_rank(manifest):
    comp = manifest.components["vae_decoder"]
    with pytest.raises(InputError, match="dimension 1 is fixed at 16"):
        profile_from_shapes("vae_decoder", comp, {"latent_sample": ((1, 4, 8, 8), (1, 16, 8, 8), (1, 16, 8, 8))})
    with pytest.raises(InputError, match="rank 3, expected 4"):
        profile_from_shapes("vae_decoder", comp, {"latent_sample": ((1, 16, 8), (1, 16, 8, 8), (1, 16, 8, 8))})
    with pytest.raises(InputError, match="missing \\['latent_sample'\\]"):
        profile_from_shapes("vae_decoder", comp, {})


def test_profile_from_shapes_rejects_out_of_range_and_non_multiple(manifest):
    comp = manifest.components["vae_decoder"]
    with pytest.raises(InputError, match="'latent_height' max size 98 is outside the bundle's range 4..96"):
        profile_from_shapes("vae_decoder", comp, {"latent_sample": ((1, 16, 8, 8), (1, 16, 8, 8), (1, 16, 98, 8))})
    with pytest.raises(InputError, match="'latent_width' min size 5 .*multiple of 2"):
        profile_from_shapes("vae_decoder", comp, {"latent_sample": ((1, 16, 8, 5), (1, 16, 8, 8), (1, 16, 8, 8))})


def test_profile_and_request_round_trip_json(manifest):
    request = ShapeRequest(batch=(1, 1, 2), image_size=parse_image_size("64x64:128x128:256x256"), text_length=(0, 77, 128))
    assert ShapeRequest.from_dict(request.to_dict()) == request
    for name, profile in resolve_profiles(manifest, request).items():
        assert ComponentProfile.from_dict(name, profile.to_dict()) == profile


def test_request_validation():
    with pytest.raises(InputError, match="guidance must be"):
        ShapeRequest(guidance="maybe")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="1 <= MIN <= OPT <= MAX"):
        ShapeRequest(batch=(0, 1, 2))
    with pytest.raises(InputError, match="image heights"):
        ShapeRequest(image_size=((256, 256), (128, 128), (512, 512)))


def _pixart_like(manifest):
    """A PixArt-shaped manifest (T5 only; the transformer shares the T5 `sequence` axis), made from tiny-sd3's parts."""
    sd3 = manifest.components
    seq = AxisRange(1, 120, 512)
    t5 = dataclasses.replace(sd3["text_encoder_3"], axes={"batch": sd3["text_encoder_3"].axes["batch"], "sequence": seq})
    transformer = dataclasses.replace(
        sd3["transformer"],
        inputs=(
            TensorSpec("hidden_states", "float32", ("batch", 4, "latent_height", "latent_width")),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", 96)),
            TensorSpec("encoder_attention_mask", "float32", ("batch", "sequence")),
            TensorSpec("timestep", "float32", ("batch",)),
        ),
        axes={**{k: v for k, v in sd3["transformer"].axes.items() if k != "context_length"}, "sequence": seq},
    )
    return dataclasses.replace(
        manifest,
        family="pixart",
        components={"text_encoder": t5, "transformer": transformer, "vae_decoder": sd3["vae_decoder"]},
        conditioning={"t5_encoder": ["text_encoder", "tokenizer"]},
    )


def test_text_length_for_a_t5_only_family(manifest):
    pixart = _pixart_like(manifest)
    profiles = resolve_profiles(pixart, ShapeRequest(batch=(1, 1, 2), text_length=(1, 120, 300)))
    assert profiles["text_encoder"].axes["sequence"].as_tuple() == (1, 120, 300)
    assert profiles["transformer"].axes["sequence"].as_tuple() == (1, 120, 300)
    assert profiles["transformer"].shapes["encoder_attention_mask"] == ((1, 1), (2, 120), (4, 300))


def test_text_length_needs_a_t5_encoder(manifest):
    no_t5 = dataclasses.replace(manifest, conditioning={**manifest.conditioning, "t5_encoder": None})
    with pytest.raises(InputError, match="no T5 text encoder"):
        resolve_profiles(no_t5, ShapeRequest(text_length=(1, 77, 77)))
