"""qdit4sr-lint-trt: exit 0 for a clean graph, 1 with one line per violation, 2 with one line for an unreadable file."""
import onnx
import pytest
from click.testing import CliRunner

from qdit4sr.cli.lint import lint_trt_command
from tests.exporter.test_trt_lint import clean_model, planted


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_cli_clean_model_exits_0(runner, tmp_path):
    path = tmp_path / "clean.onnx"
    onnx.save_model(clean_model(), path)
    result = runner.invoke(lint_trt_command, [str(path)])
    assert result.exit_code == 0, result.output
    assert f"no TensorRT lint violations in {path}" in result.output


def test_cli_violations_exit_1(runner, tmp_path):
    path = tmp_path / "bad.onnx"
    onnx.save_model(planted("plugin-missing-namespace"), path)
    result = runner.invoke(lint_trt_command, [str(path)])
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith("plugin-attributes: lowrank: LowRankBranch: missing")
    assert "1 TensorRT lint violation(s)" in result.output


@pytest.mark.parametrize("content", [None, b"this is not a protobuf \xff\xfe", b""])
def test_cli_unreadable_model_exits_2(runner, tmp_path, content):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    result = runner.invoke(lint_trt_command, [str(path)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error:")
