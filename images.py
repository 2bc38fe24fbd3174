"""
images: reading files, pixel conversions, Qwen2-VL preprocessing.

    image = load_image('photo.jpg')     # RGB PIL image: upright by EXIF, alpha on white, 16 bit -> 8
    pv, grid = preprocess_image(fetch_image(image), 3136, 65536)   # Qwen2.5-VL's captioning input
    x = to_pixels(arrays)               # uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]
    arrays = to_uint8(x)                # and back; to_pil(arrays) for PIL images
"""
import math
import os

import numpy as np
import torch
from PIL import Image, ImageOps

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# the file types the benchmark and the RL data loader read (the official Unified-Bench script's list)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tiff', '.webp')


# -----------------------------------------------------------------------------
# reading

def to_rgb(image):
    """PIL image or (H, W, 3) uint8 array -> RGB PIL image. As transformers' convert_to_rgb, anything
    with transparency is composited onto white and the rest converted by PIL; but 16-bit images are
    scaled to 8 bits (v / 257, rounded), where PIL's conversion would clip them at 255 (mostly white)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f'expected a PIL image or a uint8 array, got {type(image).__name__}')
    if image.mode.startswith('I'):  # 'I;16*' and 'I', which is how PIL may read a 16-bit grey PNG
        image = Image.fromarray(np.clip(np.round(np.asarray(image, np.float64) / 257), 0, 255).astype(np.uint8))
    if 'A' in image.getbands() or 'transparency' in image.info:
        white = Image.new('RGBA', image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert('RGBA')).convert('RGB')
    return image.convert('RGB')


def load_image(path):
    """An image file as an RGB PIL image (see to_rgb), turned upright by its EXIF orientation (a phone
    photo is stored sideways with a tag saying so). An unreadable or empty file is a ValueError naming it."""
    if os.path.exists(path) and os.path.getsize(path) == 0:
        raise ValueError(f'cannot read image {path}: the file is empty')
    try:
        with Image.open(path) as f:
            f.load()
            image = ImageOps.exif_transpose(f)
    except FileNotFoundError:
        raise ValueError(f'cannot read image {path}: no such file') from None
    except Exception as e:  # a broken file raises many types in PIL: OSError, SyntaxError, ValueError, ...
        raise ValueError(f'cannot read image {path}: {type(e).__name__}: {e}') from None
    if image.width == 0 or image.height == 0:
        raise ValueError(f'cannot read image {path}: zero size ({image.width}x{image.height})')
    return to_rgb(image)


def read_rgb(image):
    """A path (read by load_image) or an image (converted by to_rgb) -> RGB PIL image."""
    return load_image(image) if isinstance(image, (str, os.PathLike)) else to_rgb(image)


# -----------------------------------------------------------------------------
# pixel conversions: uint8 (B, H, W, 3) arrays, the models' float (B, 3, H, W) in [-1, 1], PIL images

def to_pixels(images, device=None):
    """uint8 (B, H, W, 3) (an array or a list of arrays) -> float32 (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(images))  # a copy: memmaps are read-only
    return x.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x):
    """float (B, 3, H, W) in [-1, 1] (clamped) -> uint8 (B, H, W, 3) numpy array, rounded to nearest."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images):
    """uint8 (H, W, 3) arrays -> PIL images."""
    return [Image.fromarray(np.asarray(im)) for im in images]


# -----------------------------------------------------------------------------
# Qwen2-VL preprocessing

def smart_resize(height, width, factor, min_pixels, max_pixels, at_least_factor=False):
    """Qwen2-VL's target size (h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect
    kept, as transformers computes it. at_least_factor: as qwen-vl-utils, which first rounds each side to
    at least one `factor` (transformers rounds a side under factor / 2 to 0, then scales up to min_pixels:
    qwen-vl-utils makes a 2000x10 image 1988x28, transformers 812x28)."""
    if min(height, width) == 0:
        raise ValueError(f'image has zero size ({width}x{height})')
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f'aspect ratio {max(height, width) / min(height, width):.0f} is over 200')
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if at_least_factor:
        h, w = max(factor, h), max(factor, w)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def fetch_image(image, factor=28):
    """The first of the two resizes of Qwen2.5-VL's official captioning path: qwen-vl-utils'
    process_vision_info / fetch_image, which runs before the processor. Image (path or PIL) -> RGB PIL
    image resized (PIL bicubic) to multiples of factor (patch size x merge size) with an area of 4 to
    16384 merged patches: 3136 to 12,845,056 pixels for Qwen2.5-VL's 28.
    Unlike qwen-vl-utils, the image is read by load_image / to_rgb: upright by EXIF, 16 bit scaled, and
    every kind of transparency on white (qwen-vl-utils does that for RGBA only; LA and palette images
    show their hidden colours there)."""
    image = read_rgb(image)
    h, w = smart_resize(image.height, image.width, factor, 4 * factor ** 2, 16384 * factor ** 2, at_least_factor=True)
    return image.resize((w, h), Image.BICUBIC)


def preprocess_image(image, min_pixels=3136, max_pixels=65536, patch_size=14, merge_size=2, temporal_patch_size=2):
    """Image (path or PIL) -> pixel_values (N, 3*T*P*P) float32 and image_grid_thw (1, 3), equal to
    transformers' Qwen2VLImageProcessor (the slow, PIL one): smart resize (bicubic), /255, CLIP mean/std,
    patches in merge-block order, each repeated temporal_patch_size times (a still image is a one-frame
    video). The official captioning path runs fetch_image first (see Encoder.caption_inputs)."""
    image = read_rgb(image)
    h, w = smart_resize(image.height, image.width, patch_size * merge_size, min_pixels, max_pixels)
    x = np.asarray(image.resize((w, h), Image.BICUBIC)).astype(np.float64) * (1 / 255)
    x = (x.astype(np.float32) - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    gh, gw, m, p = h // patch_size, w // patch_size, merge_size, patch_size
    x = x.transpose(2, 0, 1).reshape(3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None]  # (gh/m, gw/m, m, m, C, 1, p, p)
    x = np.broadcast_to(x, (*x.shape[:5], temporal_patch_size, p, p))
    return torch.from_numpy(x.reshape(gh * gw, -1).copy()), torch.tensor([[1, gh, gw]])
