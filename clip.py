"""CLIP ViT image encoder for LaVIN: the vision tower, OpenAI checkpoint loading, preprocessing.

LaVIN (Luo et al. 2023, arXiv 2305.15023, Sec. 3) keeps CLIP's ViT-L/14 (Radford et al. 2021,
Sec. 2.4) frozen and reads the residual stream's [CLS] token after every 4th block, giving six
visual tokens; a mixture-of-modality adapter sits before the attention of every block
(`adapter_attn`, filled by adapter.py).

    image ─preprocess─> (3, R, R) ─conv1─> patches + [CLS] + pos ─ln_pre─> block 1 .. block N
    block:  x = x + attn(adapter_attn(ln_1(x)));  x = x + mlp(ln_2(x))
    forward:      [CLS] after blocks every, 2*every, ..    -> (B, N // every, width)  (LaVIN)
    encode_image: ln_post([CLS] after block N) @ proj      -> (B, output_dim)         (CLIP)

Parameter names equal OpenAI's vision keys without `visual.`, so loading needs no rename table.
"""
import json
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from PIL import Image, ImageOps

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# top-level keys of a full CLIP checkpoint that belong to the text tower (or are metadata)
TEXT_KEYS = {"token_embedding.weight", "ln_final.weight", "ln_final.bias", "text_projection",
             "logit_scale", "input_resolution", "context_length", "vocab_size"}


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back: fp16 statistics over 1024 channels are too coarse."""

    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # the sigmoid approximation of GELU CLIP was trained with


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask), with nn.MultiheadAttention's names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(D, dim=-1)  # 3 x (B, L, D)
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hs)) v: (B, nh, L, hs)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(quick_gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(width), Attention(width, heads)
        self.ln_2, self.mlp = LayerNorm(width), MLP(width)
        # LaVIN's MM-adapter slot: any module (B, L, D) -> (B, L, D); empty means the plain CLIP block
        self.adapter_attn: nn.Module | None = None

    def forward(self, x, recompute: bool = False):
        """recompute: keep only x for the backward pass and run the block again there (gradient
        checkpointing), decided inside the block so that torch.compile compiles it with the block."""
        if recompute:
            return checkpoint(self.layer, x, use_reentrant=False)
        return self.layer(x)

    def layer(self, x):
        h = self.ln_1(x)
        if self.adapter_attn is not None:
            h = self.adapter_attn(h)
        x = x + self.attn(h)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])


class VisionTransformer(nn.Module):
    def __init__(self, resolution: int, patch_size: int, width: int, layers: int, output_dim: int):
        super().__init__()
        assert width % 64 == 0, "CLIP uses heads of size 64"
        self.resolution, self.patch_size, self.grid = resolution, patch_size, resolution // patch_size
        self.width, self.layers, self.heads, self.output_dim = width, layers, width // 64, output_dim
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, self.heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.grad_checkpointing = False

    def embed(self, images):
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.resolution,) * 2:
            raise ValueError(
                f"images of shape {tuple(images.shape)} do not fit the positional embedding: expected "
                f"(B, 3, {self.resolution}, {self.resolution}) ({self.grid}x{self.grid} patches of "
                f"{self.patch_size} pixels)")
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + g*g, D)
        return self.ln_pre(x)

    def forward(self, images, every: int = 4):
        """[CLS] of the residual stream (before ln_post) after blocks every, 2*every, ..: (B, N // every, D)."""
        if not 1 <= every <= self.layers:
            raise ValueError(f"every={every}: need 1 <= every <= {self.layers} (the number of blocks)")
        x, out = self.embed(images), []
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.resblocks, start=1):
            x = block(x, recompute)
            if i % every == 0:
                out.append(x[:, 0])
        return torch.stack(out, dim=1)  # (B, layers // every, D)

    def encode_image(self, images):
        """CLIP's image embedding: ln_post([CLS] after the last block) @ proj, (B, output_dim)."""
        x = self.transformer.resblocks(self.embed(images))  # (B, L, D)
        return self.ln_post(x[:, 0]) @ self.proj


