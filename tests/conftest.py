import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import mlx.core as mx  # noqa: E402

from reference import add_word_tokenizer, build_reference, load_reference  # noqa: E402

from mlx_dgemma import backend  # noqa: E402

# The suite runs on the CPU unless MLX_DGEMMA_TEST_DEVICE=gpu (a Mac's Metal, a CUDA machine): then unchanged on
# the GPU, with the profile the GPU picks.
TEST_DEVICE = os.environ.get("MLX_DGEMMA_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "gpu"):
    raise pytest.UsageError(f"MLX_DGEMMA_TEST_DEVICE={TEST_DEVICE!r}: expected cpu or gpu")
mx.set_default_device(mx.gpu if TEST_DEVICE == "gpu" else mx.cpu)


@pytest.fixture(params=list(backend.PROFILES) if TEST_DEVICE == "cpu" else ["gpu"])
def profile(request):
    """Runs a test under each backend profile (both on the CPU: the GPU's code paths are tested here too)."""
    with backend.using(request.param) as active:
        yield active


@pytest.fixture(scope="session")
def reference_factory(tmp_path_factory):
    """Build (once per session per settings) a reference checkpoint; returns (folder, torch model)."""
    built = {}

    def make(name="tiny", **kwargs):
        key = (name, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"ref-{name}")
            build_reference(folder, **{"preset": "tiny", **kwargs})
            built[key] = (folder, load_reference(folder))
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny(reference_factory):
    return reference_factory()


@pytest.fixture(scope="session")
def tiny_chat_folder(tiny, tmp_path_factory):
    """The tiny reference checkpoint plus a word-level tokenizer (the built-in Gemma 4 template applies).
    Shared by the session: tests read it, never write into it."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny[0], folder, dirs_exist_ok=True)
    add_word_tokenizer(folder)
    return folder


@pytest.fixture
def copy_folder(tmp_path):
    def copy(folder, name="copy"):
        dst = tmp_path / name
        shutil.copytree(folder, dst)
        return dst

    return copy
