"""Embedders: same features as the transformers models with the same random tiny weights, same
preprocessing as the transformers image processors, strict loading, LongCLIP's OpenAI-format conversion."""
import ast
import inspect
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from embedders import IMAGENET_MEAN, IMAGENET_STD, center_crop, cosine, load_embedder, preprocess
from images import CLIP_MEAN, CLIP_STD, to_rgb

TOL = 1e-5


def randomize(model, seed=0):
    """Every parameter random (LayerNorm weights, biases and layer scales too, which the default init
    leaves at 1 / 0 where a swapped or dropped tensor would go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if p.ndim == 1 and
                    ('norm' in name or 'lambda1' in name) and name.endswith(('weight', 'lambda1')) else 0.0))
    return model.eval()


def make_images():
    """Non-square images with texture and structure, plus a transparent and a greyscale one."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((45, 70), (83, 40), (50, 50)):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 32 * 8], -1)
        out.append(Image.fromarray(np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)))
    rgba = rng.integers(0, 256, (37, 61, 4)).astype(np.uint8)
    out.append(Image.fromarray(rgba, 'RGBA'))
    out.append(Image.fromarray(rng.integers(0, 256, (66, 39)).astype(np.uint8), 'L'))
    return out


def hf_pixels(processor, images):
    return torch.as_tensor(np.stack(processor(images, return_tensors='np')['pixel_values']))


def ours_pixels(embedder, images):
    return torch.stack([preprocess(im, embedder.preprocess) for im in images])


def assert_features_differ(feats):
    """The comparison is only meaningful if the tiny model tells the images apart."""
    sims = feats @ feats.T
    assert sims[~torch.eye(len(feats), dtype=torch.bool)].max() < 0.99


# -----------------------------------------------------------------------------
# CLIP

def tiny_clip_vision(tmp_path, image_size=32):
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, patch_size=4,
                                           num_attention_heads=4, image_size=image_size, projection_dim=24)
    model = randomize(transformers.CLIPVisionModelWithProjection(config))
    model.save_pretrained(tmp_path)
    return model


def test_clip_matches_transformers(tmp_path):
    ref = tiny_clip_vision(tmp_path)
    processor = CLIPImageProcessorPil(size={'shortest_edge': 35}, crop_size={'height': 32, 'width': 32})
    processor.save_pretrained(tmp_path)
    emb = load_embedder('clip', str(tmp_path))
    images = make_images()
    assert torch.equal(ours_pixels(emb, images), hf_pixels(processor, images))
    with torch.no_grad():
        want = F.normalize(ref(pixel_values=hf_pixels(processor, images)).image_embeds, dim=-1)
    got = emb.embed(images, batch_size=2)
    assert got.shape == (5, 24)
    assert (got - want).abs().max() < TOL
    assert_features_differ(got)


def test_clip_full_model_dir_ignores_the_text_tower(tmp_path):
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    ref = randomize(transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                                   projection_dim=16)))
    ref.save_pretrained(tmp_path)
    emb = load_embedder('clip', str(tmp_path))  # no preprocessor_config.json: shortest edge = crop = 32
    images = make_images()
    pixels = hf_pixels(CLIPImageProcessorPil(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32}), images)
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=pixels)
    want = F.normalize(getattr(want, 'pooler_output', want), dim=-1)  # an output object in transformers 5
    assert (emb.embed(images) - want).abs().max() < TOL


@pytest.mark.parametrize('config', [
    {},  # the class defaults (what the official scripts get without a config)
    {'size': 224, 'crop_size': 224, 'do_center_crop': True, 'resample': 3,  # the legacy int format of openai/clip-*
     'image_mean': list(CLIP_MEAN), 'image_std': list(CLIP_STD), 'feature_extractor_type': 'CLIPFeatureExtractor'},
    {'size': {'shortest_edge': 50}, 'crop_size': {'height': 40, 'width': 30}, 'resample': 2, 'do_normalize': False},
    {'size': {'shortest_edge': 20}, 'crop_size': {'height': 33, 'width': 25}},  # crop larger than the image: padded
])
def test_clip_preprocessing_matches_processor(tmp_path, config):
    tiny_clip_vision(tmp_path, image_size=224)  # ViT-L/14's size: without a config both default to 224
    (tmp_path / 'preprocessor_config.json').write_text(json.dumps(config))
    processor = CLIPImageProcessorPil.from_pretrained(tmp_path) if config else CLIPImageProcessorPil()
    emb = load_embedder('clip', str(tmp_path))
    images = make_images() + [Image.new('RGB', (20, 10), (200, 10, 30))]  # smaller than the crop: upsampled
    for im in images:
        assert torch.equal(preprocess(im, emb.preprocess), hf_pixels(processor, [im])[0])


