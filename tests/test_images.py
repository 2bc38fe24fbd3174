"""images.py against the references: the official captioning path (qwen-vl-utils' process_vision_info, then
transformers' slow Qwen2VLImageProcessor) pixel for pixel through Encoder.caption_inputs, the processor alone,
reading files (EXIF orientation, 16 bit, transparency), the pixel conversions.
Run: python -m pytest -q tests/test_images.py"""
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from images import fetch_image, load_image, preprocess_image, smart_resize, to_pil, to_pixels, to_rgb, to_uint8
from model_encoder import Encoder, EncoderConfig

# (width, height): photo sizes, the 464x200 (10x28 patches officially, 12x26 after one resize), tiny,
# odd, huge aspect ratios, a side under half a patch factor. (Over qwen-vl-utils' 12.8M pixels only the target
# size changes, checked without pixels in test_smart_resize_targets_match_both_references: it is slow.)
SIZES = [(464, 200), (500, 375), (640, 480), (1920, 1080), (30, 20), (1300, 60), (60, 1300), (333, 777),
         (1001, 999), (97, 203), (13, 1300), (2000, 10), (256, 256), (48, 48)]


def hf_preprocess(image, min_pixels, max_pixels, patch_size=14):
    """transformers' slow Qwen2VLImageProcessor (what use_fast=False loads: the PIL backend)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    proc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size)
    out = proc(images=[image], return_tensors='pt')
    return out['pixel_values'], out['image_grid_thw']


@pytest.fixture(scope='module')
def vision_process():
    """qwen-vl-utils' vision_process. It imports torchvision at the top for its video readers, which its
    image path never calls; PyPI's torchvision does not import beside this torch build, so without a working
    one a bare stand-in sits in sys.modules during that import only."""
    if importlib.util.find_spec('qwen_vl_utils') is None:
        pytest.skip('qwen-vl-utils is not installed (pip install qwen-vl-utils==0.0.14)')
    try:
        import torchvision  # noqa: F401
        return importlib.import_module('qwen_vl_utils.vision_process')
    except Exception:
        pass
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split('.')[0] == 'torchvision'}
    stub = {k: types.ModuleType(k) for k in ('torchvision', 'torchvision.io', 'torchvision.transforms')}
    stub['torchvision'].io, stub['torchvision'].transforms = stub['torchvision.io'], stub['torchvision.transforms']
    stub['torchvision.transforms'].InterpolationMode = None
    sys.modules.update(stub)
    try:
        return importlib.import_module('qwen_vl_utils.vision_process')
    finally:
        for k in stub:
            sys.modules.pop(k, None)
        sys.modules.update(saved)


def official(vision_process, image):
    """UAE's demo: the image in a chat message through process_vision_info, then the processor (UAE's
    preprocessor_config.json: min_pixels 3136, max_pixels 65536)."""
    message = {'role': 'user', 'content': [{'type': 'text', 'text': 'Describe.'}, {'type': 'image', 'image': image}]}
    images, _ = vision_process.process_vision_info([message])
    return hf_preprocess(images[0], 3136, 65536)


class CountingTokenizer:
    """caption_inputs needs a tokenizer for the prompt only; its ids do not matter here."""
    pad_token_id = 0

    def chat_ids(self, text, role, n_image_tokens):
        return [1] * (n_image_tokens + 1)


@pytest.fixture(scope='module')
def encoder():
    """Qwen2.5-VL's image geometry (patch 14, merge 2, temporal 2) with a tiny model that never runs."""
    config = EncoderConfig(vocab_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, mrope_section=[1, 2, 1], vision_depth=1,
                           vision_hidden_size=16, vision_intermediate_size=16, vision_num_heads=1,
                           fullatt_block_indexes=[0], image_token_id=2, vision_start_token_id=3,
                           vision_end_token_id=4, eos_token_id=5)
    enc = Encoder(config)
    assert (enc.min_pixels, enc.max_pixels) == (3136, 65536)
    return enc


def caption_pixels(encoder, images):
    batch = encoder.caption_inputs(images, CountingTokenizer())
    return batch['pixel_values'], batch['image_grid_thw']


def noise(width, height, seed=0, channels=3):
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng([width, height, seed]).integers(0, 256, shape, dtype=np.uint8)


# -----------------------------------------------------------------------------
# the official captioning path: two resizes

