"""Backbones, MLM-head scaling and the SPLADE encoder."""

from .backbone import BackboneSpec, load_backbone, tiny_backbone
from .splade import SpladeEncoder

__all__ = ["BackboneSpec", "SpladeEncoder", "load_backbone", "tiny_backbone"]