# -----------------------------------------------------------------------------
# DINOv2

def tiny_dinov2(tmp_path):
    config = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=3,
                                       image_size=24, patch_size=4, layer_norm_eps=1e-6)
    model = randomize(transformers.Dinov2Model(config))
    model.save_pretrained(tmp_path)
    return model


def test_dinov2_matches_transformers(tmp_path):
    ref = tiny_dinov2(tmp_path)  # a 6x6 position table, used at 8x8 and 8x11: bicubic-resized
    hub = {'crop_size': {'height': 32, 'width': 32}, 'do_center_crop': True, 'do_convert_rgb': True,
           'do_normalize': True, 'do_rescale': True, 'do_resize': True, 'image_mean': list(IMAGENET_MEAN),
           'image_processor_type': 'BitImageProcessor', 'image_std': list(IMAGENET_STD), 'resample': 3,
           'rescale_factor': 1 / 255, 'size': {'shortest_edge': 40}}  # facebook/dinov2-*'s file, sizes shrunk
    (tmp_path / 'preprocessor_config.json').write_text(json.dumps(hub))
    processor = BitImageProcessorPil.from_pretrained(tmp_path)
    emb = load_embedder('dinov2', str(tmp_path))
    images = make_images()
    assert torch.equal(ours_pixels(emb, images), hf_pixels(processor, images))
    with torch.no_grad():
        want = F.normalize(ref(pixel_values=hf_pixels(processor, images)).last_hidden_state[:, 0], dim=-1)
        got = emb.embed(images)
        assert (got - want).abs().max() < TOL
        assert_features_differ(got)
        x = torch.randn(2, 3, 32, 44)  # non-square grid straight into the towers
        assert (emb.model(x) - ref(pixel_values=x).last_hidden_state[:, 0]).abs().max() < TOL


def test_uncropped_images_of_different_sizes_are_embedded_one_by_one(tmp_path):
    ref = tiny_dinov2(tmp_path)
    (tmp_path / 'preprocessor_config.json').write_text(json.dumps({'size': {'shortest_edge': 24},
                                                                   'do_center_crop': False}))
    processor = BitImageProcessorPil.from_pretrained(tmp_path)
    images = make_images()
    got = load_embedder('dinov2', str(tmp_path)).embed(images)
    with torch.no_grad():
        for im, g in zip(images, got):
            want = F.normalize(ref(pixel_values=hf_pixels(processor, [im])).last_hidden_state[0, 0], dim=-1)
            assert (g - want).abs().max() < TOL


def test_dinov2_default_preprocessing_is_the_hub_processor(tmp_path):
    tiny_dinov2(tmp_path)
    emb = load_embedder('dinov2', str(tmp_path))  # no preprocessor_config.json
    processor = BitImageProcessorPil(size={'shortest_edge': 256}, crop_size={'height': 224, 'width': 224},
                                     image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, resample=3)
    images = make_images()
    assert torch.equal(ours_pixels(emb, images), hf_pixels(processor, images))


# -----------------------------------------------------------------------------
# DINOv3

