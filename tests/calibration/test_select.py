"""Layer selection: `force` patterns quantize layers the defaults protect; user excludes still win."""

from __future__ import annotations

import json

from latentrt.calibration.graph import Layer, select_layers
from latentrt.calibration.quantize import QuantizeConfig


def _layers():
    names = ["/pos_embed/proj/Conv", "/time_text_embed/linear_1/Gemm", "/blocks.0/attn/to_q/MatMul", "/blocks.0/ff/MatMul", "/proj_out/MatMul"]
    return [Layer(n, n.rsplit("/", 1)[1], "x", "w", 1, 1, 0) for n in names]


def test_defaults_protect_embeddings_and_the_last_layer():
    kept, excluded, unmatched = select_layers(_layers())
    assert [l.node for l in kept] == ["/blocks.0/attn/to_q/MatMul", "/blocks.0/ff/MatMul"]
    assert excluded["/proj_out/MatMul"] == "default pattern 'proj_out'" and unmatched == []


def test_force_quantizes_a_protected_layer_but_not_against_an_exclude():
    kept, excluded, unmatched = select_layers(_layers(), user=("ff/",), force=("proj_out", "time_text", "nothing_here"))
    assert {l.node for l in kept} == {"/blocks.0/attn/to_q/MatMul", "/proj_out/MatMul", "/time_text_embed/linear_1/Gemm"}
    assert "/blocks.0/ff/MatMul" in excluded and unmatched == ["nothing_here"]
    assert select_layers(_layers(), user=("proj_out",), force=("proj_out",))[1]["/proj_out/MatMul"] == "--exclude 'proj_out'"


def test_config_round_trips_force():
    config = QuantizeConfig(force="proj_out", exclude=("a",))
    assert config.force == ("proj_out",)
    assert QuantizeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
