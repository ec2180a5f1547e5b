"""lab: a terminal lab console for ablation experiments on hybrid SSM/attention language models."""

__version__ = "0.1.0"