def tiny_dinov3(tmp_path, **kw):
    config = transformers.DINOv3ViTConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, patch_size=4,
                                          num_attention_heads=4, image_size=32, num_register_tokens=2, **kw)
    model = randomize(transformers.DINOv3ViTModel(config))
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize('kw', [{}, {'use_gated_mlp': True, 'hidden_act': 'silu', 'key_bias': True}])
def test_dinov3_matches_transformers(tmp_path, kw):
    ref = tiny_dinov3(tmp_path, **kw)
    # the hub's file format; DINOv3ViTImageProcessor needs torchvision, so the reference model is fed our
    # pixels here and the preprocessing has its own tests below
    (tmp_path / 'preprocessor_config.json').write_text(json.dumps({
        'image_processor_type': 'DINOv3ViTImageProcessorFast', 'size': {'height': 32, 'width': 48}, 'resample': 2,
        'do_center_crop': None, 'crop_size': None, 'image_mean': list(IMAGENET_MEAN), 'image_std': list(IMAGENET_STD)}))
    emb = load_embedder('dinov3', str(tmp_path))
    images = make_images()
    pixels = ours_pixels(emb, images)
    assert pixels.shape == (5, 3, 32, 48)  # an 8x12 grid: RoPE on a non-square grid
    with torch.no_grad():
        want = F.normalize(ref(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)
        got = emb.embed(images)
        assert (got - want).abs().max() < TOL
        assert_features_differ(got)
        x = torch.randn(2, 3, 44, 28)
        assert (emb.model(x) - ref(pixel_values=x).last_hidden_state[:, 0]).abs().max() < TOL
    bf16 = load_embedder('dinov3', str(tmp_path), dtype='bfloat16')  # the GPU path, runs on CPU too
    assert cosine(bf16.embed(images), got).min() > 0.98


def dinov3_processor_defaults():
    """The class attributes of the pinned DINOv3ViTImageProcessor, read from its source: importing it
    needs torchvision, which this project does not install."""
    from transformers import image_utils
    from transformers.models import dinov3_vit
    source = open(inspect.getfile(dinov3_vit).replace('__init__.py', 'image_processing_dinov3_vit.py')).read()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == 'DINOv3ViTImageProcessor')
    out = {}
    for node in cls.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            v = node.value
            if isinstance(v, ast.Name):
                out[node.targets[0].id] = getattr(image_utils, v.id)
            elif isinstance(v, ast.Attribute):
                out[node.targets[0].id] = getattr(getattr(image_utils, v.value.id), v.attr)
            else:
                out[node.targets[0].id] = ast.literal_eval(v)
    return out


def test_dinov3_default_preprocessing_is_the_pinned_processor(tmp_path):
    d = dinov3_processor_defaults()
    assert d['do_resize'] and d['do_rescale'] and d['do_normalize'] and not d.get('do_center_crop')
    tiny_dinov3(tmp_path)
    p = load_embedder('dinov3', str(tmp_path)).preprocess  # no preprocessor_config.json
    assert p.size == (d['size']['height'], d['size']['width']) and p.crop is None
    assert p.resample == int(d['resample']) and p.mean == tuple(d['image_mean']) and p.std == tuple(d['image_std'])
    # rescale first, then an antialiased resize of the float image: checked against PIL's float ('F')
    # resampler, an independent implementation of the same filter (torchvision is not installed here)
    for im in make_images():
        rgb = np.asarray(to_rgb(im), dtype=np.float32) / 255
        resample = Image.Resampling(p.resample)
        ref = np.stack([np.asarray(Image.fromarray(rgb[..., c], 'F').resize(p.size[::-1], resample)) for c in range(3)])
        ref = (torch.from_numpy(ref) - torch.tensor(p.mean)[:, None, None]) / torch.tensor(p.std)[:, None, None]
        got = preprocess(im, p)
        assert got.shape == (3, 224, 224) and (got - ref).abs().max() < 2e-4


# -----------------------------------------------------------------------------
# LongCLIP: an OpenAI-CLIP-format state dict

def hf_to_openai(ref):
    """A random tiny HF CLIP vision tower's weights under OpenAI CLIP's names, plus a fake text tower."""
    sd, out = ref.state_dict(), {}
    v = 'vision_model.'
    out['visual.conv1.weight'] = sd[v + 'embeddings.patch_embedding.weight']
    out['visual.class_embedding'] = sd[v + 'embeddings.class_embedding']
    out['visual.positional_embedding'] = sd[v + 'embeddings.position_embedding.weight']
    for a, b in (('ln_pre', 'pre_layrnorm'), ('ln_post', 'post_layernorm')):
        out[f'visual.{a}.weight'], out[f'visual.{a}.bias'] = sd[f'{v}{b}.weight'], sd[f'{v}{b}.bias']
    out['visual.proj'] = sd['visual_projection.weight'].t().contiguous()
    for i in range(ref.config.num_hidden_layers):
        s, o = f'{v}encoder.layers.{i}.', f'visual.transformer.resblocks.{i}.'
        for leaf in ('weight', 'bias'):
            out[f'{o}attn.in_proj_{leaf}'] = torch.cat([sd[f'{s}self_attn.{n}_proj.{leaf}'] for n in 'qkv'])
            for a, b in (('attn.out_proj', 'self_attn.out_proj'), ('ln_1', 'layer_norm1'), ('ln_2', 'layer_norm2'),
                         ('mlp.c_fc', 'mlp.fc1'), ('mlp.c_proj', 'mlp.fc2')):
                out[f'{o}{a}.{leaf}'] = sd[f'{s}{b}.{leaf}']
    text = {'positional_embedding': (248, 32), 'positional_embedding_res': (248, 32), 'mask1': (248, 1),
            'token_embedding.weight': (50, 32), 'ln_final.weight': (32,), 'text_projection': (32, 48),
            'logit_scale': (), 'transformer.resblocks.0.attn.in_proj_weight': (96, 32)}
    out.update({k: torch.randn(s) for k, s in text.items()})
    return {k: t.clone() for k, t in out.items()}


