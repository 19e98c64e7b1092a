"""The bundled demo model: a small DiffusionGemma trained here on checkable tasks (see examples/).

`python -m mlx_dgemma.generate` and `python -m mlx_dgemma.chat` run it when no `--model` is given.
"""

from pathlib import Path

FOLDER = Path(__file__).parent
DEFAULT_PROMPT = "Sort: 7 2 9 4 1"
RELEASED_MODEL_HINT = (
    "This is the bundled demo model. For the released model: python -m mlx_dgemma.convert "
    "--hf-path google/diffusiongemma-26B-A4B-it --mlx-path dgemma-4bit -q, then --model dgemma-4bit"
)


def available() -> bool:
    return (FOLDER / "config.json").is_file()
