"""Tracing with placeholders: one opaque node per live QuantLinear and per quantized softmax, the modules
always restored (the eager values with them), dead layers reported, only the batch axis dynamic."""
from __future__ import annotations

import copy

import onnx
import pytest
import torch

from qdit4sr.artifacts.graph_io import BATCH_AXIS, INPUT_NAMES, OUTPUT_NAME
from qdit4sr.calibration.api import quantized_layers
from qdit4sr.calibration.qlinear import segment_scope
from qdit4sr.calibration.qsoftmax import attention_cores, quantized_softmaxes
from qdit4sr.exporter.placeholder import (PLACEHOLDER_DOMAIN, PLACEHOLDER_OP, SOFTMAX_PLACEHOLDER_OP,
                                          PlaceholderLinear, PlaceholderSoftmax, placeholders, tile_pos_embed,
                                          trace_base_graph)
from tests.helpers.micro import MICRO_CONFIG, micro_inputs
from tests.helpers.micro_export import TILE, TOKENS, quantized_micro, single_thread


@pytest.fixture(scope="module")
def rtn():
    return quantized_micro("rtn", "w8a8", model_config={"variant": "dit4sr_q"})


def test_placeholders_keep_the_shapes_and_always_restore_the_values(rtn):
    model, layers, softmaxes = rtn.model, quantized_layers(rtn.model), quantized_softmaxes(rtn.model)
    args = micro_inputs(MICRO_CONFIG, size=TILE, tokens=TOKENS)
    with torch.no_grad(), segment_scope(0):
        ref = model(*args)
        with placeholders(model, layers, softmaxes) as (stubs, softmax_stubs):
            assert all(isinstance(model.get_submodule(n), PlaceholderLinear) for n in layers)
            assert all(isinstance(model.get_submodule(s).softmax, PlaceholderSoftmax) for s in softmaxes)
            # Eagerly the placeholder ops return zeros of the output shape (the trace needs shapes only).
            assert model(*args).shape == ref.shape
            ranks = {name: stub.input_rank for name, stub in stubs.items()}
            # token layers see [B, tokens, features], the conditioning (AdaLN, time embedding) layers [B, features]
            assert all(ranks[n] == 3 for n in ranks if ".attn." in n or ".ff." in n)
            assert set(ranks.values()) == {2, 3}
        with pytest.raises(RuntimeError, match="boom"), placeholders(model, layers, softmaxes):
            raise RuntimeError("boom")
        assert torch.equal(model(*args), ref)   # restored modules give the eager values again
    assert quantized_layers(model) == layers and quantized_softmaxes(model) == softmaxes


def test_the_trace_sees_only_the_tiles_positional_crop_with_the_same_values(rtn):
    model = rtn.model
    embed, p = model.pos_embed, MICRO_CONFIG["patch_size"]
    table, side = embed.pos_embed, embed.pos_embed_max_size
    assert side * p > TILE   # else the crop would be the whole table and this test would prove nothing
    args = micro_inputs(MICRO_CONFIG, size=TILE, tokens=TOKENS)
    with torch.no_grad(), segment_scope(0):
        ref = model(*args)
        with tile_pos_embed(model, TILE):
            assert embed.pos_embed.shape == (1, (TILE // p) ** 2, table.shape[-1])
            assert torch.equal(model(*args), ref)   # bit-identical: the same rows, only without the rest
        assert embed.pos_embed is table and embed.pos_embed_max_size == side
        with pytest.raises(RuntimeError, match="boom"), tile_pos_embed(model, TILE):
            raise RuntimeError("boom")
        assert embed.pos_embed is table and embed.pos_embed_max_size == side
        assert torch.equal(model(*args), ref)


def test_trace_writes_one_placeholder_per_live_layer_and_softmax(rtn):
    layers, softmaxes = quantized_layers(rtn.model), quantized_softmaxes(rtn.model)
    with single_thread():
        base = trace_base_graph(rtn.model, layers, TILE, TOKENS, softmaxes)
    nodes = [n for n in base.model.graph.node if n.domain == PLACEHOLDER_DOMAIN]
    names = [onnx.helper.get_attribute_value(a).decode() for n in nodes if n.op_type == PLACEHOLDER_OP
             for a in n.attribute if a.name == "layer"]
    assert sorted(names) == sorted(base.layers) and len(names) == len(set(names))
    # dit4sr_q computes to_k_control and drops it: traced away, reported, not exported.
    assert base.dead_layers and all(n.endswith("to_k_control") for n in base.dead_layers)
    assert set(base.layers) | set(base.dead_layers) == set(layers)
    assert sorted(base.softmax_sites) == sorted(attention_cores(rtn.model))
    assert sum(n.op_type == SOFTMAX_PLACEHOLDER_OP for n in nodes) == len(softmaxes)
    graph = base.model.graph
    assert [i.name for i in graph.input] == list(INPUT_NAMES) and [o.name for o in graph.output] == [OUTPUT_NAME]
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == BATCH_AXIS and all(d.dim_value > 0 for d in dims[1:]), value.name


def test_layers_the_forward_never_calls_are_refused(rtn):
    layers = quantized_layers(rtn.model)
    spare = copy.deepcopy(next(iter(layers.values())))
    rtn.model.spare = spare
    try:
        with pytest.raises(ValueError, match="never called by the forward"), single_thread():
            trace_base_graph(rtn.model, {**layers, "spare": spare}, TILE, TOKENS)
        assert rtn.model.spare is spare
    finally:
        del rtn.model.spare