def openai_visual_forward(sd, x):
    """OpenAI CLIP's VisionTransformer written out, attention by torch's own MultiheadAttention (which
    reads in_proj_weight natively): an independent check of the test's name conversion."""
    v = lambda k: sd['visual.' + k]  # noqa: E731
    width, patch = v('conv1.weight').shape[0], v('conv1.weight').shape[-1]
    x = F.conv2d(x, v('conv1.weight'), stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([v('class_embedding').expand(len(x), 1, -1), x], 1) + v('positional_embedding')
    x = F.layer_norm(x, (width,), v('ln_pre.weight'), v('ln_pre.bias'))
    i = 0
    while f'visual.transformer.resblocks.{i}.ln_1.weight' in sd:
        b = lambda k: v(f'transformer.resblocks.{i}.{k}')  # noqa: E731
        mha = torch.nn.MultiheadAttention(width, width // 64, batch_first=True)
        mha.load_state_dict({'in_proj_weight': b('attn.in_proj_weight'), 'in_proj_bias': b('attn.in_proj_bias'),
                             'out_proj.weight': b('attn.out_proj.weight'), 'out_proj.bias': b('attn.out_proj.bias')})
        h = F.layer_norm(x, (width,), b('ln_1.weight'), b('ln_1.bias'))
        x = x + mha(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (width,), b('ln_2.weight'), b('ln_2.bias'))
        h = F.linear(h, b('mlp.c_fc.weight'), b('mlp.c_fc.bias'))
        x = x + F.linear(h * torch.sigmoid(1.702 * h), b('mlp.c_proj.weight'), b('mlp.c_proj.bias'))
        i += 1
    return F.layer_norm(x[:, 0], (width,), v('ln_post.weight'), v('ln_post.bias')) @ v('proj')


def tiny_openai_clip():
    config = transformers.CLIPVisionConfig(hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=48)
    ref = randomize(transformers.CLIPVisionModelWithProjection(config))  # heads = width / 64, as OpenAI's
    return ref, hf_to_openai(ref)


def test_longclip_conversion_matches_transformers(tmp_path):
    ref, sd = tiny_openai_clip()
    path = tmp_path / 'longclip-L.pt'
    torch.save(sd, path)
    torch.save({'state_dict': sd, 'epoch': 3}, tmp_path / 'nested.pt')
    images = make_images()
    for p in (path, tmp_path / 'nested.pt'):
        emb = load_embedder('longclip', str(p))
        pixels = ours_pixels(emb, images)
        with torch.no_grad():
            want = F.normalize(ref(pixel_values=pixels).image_embeds, dim=-1)
            assert (F.normalize(openai_visual_forward(sd, pixels), dim=-1) - want).abs().max() < TOL
        got = emb.embed(images)
        assert got.shape == (5, 48) and (got - want).abs().max() < TOL
        assert_features_differ(got)


def test_longclip_preprocessing_is_openais_transform(tmp_path):
    _, sd = tiny_openai_clip()
    torch.save(sd, tmp_path / 'l.pt')
    p = load_embedder('longclip', str(tmp_path / 'l.pt')).preprocess
    assert (p.size, p.crop, p.mean, p.std) == (32, (32, 32), CLIP_MEAN, CLIP_STD)
    # same resize and normalisation as the CLIP processor; the centre crop offset is rounded
    # (torchvision's CenterCrop), so a 32x35 image loses 2 columns on the left, not 1
    im = make_images()[0].resize((35, 32), Image.BICUBIC)
    full = hf_pixels(CLIPImageProcessorPil(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 35}), [im])[0]
    assert torch.equal(preprocess(im, p), full[:, :, 2:34])
    assert torch.equal(center_crop(full, 32, 32), full[:, :, 1:33])  # transformers floors


# -----------------------------------------------------------------------------
# strict loading and clear errors

def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        load_embedder('clip', str(tmp_path / 'nowhere'))
    with pytest.raises(FileNotFoundError, match='config.json'):
        load_embedder('dinov2', str(tmp_path))
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'dinov2'}))
    (tmp_path / 'pytorch_model.bin').write_bytes(b'')
    with pytest.raises(FileNotFoundError, match='model.safetensors.*convert pytorch_model.bin'):
        load_embedder('dinov2', str(tmp_path))
    with pytest.raises(ValueError, match="model_type 'dinov2', expected dinov3_vit"):
        load_embedder('dinov3', str(tmp_path))
    (tmp_path / 'config.json').write_text('{"model_type": ')
    with pytest.raises(ValueError, match='config.json is not valid JSON'):
        load_embedder('dinov2', str(tmp_path))
    with pytest.raises(FileNotFoundError, match='missing.pt'):
        load_embedder('longclip', str(tmp_path / 'missing.pt'))
    with pytest.raises(ValueError, match='unknown embedder'):
        load_embedder('siglip', str(tmp_path))
    with pytest.raises(ValueError, match='no weights'):
        load_embedder('pixel', str(tmp_path))


