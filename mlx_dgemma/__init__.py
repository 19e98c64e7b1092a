"""mlx_dgemma: Google's DiffusionGemma on Apple silicon with MLX."""

__version__ = "0.1.0"

from .convert import convert
from .loading import load

__all__ = ["load", "convert", "__version__"]