def test_smart_resize_targets_match_both_references(vision_process):
    """Target sizes over a sweep: ours with at_least_factor = qwen-vl-utils (its 4 to 16384 tokens), ours
    without = transformers, for Qwen2.5-VL's factor and the toy's."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
    sides = [*range(1, 60), *range(60, 1400, 37), 2048, 3000, 4096, 5000]
    pairs = [(h, w) for h in sides for w in sides if max(h, w) / min(h, w) <= 200] + [(40000, 201), (201, 40000)]
    for factor in (28, 16):
        lo, hi = 4 * factor ** 2, 16384 * factor ** 2
        for h, w in pairs:
            assert smart_resize(h, w, factor, lo, hi, at_least_factor=True) == \
                vision_process.smart_resize(h, w, factor, lo, hi), (h, w, factor)
            assert smart_resize(h, w, factor, 3136, 65536) == hf_smart_resize(h, w, factor, 3136, 65536), (h, w)


def test_caption_inputs_equal_official(vision_process, encoder):
    """Every size of the sweep: the same grid and torch.equal pixel_values as process_vision_info + the
    processor; 464x200 gets the official 10x28 patches (one resize from the original gave 12x26)."""
    images = [Image.fromarray(noise(w, h)) for w, h in SIZES]
    got_pixels, got_grids = caption_pixels(encoder, images)
    wants = [official(vision_process, image) for image in images]
    assert torch.equal(got_grids, torch.cat([g for _, g in wants]))
    assert torch.equal(got_pixels, torch.cat([p for p, _ in wants]))
    assert got_grids[0].tolist() == [1, 10, 28] and preprocess_image(images[0])[1].tolist() == [[1, 12, 26]]


def test_modes_and_files_equal_official(vision_process, encoder, tmp_path):
    """RGB, L, RGBA, CMYK, as PIL images and read from files: equal to the official path. Where we mean to
    differ it is the official path on our RGB conversion: LA and palette transparency go onto white (as
    transformers does; qwen-vl-utils drops the alpha of all but RGBA), 16 bit is scaled (PIL clips it)."""
    rgba = Image.fromarray(noise(464, 200, channels=4), 'RGBA')
    palette = rgba.convert('RGB').convert('P')
    palette.info['transparency'] = palette.getpixel((0, 0))  # an index the image uses
    grey16 = Image.fromarray(noise(464, 200, seed=1, channels=1).astype(np.uint16) * 251)
    same = {'RGB': rgba.convert('RGB'), 'L': rgba.convert('L'), 'RGBA': rgba, 'CMYK': rgba.convert('CMYK')}
    ours_only = {'LA': rgba.convert('LA'), 'P': palette, 'I;16': grey16}
    for mode, image in {**same, **ours_only}.items():
        path = str(tmp_path / f'{mode.replace(";", "")}.{"jpg" if mode == "CMYK" else "png"}')
        image.save(path)
        for source in (image, path):
            got = caption_pixels(encoder, [source])
            reference = official(vision_process, source if mode in same else to_rgb(Image.open(path)))
            assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1]), (mode, source)
            if mode in ours_only:  # the difference is real
                assert not torch.equal(got[0], official(vision_process, source)[0]), mode


def test_exif_rotated_jpeg(vision_process, encoder, tmp_path):
    """A phone JPEG stored sideways with EXIF orientation 6 is read upright (qwen-vl-utils ignores the tag)."""
    path = str(tmp_path / 'phone.jpg')
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(noise(640, 480)).save(path, exif=exif.tobytes(), quality=95)
    stored = Image.open(path)
    image = load_image(path)
    assert stored.size == (640, 480) and image.size == (480, 640)
    assert np.array_equal(np.asarray(image), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))
    got = caption_pixels(encoder, [path])
    want = official(vision_process, ImageOps.exif_transpose(Image.open(path)))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert official(vision_process, path)[1][0, 1:].tolist() == got[1][0, 1:].flip(0).tolist()  # sideways there


def test_toy_images_resize_once(encoder):
    """Where the first resize lands within the processor's bounds (every toy-world image) the two steps are
    one resize: caption_inputs equals the processor alone, and fetch_image is the identity on its output."""
    images = [Image.fromarray(noise(w, h)) for w, h in [(48, 48), (56, 84), (200, 150), (250, 250)]]
    got = caption_pixels(encoder, images)
    want = [preprocess_image(im) for im in images]
    assert torch.equal(got[0], torch.cat([p for p, _ in want])) and torch.equal(got[1], torch.cat([g for _, g in want]))
    fetched = fetch_image(images[2])
    assert np.array_equal(np.asarray(fetch_image(fetched)), np.asarray(fetched))
    # the toy encoder (patch 8, merge 2, 48x48 only): its first resize keeps a 48x48 image as it is
    toy = Image.fromarray(noise(48, 48))
    assert np.array_equal(np.asarray(fetch_image(toy, 16)), np.asarray(toy))


# -----------------------------------------------------------------------------
# the processor alone (one resize)

@pytest.mark.parametrize('size', [(256, 256), (37, 411), (1000, 12), (5, 900), (640, 480), (20, 20), (300, 301)])
def test_preprocess_matches_hf(size):
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    for min_pixels, max_pixels, patch in [(3136, 65536, 14), (56 * 56, 28 * 28 * 1280, 14), (256, 4096, 4)]:
        want_pixels, want_grid = hf_preprocess(image, min_pixels, max_pixels, patch)
        pixels, grid = preprocess_image(image, min_pixels, max_pixels, patch_size=patch)
        assert torch.equal(grid, want_grid)
        assert pixels.dtype == torch.float32 and torch.equal(pixels, want_pixels), (pixels - want_pixels).abs().max()


def test_preprocess_modes_match_hf(tmp_path):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), 'RGBA')
    palette = rgba.convert('RGB').convert('P')
    palette.info['transparency'] = palette.getpixel((0, 0))  # an index the image uses
    images = {'L': rgba.convert('L'), 'LA': rgba.convert('LA'), 'RGBA': rgba, 'P': palette,
              'CMYK': rgba.convert('CMYK'), 'RGB': rgba.convert('RGB')}
    for mode, image in images.items():
        path = str(tmp_path / f'{mode}.{"jpg" if mode == "CMYK" else "png"}')
        image.save(path)
        for source in (image, path):  # a PIL image, and the same image read from a file
            want = hf_preprocess(Image.open(source) if isinstance(source, str) else source, 3136, 65536)
            got = preprocess_image(source, 3136, 65536)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), mode
    # 16-bit grey is scaled to 8 bits (PIL's conversion, used by transformers, would clip it at 255)
    grey16 = rng.integers(0, 65536, (50, 70)).astype(np.uint16)
    path = str(tmp_path / 'grey16.png')
    Image.fromarray(grey16).save(path)
    grey8 = Image.fromarray(np.round(grey16 / 257).astype(np.uint8))
    assert torch.equal(preprocess_image(path)[0], hf_preprocess(grey8, 3136, 65536)[0])


def test_preprocess_errors(tmp_path):
    empty, junk = tmp_path / 'empty.jpg', tmp_path / 'junk.png'
    empty.write_bytes(b'')
    junk.write_bytes(b'not an image at all')
    with pytest.raises(ValueError, match='empty.jpg.*empty'):
        preprocess_image(str(empty))
    with pytest.raises(ValueError, match='junk.png'):
        preprocess_image(str(junk))
    with pytest.raises(ValueError, match='missing.png'):
        preprocess_image(str(tmp_path / 'missing.png'))
    with pytest.raises(ValueError, match='aspect ratio'):
        preprocess_image(Image.new('RGB', (1000, 4)))
    with pytest.raises(ValueError, match='zero size'):
        preprocess_image(Image.new('RGB', (0, 4)))
    with pytest.raises(TypeError, match='PIL image or a uint8 array'):
        to_rgb('not an image')


# -----------------------------------------------------------------------------
# reading files, pixel conversions

def test_16_bit_png_equals_its_8_bit_original(tmp_path):
    """A lossless 16-bit copy (v * 257) reads as its 8-bit original, so it is identical to it under every
    metric (PIL's own conversion clips: the pixel metric scored such a copy 0.20 against itself)."""
    from embedders import PixelEmbedder
    grey8 = noise(70, 50, channels=1)
    Image.fromarray(grey8).save(tmp_path / 'a8.png')
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / 'a16.png')
    a8, a16 = load_image(str(tmp_path / 'a8.png')), load_image(str(tmp_path / 'a16.png'))
    assert Image.open(tmp_path / 'a16.png').mode.startswith('I') and np.array_equal(np.asarray(a8), np.asarray(a16))
    pixel = PixelEmbedder()
    assert pixel.similarity(pixel.embed([a16]), pixel.embed([a8])).item() == 1.0


def test_pixel_conversions():
    """uint8 -> [-1, 1] -> uint8 is exact for every value; out-of-range floats clamp."""
    arrays = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 16, 16, 3)
    x = to_pixels(arrays)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert np.array_equal(to_uint8(x), arrays)
    edge = torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(edge)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]  # 0.0 is 127.5: to even
    assert np.array_equal(np.asarray(to_pil(arrays)[0]), arrays[0])
