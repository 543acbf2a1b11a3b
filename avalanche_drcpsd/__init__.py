"""avalanche-drcpsd: Dream Replay with CLIP Projection Stable Diffusion (DR-CPSD) for Avalanche."""

from .config import ConfigError, DRCPSDConfig
from .cpsd import CPSDProjection, EmbeddingBuffer
from .generator import DiffusionGenerator
from .logging import MetricsCSVLogger
from .plugins import CPSDGeneratorPlugin, DistillPlugin, DRCPSDPlugin, DreamReplayPlugin, MMDPlugin, SeenClassMaskPlugin
from .sd import StableDiffusionGenerator, load_generator
from .strategy import DRCPSD
from .synthetic_cache import SyntheticCache

__version__ = "0.1.0"

__all__ = [
    "DRCPSD",
    "DRCPSDConfig",
    "ConfigError",
    "CPSDGeneratorPlugin",
    "DreamReplayPlugin",
    "MMDPlugin",
    "DistillPlugin",
    "SeenClassMaskPlugin",
    "DRCPSDPlugin",
    "DiffusionGenerator",
    "CPSDProjection",
    "EmbeddingBuffer",
    "MetricsCSVLogger",
    "StableDiffusionGenerator",
    "load_generator",
    "SyntheticCache",
]
