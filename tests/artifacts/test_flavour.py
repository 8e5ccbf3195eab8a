"""One name per graph flavour: members and their string values are interchangeable keys and values."""
import json

import pytest

from qdit4sr.artifacts.flavour import DEFAULT_EXPORT_FLAVOURS, ENGINE_FLAVOUR, Flavour


def test_members_are_their_values():
    assert Flavour.names() == ("portable", "trt", "cpu") and ENGINE_FLAVOUR is Flavour.TRT
    assert Flavour.TRT == "trt" and f"{Flavour.TRT}" == "trt" and str(Flavour.PORTABLE) == "portable"
    assert {"trt": 1}[Flavour.TRT] == 1 and {Flavour.TRT: 1}["trt"] == 1
    assert json.dumps({Flavour.TRT: [Flavour.PORTABLE]}) == '{"trt": ["portable"]}'
    assert DEFAULT_EXPORT_FLAVOURS == ("portable", "trt", "cpu")


def test_parse():
    assert Flavour.parse("trt") is Flavour.TRT and Flavour.parse(Flavour.PORTABLE) is Flavour.PORTABLE
    assert Flavour.parse_many("trt") == (Flavour.TRT,)
    assert Flavour.parse_many(["trt", "portable", "trt"]) == (Flavour.PORTABLE, Flavour.TRT)
    for bad in ("both", "onnx", "tensorrt"):
        with pytest.raises(ValueError, match=f"flavour must be one of \\('portable', 'trt', 'cpu'\\), got '{bad}'"):
            Flavour.parse_many(bad)
    with pytest.raises(ValueError, match="at least one"):
        Flavour.parse_many([])
