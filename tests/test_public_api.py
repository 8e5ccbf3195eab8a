"""The public API: importable from the package roots, loaded lazily (import qdit4sr pulls in nothing heavy)."""
import subprocess
import sys

import pytest

import qdit4sr

PACKAGES = ["qdit4sr", "qdit4sr.models", "qdit4sr.calibration", "qdit4sr.exporter", "qdit4sr.engines",
            "qdit4sr.plugins", "qdit4sr.artifacts"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package):
    module = __import__(package, fromlist=["_"])
    assert module.__all__ and set(module.__all__) <= set(dir(module))
    for name in module.__all__:
        assert getattr(module, name) is not None, (package, name)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        module.nope


def test_the_names_the_readme_promises():
    from qdit4sr.calibration.api import quantize_
    from qdit4sr.engines.runtime import load_exported_pipeline

    assert qdit4sr.quantize_ is quantize_ and qdit4sr.load_exported_pipeline is load_exported_pipeline
    assert {"DiT4SRTransformer2DModel", "load_transformer", "quantize_", "QDiT4SRConfig", "BitPlan",
            "export_segments", "build_engines", "load_exported_pipeline"} <= set(qdit4sr.__all__)


def test_importing_the_package_and_asking_for_help_stay_light():
    code = ("import sys, qdit4sr, qdit4sr.cli.export, qdit4sr.cli.upscale, qdit4sr.cli.engines, qdit4sr.cli.lint; "
            "heavy = sorted({'torch', 'diffusers', 'onnx', 'onnxruntime'} & set(sys.modules)); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