def test_bad_keys_are_named(tmp_path):
    tiny_dinov3(tmp_path)
    from common import load_safetensors
    sd = load_safetensors(str(tmp_path / 'model.safetensors'))
    del sd['layer.1.layer_scale2.lambda1']
    sd['layer.0.attention.k_proj.bias'] = torch.zeros(64)  # key_bias=False in the config
    sd['embeddings.register_tokens'] = torch.zeros(1, 3, 64)
    save_file(sd, str(tmp_path / 'model.safetensors'))
    with pytest.raises(ValueError) as e:
        load_embedder('dinov3', str(tmp_path))
    msg = str(e.value)
    assert 'missing keys: layer.1.layer_scale2.lambda1' in msg
    assert 'unexpected keys: layer.0.attention.k_proj.bias' in msg
    assert 'embeddings.register_tokens: expected (1, 2, 64), got (1, 3, 64)' in msg
    assert str(tmp_path) in msg


def test_longclip_bad_checkpoints_are_refused(tmp_path):
    _, sd = tiny_openai_clip()

    def load(obj):
        torch.save(obj, tmp_path / 'x.pt')
        return load_embedder('longclip', str(tmp_path / 'x.pt'))
    bad = dict(sd)
    del bad['visual.transformer.resblocks.1.ln_2.bias']
    bad['visual.attnpool.c_proj.weight'] = torch.zeros(2, 2)
    bad['visual.ln_post.weight'] = torch.zeros(64)
    with pytest.raises(ValueError) as e:
        load(bad)
    msg = str(e.value)
    assert 'missing keys: visual.transformer.resblocks.1.ln_2.bias' in msg
    assert 'unexpected keys: visual.attnpool.c_proj.weight' in msg
    assert 'visual.ln_post.weight: expected (128,), got (64,)' in msg
    with pytest.raises(ValueError, match='weights_only=True'):
        load(torch.nn.Linear(2, 2))  # a pickled module, not a state dict
    with pytest.raises(ValueError, match='holds a list'):
        load([sd['visual.proj']])
    with pytest.raises(ValueError, match="no 'visual.\\*' keys"):
        load({k: t for k, t in sd.items() if not k.startswith('visual.')})


# -----------------------------------------------------------------------------
# pixel

def test_pixel_metric():
    emb = load_embedder('pixel')
    pixels = np.random.default_rng(0).integers(50, 200, (40, 70, 3))
    a, brighter, b = (Image.fromarray(x.astype(np.uint8)) for x in (pixels, pixels + 8, 255 - pixels))
    fa = emb.embed([a, a, a])
    s = emb.similarity(fa, emb.embed([a, brighter, b]))
    assert s[0] == 1 and 0 < s[2] < s[1] < 1
    assert math.isclose(s[1].item(), 1 - 8 / 255, abs_tol=1e-3)  # every channel 8 levels brighter
    assert emb.embed([]).shape == (0, 3 * 64 * 64)
