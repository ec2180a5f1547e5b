"""Loading hybrid models and describing their anatomy."""

from lab.models.anatomy import ADAPTERS, BLOCK_KINDS, SUPPORTED, Anatomy, Block, Layer, build_anatomy
from lab.models.loading import BUILTINS, Loaded, ModelSpec, load, quiet_hf

__all__ = ["ADAPTERS", "BLOCK_KINDS", "BUILTINS", "SUPPORTED", "Anatomy", "Block", "Layer", "Loaded",
           "ModelSpec", "build_anatomy", "load", "quiet_hf"]
