"""The planted cases: `debug_bundle` finds the fp16 overflow and the int8-sensitive layer, and its suggestion works."""

from __future__ import annotations

import json

import numpy as np

from latentrt.debug import DebugConfig, DebugReport, debug_bundle


def test_naive_fp16_names_the_overflowing_matmul(t5_overflow):
    fp32, naive, _, node = t5_overflow
    report = debug_bundle(naive, DebugConfig(component="text_encoder_3", reference=str(fp32), steps=2))
    assert report.first_nonfinite == node
    assert report.first_over_tolerance == node
    layer = report.layer(node)
    assert layer.op == "MatMul" and layer.inf > 0 and layer.max_abs is None and layer.reference_absmax > 65504
    assert node in report.suggestion.keep_fp32
    assert report.suggestion.command == "latentrt export SOURCE -o BUNDLE --precision fp16"
    # Every layer before it is within fp16's rounding, and T5's log(0) relative position (-inf in the
    # reference as well) does not count as a non-finite value.
    before = report.layers[: [layer.name for layer in report.layers].index(node)]
    assert before and all(not layer.nonfinite and layer.rel_l2 < 1e-2 for layer in before)
    assert report.outputs_match is False
    assert DebugReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_naive_fp16_against_its_own_graph_in_fp32(t5_overflow):
    """Without --reference, a half graph is compared with itself computed in float32 (same weights)."""
    _, naive, _, node = t5_overflow
    report = debug_bundle(naive, DebugConfig(component="text_encoder_3", steps=2))
    assert report.first_nonfinite == node
    assert "computed in fp32" in report.reference


def test_export_islands_give_a_clean_report(t5_overflow):
    fp32, _, islands, node = t5_overflow
    report = debug_bundle(islands, DebugConfig(component="text_encoder_3", reference=str(fp32), steps=2))
    assert report.first_nonfinite is None and report.first_over_tolerance is None
    assert max(layer.rel_l2 for layer in report.layers) < 1e-2
    assert report.layer(node).max > 65504  # kept in fp32, it holds what fp16 cannot
    assert report.outputs_match is True
    assert report.suggestion.keep_fp32 == () and "nothing to change" in report.suggestion.text


def test_int8_points_at_the_outlier_layer_and_the_exclude_fixes_it(attention_outlier, tmp_path):
    from latentrt.calibration.quantize import QuantizeConfig, quantize_bundle

    fp32, int8, node = attention_outlier
    report = debug_bundle(int8, DebugConfig(steps=3))  # the reference is the recorded source bundle
    assert str(fp32) in report.reference
    assert report.layer(node).quantized
    assert report.suggestion.exclude[0] == f"^{node.replace('.', chr(92) + '.')}$"
    assert f"--exclude '{report.suggestion.exclude[0]}'" in report.suggestion.command
    assert report.suggestion.command.startswith(f"latentrt calibrate {fp32.resolve()} -o OUT --precision int8")
    assert "--prompts" not in report.suggestion.command  # calibrated on the default prompt list
    worst_output = report.layers[-1].rel_l2

    fixed = tmp_path / "fixed"
    quantize_bundle(fp32, fixed, QuantizeConfig(precision="int8", num_prompts=2, steps=3, exclude=report.suggestion.exclude))
    after = debug_bundle(fixed, DebugConfig(steps=3))
    assert not after.layer(node).quantized
    assert after.layer(node).rel_l2 < report.layer(node).rel_l2 / 5
    assert after.layers[-1].rel_l2 < worst_output / 2


def test_int8_layers_before_the_first_quantized_one_match_exactly(int8_bundle, tiny_sd3_bundle):
    """SmoothQuant's rescaled tensors (its 1/s folded into the norms) are left out, not reported as error."""
    report = debug_bundle(int8_bundle, DebugConfig(steps=2, reference=str(tiny_sd3_bundle)))
    assert report.not_compared and all("SmoothQuant" in why for why in report.not_compared.values())
    first_quantized = next(i for i, layer in enumerate(report.layers) if layer.quantized)
    assert first_quantized > 0
    assert all(layer.rel_l2 < 1e-5 for layer in report.layers[:first_quantized])
    assert 0 < report.layers[first_quantized].rel_l2 < 0.1
    assert report.calls == 2


def test_recorded_calls_can_be_chosen(int8_bundle):
    from latentrt.debug import record_inputs

    feeds = record_inputs(int8_bundle, "transformer", steps=4, calls=(1, 3))
    every = record_inputs(int8_bundle, "transformer", steps=4)
    assert len(feeds) == 2 and len(every) == 4
    for got, want in zip(feeds, (every[1], every[3])):
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