def build_vit(state_dict: dict) -> VisionTransformer:
    """A VisionTransformer holding `state_dict` (vision keys, no prefix); every size is read off shapes."""
    needed = ["conv1.weight", "class_embedding", "positional_embedding", "proj"]
    if any(k not in state_dict for k in needed):
        raise ValueError(f"not a CLIP vision tower: expected keys {needed}; found {len(state_dict)} "
                         f"keys, first few: {list(state_dict)[:8]}")
    width, _, patch_size, _ = state_dict["conv1.weight"].shape
    positions = state_dict["positional_embedding"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise ValueError(f"positional_embedding has {positions} rows, not a square grid + [CLS]")
    layers = len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")})
    with torch.device("meta"):  # no time or memory spent on a random init that is overwritten next
        model = VisionTransformer(grid * patch_size, patch_size, width, layers, state_dict["proj"].shape[1])
    expected, given = set(model.state_dict()), set(state_dict)
    if expected != given:
        raise ValueError(f"CLIP vision state dict does not match a ViT (width {width}, {layers} layers, "
                         f"patch {patch_size}, grid {grid}): missing keys {sorted(expected - given)}, "
                         f"unexpected keys {sorted(given - expected)}")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def _jit_state_dict(path: str) -> dict:
    with warnings.catch_warnings():  # OpenAI ships TorchScript; its deprecation is no news to the user
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(path, map_location="cpu").state_dict()


def _read_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:  # TorchScript archives hold compiled code next to the tensors
            rest = [n.split("/", 1)[-1] for n in z.namelist()]
        if any(n == "constants.pkl" or n.startswith("code/") for n in rest):
            return _jit_state_dict(path)
    try:  # mmap avoids a second copy of the weights; only the zip format supports it
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # pickle errors come in many types; an unrecognised archive is the last hope
        try:
            return _jit_state_dict(path)
        except Exception:
            raise ValueError(f"cannot read CLIP checkpoint {path}: {type(e).__name__}: {e}") from e


# Hugging Face's names for the vision tower (openai/clip-vit-large-patch14 and -336) -> OpenAI's, per block.
HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}
HF_TOWER = {"vision_model.embeddings.patch_embedding.weight": "conv1.weight",
            "vision_model.embeddings.class_embedding": "class_embedding",
            "vision_model.embeddings.position_embedding.weight": "positional_embedding",
            "vision_model.pre_layrnorm.weight": "ln_pre.weight", "vision_model.pre_layrnorm.bias": "ln_pre.bias",
            "vision_model.post_layernorm.weight": "ln_post.weight", "vision_model.post_layernorm.bias": "ln_post.bias"}


def read_hf_clip(folder: str) -> dict:
    """OpenAI-named vision weights from Hugging Face's CLIP layout: config.json and
    model.safetensors or pytorch_model.bin. Its separate q, k and v projections are stacked into
    OpenAI's in_proj; visual_projection (output, width) is OpenAI's proj transposed."""
    config = json.loads(Path(folder, "config.json").read_text())
    vision = config.get("vision_config", config)
    if vision.get("hidden_act", "quick_gelu") != "quick_gelu" or vision.get("layer_norm_eps", 1e-5) != 1e-5:
        raise ValueError(f"{folder}/config.json: hidden_act {vision.get('hidden_act')!r}, layer_norm_eps "
                         f"{vision.get('layer_norm_eps')}: OpenAI's CLIP has quick_gelu and 1e-5")
    files = [Path(folder, name) for name in ("model.safetensors", "pytorch_model.bin") if Path(folder, name).is_file()]
    if not files:
        raise FileNotFoundError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin")

    def wanted(key: str) -> bool:  # the vision tower's weights (position_ids is an arange, not one)
        return key.startswith(("vision_model.", "visual_projection.")) and not key.endswith("position_ids")

    if files[0].suffix == ".safetensors":
        try:
            from safetensors import safe_open
        except ImportError as e:
            raise ImportError(f"{files[0]}: pip install safetensors to read it") from e
        with safe_open(files[0], "pt") as f:  # the vision tensors only: the text tower is never read
            hf = {k: f.get_tensor(k) for k in f.keys() if wanted(k)}
    else:  # memory-mapped: the text tower's pages are never touched
        hf = {k: v for k, v in torch.load(files[0], map_location="cpu", weights_only=True, mmap=True).items()
              if wanted(k)}
    sd = {ours: hf.pop(theirs) for theirs, ours in HF_TOWER.items() if theirs in hf}
    if "visual_projection.weight" in hf:
        sd["proj"] = hf.pop("visual_projection.weight").t().contiguous()
    for i in range(vision["num_hidden_layers"]):
        hp, op = f"vision_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            qkv = [hf.pop(f"{hp}self_attn.{n}_proj.{part}", None) for n in "qkv"]
            if all(t is not None for t in qkv):
                sd[f"{op}attn.in_proj_{part}"] = torch.cat(qkv)  # (3 width[, width]): rows q, k, v
            for theirs, ours in HF_BLOCK.items():
                if f"{hp}{theirs}.{part}" in hf:
                    sd[f"{op}{ours}.{part}"] = hf.pop(f"{hp}{theirs}.{part}")
    if hf:
        raise ValueError(f"{folder}: vision keys this CLIP does not know: {sorted(hf)[:8]}")
    return sd


