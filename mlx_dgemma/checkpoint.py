"""Where a checkpoint comes from: a local folder, or a Hugging Face Hub repo id (fetched with huggingface-hub).

Used by loading, conversion, export and training alike, so it sits below all of them.
"""

from __future__ import annotations

from pathlib import Path

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


class ConversionError(ValueError):
    pass


def resolve_checkpoint(path_or_repo: str, revision: str | None = None) -> Path:
    """A local folder, or a Hub repo id fetched with huggingface-hub (the weights, configs and tokenizer)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{path}: expected a model folder, found a file")
        return path
    if path_or_repo.count("/") != 1 or path_or_repo.startswith((".", "/", "~")):
        raise ConversionError(f"{path_or_repo}: no such folder (and not a Hugging Face repo id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated model...
        raise ConversionError(f"{path_or_repo}: not a local folder and could not be downloaded ({type(e).__name__}: {e})") from None


def config_path_for(hf_path: str, revision: str | None = None) -> Path:
    """`config.json` of a local folder (or the file itself), or of a Hub repo: that one file is downloaded."""
    path = Path(hf_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return path
    if path.exists() or hf_path.count("/") != 1 or hf_path.startswith((".", "/", "~")):
        raise ConversionError(f"{hf_path}: no config.json there (and not a Hugging Face repo id)")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(hf_path, "config.json", revision=revision))
    except Exception as e:  # offline, unknown repo, gated model...
        raise ConversionError(f"{hf_path}: no local folder and config.json could not be downloaded ({type(e).__name__}: {e})") from None

