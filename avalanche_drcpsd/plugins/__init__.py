"""The four plugins DR-CPSD is assembled from; each also works with other Avalanche strategies."""

from .base import DRCPSDPlugin
from .distill import DistillPlugin
from .dream_replay import DreamReplayPlugin, SyntheticSource
from .generator import CPSDGeneratorPlugin
from .logit_mask import SeenClassMaskPlugin
from .mmd import MMDPlugin

__all__ = ["CPSDGeneratorPlugin", "DreamReplayPlugin", "DistillPlugin", "MMDPlugin", "SeenClassMaskPlugin",
           "SyntheticSource", "DRCPSDPlugin"]