def load_clip(path, dtype=torch.float32, device="cpu") -> VisionTransformer:
    """The frozen vision tower of an OpenAI CLIP checkpoint (TorchScript archive or plain state
    dict), or of a folder in Hugging Face's layout (config.json and its weights)."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        sd = read_hf_clip(path)
    else:
        sd = _read_checkpoint(path)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a CLIP state dict")
    # the vision keys are those next to `conv1.weight`: prefix "visual." in a full CLIP, "" in a tower
    prefixes = {k[:-len("conv1.weight")] for k in sd if isinstance(k, str) and k.endswith("conv1.weight")}
    prefixes = {p for p in prefixes if p == "" or p.endswith(".")}
    if len(prefixes) != 1:
        raise ValueError(f"{path} is not a CLIP vision tower: no unique 'conv1.weight' key; found "
                         f"{len(sd)} keys, first few: {list(sd)[:8]}")
    prefix = prefixes.pop()
    vision = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if prefix == "":
        vision = {k: v for k, v in vision.items() if k not in TEXT_KEYS}
    vision = {k: v.to(device=device, dtype=dtype) for k, v in vision.items()}
    try:
        model = build_vit(vision)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return model.eval().requires_grad_(False)


def to_rgb(image: Image.Image, background=None) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Alpha is dropped, as `Image.convert("RGB")` in the official
    LaVIN and CLIP pipelines does (transparent pixels keep their stored colour, often black: what
    the released weights saw); background=(255, 255, 255) flattens onto that colour instead."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit gray (PNG/TIFF; mode I is read as 0..65535 too): Pillow's convert clips at 255,
        # so scale 0..65535 onto 0..255 instead
        a = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8))  # (H, W) mode L
    if background is not None and (image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info):
        under = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(under, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")  # L, P, 1, CMYK, YCbCr, F (as 0..255); alpha dropped


def open_checked(path) -> Image.Image:
    """Image.open (the header only, nothing decoded), refusing a picture over Pillow's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS; None lifts it) with DecompressionBombError,
    where Pillow itself only warns below twice the limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by its size
        im = Image.open(path)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.width * im.height > limit:
        im.close()
        raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels, more than Pillow's decompression-bomb "
                                           f"limit of {limit}")
    return im


def load_image(path, background=None) -> Image.Image:
    """Open a path or binary file, fully decode (so truncated files fail here), apply EXIF
    orientation, convert to RGB (see to_rgb for background). A picture over Pillow's
    decompression-bomb limit is refused from its header, before anything is decoded."""
    try:
        with open_checked(path) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # in place: no extra copy of a 48-Mpixel photo
            return to_rgb(im, background)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
            Image.DecompressionBombError) as e:
        name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "(bytes)"  # demo.py passes a BytesIO
        raise ValueError(f"cannot read image {name}: {type(e).__name__}: {e}") from e


def preprocess(image, mode: str = "clip", resolution: int = 224, background=None) -> torch.Tensor:
    """PIL image (any mode) or path -> normalised float tensor (3, R, R).

    clip:  shorter side to R (bicubic, long side int(R * long / short) as torchvision's Resize),
           center crop R x R, CLIP's mean/std.
    lavin: plain R x R bicubic resize, ImageNet mean/std (what the released LaVIN weights saw).
    """
    R = resolution
    image = load_image(image, background) if isinstance(image, (str, os.PathLike)) else to_rgb(image, background)
    if mode == "clip":
        w, h = image.size
        size = (R, int(R * h / w)) if w <= h else (int(R * w / h), R)  # (W, H)
        image = image.resize(size, Image.BICUBIC)
        top, left = int(round((size[1] - R) / 2.0)), int(round((size[0] - R) / 2.0))
        image = image.crop((left, top, left + R, top + R))
        mean, std = CLIP_MEAN, CLIP_STD
    elif mode == "lavin":
        image = image.resize((R, R), Image.BICUBIC)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        raise ValueError(f"unknown preprocess mode {mode!r}: use 'clip' or 'lavin'")
    x = np.asarray(image, dtype=np.float32) / 255.0  # (R, R, 3)
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, R, R)
