"""The vision tower, projector and image processor against transformers 5.24.0 (float32, tiny random tower)."""

import base64
import io

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from mlx_dgemma.vision import ImageError, ImageSettings, load_vision, process_image
from mlx_dgemma.vision.processor import Patches
from reference import DISCRIMINATING_VISION

TOL = 1e-4


def err(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def vision_ref(reference_factory):
    folder, ref = reference_factory("vision", vision=DISCRIMINATING_VISION)
    return folder, ref, load_vision(folder)


def synthetic(height, width, patch=4, seed=0):
    """Patches of a random image whose sides are multiples of patch * kernel (no resize needed)."""
    rng = np.random.default_rng(seed)
    ph, pw = height // patch, width // patch
    gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    positions = np.stack([gx, gy], -1).reshape(-1, 2)
    return Patches(rng.random((ph * pw, 3 * patch * patch)).astype(np.float32), positions, ph * pw // 4, (height, width))


def reference_features(ref, images, length=280):
    padded = [im.padded(length) for im in images]
    pixels = torch.from_numpy(np.stack([p for p, _ in padded]))
    positions = torch.from_numpy(np.stack([q for _, q in padded]))
    with torch.no_grad():
        tower = ref.model.encoder.vision_tower(pixel_values=pixels, pixel_position_ids=positions).last_hidden_state
        projected = ref.model.encoder.get_image_features(pixels, positions).pooler_output
    return pixels.numpy(), positions.numpy(), tower.numpy(), projected.numpy()


def test_tower_and_projector_match_the_reference(vision_ref):
    """A 32x24 image (8x6 patches -> 12 soft tokens, longer than the text's window of 8) and a 16x16 one, run
    padded to the reference's 280 patches and, as our pipeline runs them, each alone at its own size."""
    _, ref, encoder = vision_ref
    images = [synthetic(24, 32, seed=1), synthetic(16, 16, seed=2)]
    pixels, positions, tower, projected = reference_features(ref, images)
    assert tower.shape == (16, 32) and projected.shape == (16, 64)
    assert np.abs(tower).max() > 10  # the standardisation's random bias is in play
    assert err(encoder.model.vision_tower(pixels, positions), tower) < TOL
    assert err(encoder.model(pixels, positions), projected) < TOL
    assert err(encoder.features(images), projected) < TOL


def test_position_table_is_read_by_x_then_y(vision_ref):
    """Transposing an image's patch grid must change the features (the table's rows are not interchangeable)."""
    _, ref, encoder = vision_ref
    image = synthetic(16, 16, seed=3)
    swapped = Patches(image.pixels, image.positions[:, ::-1].copy(), image.soft_tokens, image.size)
    _, _, _, expected = reference_features(ref, [swapped])
    assert err(encoder.features([swapped]), expected) < TOL
    assert err(encoder.features([image]), expected) > 1e-3


def test_vision_weights_load_from_a_converted_folder(vision_ref, tmp_path):
    """Converted, and converted with -q (the recipe quantizes the text stack only: the tower stays as it was)."""
    import json

    import mlx_dgemma

    folder, ref, encoder = vision_ref
    image = [synthetic(24, 16, seed=4)]
    for name, options in (("plain", {}), ("quantized", {"quantize": True, "q_group_size": 32})):
        out = mlx_dgemma.convert(str(folder), str(tmp_path / name), verbose=False, **options)
        quantization = json.loads((out / "config.json").read_text()).get("quantization", {})
        assert not [k for k in quantization if k.startswith(("vision_tower", "embed_vision"))]
        assert err(load_vision(out).features(image), encoder.features(image)) == 0.0, name


def test_folder_without_vision_weights_has_no_encoder(tmp_path):
    from mlx_dgemma.demo import FOLDER  # the bundled demo model is text-only

    assert load_vision(FOLDER) is None


# --- the processor ---------------------------------------------------------------------------------------------


def reference_processor(settings):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(
        max_soft_tokens=settings.max_soft_tokens, patch_size=settings.patch_size,
        pooling_kernel_size=settings.pooling_kernel_size,
    )


def random_image(height, width, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


SIZES = {
    "portrait": (900, 400),
    "landscape": (300, 1000),
    "tiny (scaled up)": (20, 30),
    "larger than the budget": (1500, 2100),
    "exact fit": (768, 768),
    "thin (a side rounds to zero)": (4, 3000),
    "tall (a side rounds to zero)": (3000, 4),
}


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("budget", [70, 280, 1120])
def test_processor_matches_the_reference(name, budget):
    height, width = SIZES[name]
    settings = ImageSettings(max_soft_tokens=budget)
    image = random_image(height, width, seed=height + width)
    ours = process_image(image, settings)
    expected = reference_processor(settings)(images=[image], return_tensors="np")
    pixels, positions = ours.padded(settings.max_patches)
    assert ours.soft_tokens == expected["num_soft_tokens_per_image"][0] <= budget
    assert np.array_equal(positions, expected["image_position_ids"][0])
    assert pixels.dtype == expected["pixel_values"].dtype == np.float32
    assert np.array_equal(pixels, expected["pixel_values"][0])


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_processor_converts_to_rgb_like_the_reference(mode):
    settings = ImageSettings(max_soft_tokens=70)
    image = random_image(100, 150, mode=mode, seed=5)
    ours = process_image(image, settings)
    expected = reference_processor(settings)(images=[image], return_tensors="np")
    assert np.array_equal(ours.padded(settings.max_patches)[0], expected["pixel_values"][0])


def test_image_sources_path_bytes_and_data_url(tmp_path):
    settings = ImageSettings(max_soft_tokens=70)
    image = random_image(64, 80, seed=6)
    path = tmp_path / "a.png"
    image.save(path)
    data = path.read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    results = [process_image(s, settings) for s in (image, path, str(path), data, url)]
    for r in results[1:]:
        assert np.array_equal(r.pixels, results[0].pixels) and np.array_equal(r.positions, results[0].positions)


def test_budget_and_settings_come_from_the_folder(tmp_path):
    (tmp_path / "processor_config.json").write_text(
        '{"image_processor": {"max_soft_tokens": 560, "patch_size": 16, "pooling_kernel_size": 3}}'
    )
    assert ImageSettings.from_folder(tmp_path, 16, 3).max_soft_tokens == 560
    (tmp_path / "processor_config.json").unlink()
    (tmp_path / "preprocessor_config.json").write_text('{"max_soft_tokens": 140}')
    assert ImageSettings.from_folder(tmp_path, 4, 2) == ImageSettings(4, 2, 140)
    (tmp_path / "preprocessor_config.json").write_text('{"max_soft_tokens": 300}')
    with pytest.raises(ImageError, match=r"preprocessor_config.json: max_soft_tokens must be one of"):
        ImageSettings.from_folder(tmp_path, 16, 3)


def test_bad_images_name_the_problem(tmp_path):
    settings = ImageSettings()
    with pytest.raises(ImageError, match="missing.png: file not found"):
        process_image(tmp_path / "missing.png", settings)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="notes.txt: not an image Pillow can read"):
        process_image(text, settings)
    buffer = io.BytesIO()
    random_image(200, 200, seed=7).save(buffer, format="PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="cut.png: cannot be decoded"):
        process_image(truncated, settings)
    with pytest.raises(ImageError, match="not valid base64"):
        process_image("data:image/png;base64,@@@", settings)
    with pytest.raises(ImageError, match="remote URLs are not fetched"):
        process_image("https://example.com/a.png", settings)
    huge = tmp_path / "huge.png"
    random_image(40, 40, seed=8).save(huge)
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, 100  # Pillow refuses images over twice its limit
    try:
        with pytest.raises(ImageError, match="huge.png: too large to decode safely"):
            process_image(huge, settings)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_both_backend_profiles_give_the_reference_features(vision_ref):
    """The CPU profile (query chunks on lanes) and the GPU one (head dim padded to a fused kernel's size), on
    this CPU: the same features as the reference."""
    from mlx_dgemma import backend
    from mlx_dgemma.vision import tower

    _, ref, encoder = vision_ref
    images = [synthetic(24, 32, seed=8)]
    _, _, _, expected = reference_features(ref, images)
    for profile in ("cpu", "gpu"):
        with backend.using(profile):
            chunk, tower.ATTENTION_QUERY_CHUNK = tower.ATTENTION_QUERY_CHUNK, 5  # several chunks of a 48-patch image
            try:
                assert err(encoder.features(images), expected) < TOL, profile
            finally:
                tower.ATTENTION_QUERY_CHUNK = chunk
