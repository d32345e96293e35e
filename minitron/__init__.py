"""minitron-flow: Minitron structured pruning + knowledge distillation for Hugging Face causal LMs.

This package holds the algorithms only (plain PyTorch + transformers). It never imports prefect, mlflow or boto3,
so every function here runs wherever torch runs: a laptop, a GPU box, a `torchrun` worker.
"""

__version__ = "0.1.0"
