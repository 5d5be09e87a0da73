"""synergen: data-pipeline-centric pretraining for SynerGen-VL.

Top-level packages: `pipeline` (ingest, tokenize), `model` (SynerGen-VL), `train` (streaming data,
DeepSpeed trainer). This package holds only what all of them share: the error type and the CLI.
"""

__version__ = "0.1.0"
