"""mlx_dgemma: Google's DiffusionGemma on Apple silicon with MLX.

    import mlx_dgemma
    model, tokenizer = mlx_dgemma.load("mlx-community/diffusiongemma-26B-A4B-it-4bit")
    print(mlx_dgemma.generate(model, tokenizer, "Why is the sky blue?", verbose=True))
"""

import importlib

__version__ = "0.1.0"

# Imported on first use: `python -m mlx_dgemma.convert` (and .generate) must not find their own module already
# imported by the package, and `import mlx_dgemma` stays cheap.
_EXPORTS = {
    "load": "loading",
    "convert": "convert",
    "generate": "generate",
    "stream_generate": "text_generation",
    "generate_tokens": "diffusion",
    "ChatSession": "session",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mlx_dgemma' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    # `convert` and `generate` are modules that can be called like the functions they hold.
    return module if name == _EXPORTS[name] else getattr(module, name)
