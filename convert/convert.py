"""Port a PyTorch / Hugging Face DiffusionGemma checkpoint to MLX, as a standalone script.

    python convert/convert.py --hf-path google/diffusiongemma-26B-A4B-it --mlx-path dgemma-4bit -q

The work is done by the package (`python -m mlx_dgemma.convert`, `mlx_dgemma.convert(...)`), so the same
converter is there after a plain `pip install`: reading sharded safetensors or PyTorch pickles, the one table of
checkpoint names (`mlx_dgemma/model.py: checkpoint_name`), streaming, quantization and `--dry-run` sizes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_dgemma.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
