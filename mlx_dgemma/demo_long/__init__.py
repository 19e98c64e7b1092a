"""The bundled canvas-256 model: the demo's architecture with the released model's 256-token canvas, trained here
on checkable tasks whose answers run from 2 to 250 tokens (see README.md and examples/train_long.py).

    python -m mlx_dgemma.generate --model mlx_dgemma/demo_long -p "copy diffusion"
"""

from pathlib import Path

FOLDER = Path(__file__).parent


def available() -> bool:
    return (FOLDER / "config.json").is_file()
