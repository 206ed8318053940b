"""conditioning."""

from ldm.conditioning.conditioner import Conditioner
from ldm.conditioning.conditioning import Conditioning
from ldm.conditioning.embedder import Embedder
from ldm.conditioning.label import ClassEmbedder
from ldm.conditioning.size import SizeEmbedder
from ldm.conditioning.spatial import SpatialEmbedder
from ldm.conditioning.text import OpenCLIPTextEmbedder

__all__ = [
    "ClassEmbedder",
    "Conditioner",
    "Conditioning",
    "Embedder",
    "OpenCLIPTextEmbedder",
    "SizeEmbedder",
    "SpatialEmbedder",
]
