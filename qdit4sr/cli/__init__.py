"""The command-line tools, and the only click code of the package.

    qdit4sr-export          quantize and export (cli/export.py)
    qdit4sr-upscale         super-resolve an image with an exported folder (cli/upscale.py)
    qdit4sr-lint-trt        check a graph against TensorRT's rules (cli/lint.py)
    qdit4sr-profile         trtexec profiling commands for the engines (cli/engines.py)
    qdit4sr-build-engines   build the TensorRT engines of an exported folder (cli/engines.py)
    qdit4sr-triton-repo     a Triton Inference Server model repository from an exported folder (cli/triton_repo.py)
    python -m qdit4sr.cli.train_tiny / python -m qdit4sr.cli.evaluate   the embedded tiny model

Library code never imports this package; each command imports the library when it runs, so `--help`
stays fast.
"""
