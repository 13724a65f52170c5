"""clip.py against independent float64 / numpy references, on tiny checkpoints in OpenAI's formats
and in Hugging Face's."""
import io

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import clip
from tests.formats import write_hf_clip

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # saving OpenAI's format
WIDTH, LAYERS, PATCH, RES, OUT = 128, 4, 8, 32, 16  # 2 heads of 64, a 4x4 grid


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine each op then waits milliseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def openai_state_dict(width=WIDTH, layers=LAYERS, patch=PATCH, res=RES, out=OUT, device="cpu", seed=0):
    """A full CLIP state dict in OpenAI's layout: `visual.*` plus text-tower keys that must be skipped."""
    g = torch.Generator().manual_seed(seed) if device == "cpu" else None
    r = lambda *s, std=0.1: torch.randn(*s, generator=g, device=device) * std  # noqa: E731
    sd = {"visual.conv1.weight": r(width, 3, patch, patch, std=0.05),
          "visual.class_embedding": r(width), "visual.positional_embedding": r((res // patch) ** 2 + 1, width),
          "visual.ln_pre.weight": 1 + r(width), "visual.ln_pre.bias": r(width)}
    for i in range(layers):
        b = f"visual.transformer.resblocks.{i}."
        sd.update({b + "attn.in_proj_weight": r(3 * width, width), b + "attn.in_proj_bias": r(3 * width),
                   b + "attn.out_proj.weight": r(width, width), b + "attn.out_proj.bias": r(width),
                   b + "ln_1.weight": 1 + r(width), b + "ln_1.bias": r(width),
                   b + "mlp.c_fc.weight": r(4 * width, width), b + "mlp.c_fc.bias": r(4 * width),
                   b + "mlp.c_proj.weight": r(width, 4 * width, std=0.05), b + "mlp.c_proj.bias": r(width),
                   b + "ln_2.weight": 1 + r(width), b + "ln_2.bias": r(width)})
    sd.update({"visual.ln_post.weight": 1 + r(width), "visual.ln_post.bias": r(width), "visual.proj": r(width, out)})
    # text tower: its own positional_embedding and resblocks, unprefixed, exactly as in OpenAI's files
    sd.update({"positional_embedding": r(7, 64), "text_projection": r(64, out), "logit_scale": r(1)[0],
               "transformer.resblocks.0.attn.in_proj_weight": r(192, 64), "token_embedding.weight": r(10, 64),
               "ln_final.weight": r(64), "ln_final.bias": r(64), "input_resolution": torch.tensor(res),
               "context_length": torch.tensor(7), "vocab_size": torch.tensor(10)})
    return sd


class Archive(nn.Module):
    """Holds a flat state dict under the same dotted names, so it can be TorchScript-saved like OpenAI's."""

    def __init__(self, sd):
        super().__init__()
        for key, value in sd.items():
            *path, name = key.split(".")
            mod = self
            for p in path:
                if not hasattr(mod, p):
                    mod.add_module(p, nn.Module())
                mod = getattr(mod, p)
            if value.is_floating_point():
                mod.register_parameter(name, nn.Parameter(value.clone()))
            else:
                mod.register_buffer(name, value.clone())

    def forward(self, x):
        return x * self.logit_scale


def reference(sd, images, every=1, adapter=None):
    """Naive float64 CLIP ViT from the raw tensors: explicit patches, loops over heads, explicit softmax."""
    p = {k[len("visual."):]: v.double() for k, v in sd.items() if k.startswith("visual.")}
    x, (B, _, S, _) = images.double(), images.shape
    D, _, P, _ = p["conv1.weight"].shape
    g = S // P
    patches = x.reshape(B, 3, g, P, g, P).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * P * P)
    x = patches @ p["conv1.weight"].reshape(D, -1).T
    x = torch.cat([p["class_embedding"].expand(B, 1, D), x], 1) + p["positional_embedding"]

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * p[name + ".weight"] + p[name + ".bias"]

    x, cls, n = ln(x, "ln_pre"), [], 0
    while f"transformer.resblocks.{n}.ln_1.weight" in p:
        b = f"transformer.resblocks.{n}."
        h = ln(x, b + "ln_1")
        if adapter is not None:
            h = adapter(h)
        W, bias = p[b + "attn.in_proj_weight"], p[b + "attn.in_proj_bias"]
        q, k, v = (h @ W[j * D:(j + 1) * D].T + bias[j * D:(j + 1) * D] for j in range(3))
        heads = []
        for i in range(D // 64):
            s = slice(64 * i, 64 * (i + 1))
            a = q[..., s] @ k[..., s].transpose(1, 2) / 8.0
            a = torch.exp(a - a.max(-1, keepdim=True).values)
            heads.append(a / a.sum(-1, keepdim=True) @ v[..., s])
        x = x + torch.cat(heads, -1) @ p[b + "attn.out_proj.weight"].T + p[b + "attn.out_proj.bias"]
        h = ln(x, b + "ln_2") @ p[b + "mlp.c_fc.weight"].T + p[b + "mlp.c_fc.bias"]
        h = h / (1 + torch.exp(-1.702 * h))
        x = x + h @ p[b + "mlp.c_proj.weight"].T + p[b + "mlp.c_proj.bias"]
        n += 1
        if n % every == 0:
            cls.append(x[:, 0])
    return torch.stack(cls, 1), ln(x[:, 0], "ln_post") @ p["proj"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d, sd = tmp_path_factory.mktemp("clip"), openai_state_dict()
    torch.save(sd, d / "plain.pt")
    torch.jit.save(torch.jit.script(Archive(sd)), d / "jit.pt")
    torch.save({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
               | {"logit_scale": sd["logit_scale"], "input_resolution": sd["input_resolution"]}, d / "tower.pt")
    return d, sd


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, RES, RES, generator=torch.Generator().manual_seed(1))


def test_intermediate_cls_and_embedding_match_reference(ckpts, images):
    d, sd = ckpts
    model = clip.load_clip(d / "plain.pt")
    assert (model.width, model.layers, model.heads, model.patch_size, model.resolution) == (128, 4, 2, 8, 32)
    for every in (1, 2, 4):
        out = model(images, every=every)
        assert out.shape == (2, LAYERS // every, WIDTH)
        torch.testing.assert_close(out.double(), reference(sd, images, every)[0], rtol=1e-4, atol=1e-4)
    assert model(images).shape == (2, 1, WIDTH)  # every=4 by default
    torch.testing.assert_close(model.encode_image(images).double(), reference(sd, images)[1], rtol=1e-4, atol=1e-4)


def test_torchscript_plain_and_unprefixed_load_identically(ckpts, images):
    d, _ = ckpts
    models = [clip.load_clip(d / name) for name in ("plain.pt", "jit.pt", "tower.pt")]
    for m in models[1:]:
        assert torch.equal(m(images, every=1), models[0](images, every=1))
        assert torch.equal(m.encode_image(images), models[0].encode_image(images))


def test_torchscript_archive_is_recognised_before_unpickling(ckpts, images, monkeypatch):
    d, _ = ckpts
    want = clip.load_clip(d / "plain.pt").encode_image(images)

    calls = []  # the unpickling fallback would also succeed: record that it was never needed
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or {})
    assert torch.equal(clip.load_clip(d / "jit.pt").encode_image(images), want)
    assert calls == []


def test_loaded_model_is_frozen_eval_and_in_requested_dtype(ckpts, images):
    d, sd = ckpts
    m = clip.load_clip(d / "jit.pt", dtype=torch.bfloat16)
    assert not m.training and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in m.parameters())
    out = m(images, every=2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(sd, images, 2)[0], rtol=0.1, atol=0.15)


@pytest.mark.parametrize("name,width,layers,patch,positions,out", [
    ("B/32", 768, 12, 32, 50, 512), ("B/16", 768, 12, 16, 197, 512),
    ("L/14", 1024, 24, 14, 257, 768), ("L/14@336", 1024, 24, 14, 577, 768)])
def test_build_vit_reads_official_sizes_off_shapes(name, width, layers, patch, positions, out):
    grid = round((positions - 1) ** 0.5)
    sd = openai_state_dict(width, layers, patch, grid * patch, out, device="meta")
    m = clip.build_vit({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")})
    assert (m.width, m.layers, m.heads, m.patch_size, m.resolution, m.output_dim) == (
        width, layers, width // 64, patch, grid * patch, out)
    x = torch.empty(2, 3, grid * patch, grid * patch, device="meta")
    assert m(x).shape == (2, layers // 4, width) and m.encode_image(x).shape == (2, out)


class Scale(nn.Module):
    """A stand-in adapter: a trainable per-channel affine map that counts its calls."""

    def __init__(self, width):
        super().__init__()
        self.w = nn.Parameter(1 + 0.3 * torch.randn(width, generator=torch.Generator().manual_seed(2)))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.w.to(x.dtype) + 0.05


def test_adapter_slot_is_called_before_attention_and_trains(ckpts, images):
    d, sd = ckpts
    model = clip.load_clip(d / "plain.pt")
    plain = model(images, every=1)
    assert all(b.adapter_attn is None for b in model.transformer.resblocks)
    adapters = [Scale(WIDTH) for _ in range(LAYERS)]
    for block, a in zip(model.transformer.resblocks, adapters):
        block.adapter_attn = a
    out = model(images, every=1)
    assert [a.calls for a in adapters] == [1] * LAYERS
    assert not torch.allclose(out, plain, atol=1e-3)
    ref_adapter = lambda h: h * adapters[0].w.detach().double() + 0.05  # noqa: E731 (all share the seed)
    torch.testing.assert_close(out.double(), reference(sd, images, 1, ref_adapter)[0], rtol=1e-4, atol=1e-4)
    assert "transformer.resblocks.0.adapter_attn.w" in model.state_dict()
    out.sum().backward()
    assert all(a.w.grad is not None and a.w.grad.abs().sum() > 0 for a in adapters)
    assert all(p.grad is None for n, p in model.named_parameters() if "adapter_attn" not in n)
    for block in model.transformer.resblocks:
        block.adapter_attn = None
    assert torch.equal(model(images, every=1), plain)


def test_checkpoint_errors_name_the_problem(ckpts, tmp_path):
    _, sd = ckpts
    missing = {k: v for k, v in sd.items() if k != "visual.transformer.resblocks.1.mlp.c_fc.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing.pt.*transformer\.resblocks\.1\.mlp\.c_fc\.bias"):
        clip.load_clip(tmp_path / "missing.pt")
    torch.save(sd | {"visual.transformer.resblocks.0.adapter_attn.conv_A.weight": torch.zeros(8, 128, 1)},
               tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"unexpected keys \['transformer\.resblocks\.0\.adapter_attn\.conv_A"):
        clip.load_clip(tmp_path / "extra.pt")
    torch.save({"tok_embeddings.weight": torch.zeros(4, 4), "norm.weight": torch.zeros(4)}, tmp_path / "llama.pth")
    with pytest.raises(ValueError, match=r"llama.pth is not a CLIP vision tower.*tok_embeddings\.weight"):
        clip.load_clip(tmp_path / "llama.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match=r"tensor.pt holds a Tensor"):
        clip.load_clip(tmp_path / "tensor.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"junk.pt"):
        clip.load_clip(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        clip.load_clip(tmp_path / "nowhere.pt")


def test_wrong_resolution_says_expected_and_given(ckpts):
    model = clip.load_clip(ckpts[0] / "plain.pt")
    with pytest.raises(ValueError, match=r"\(1, 3, 48, 48\).*\(B, 3, 32, 32\).*4x4"):
        model(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model.encode_image(torch.zeros(1, 3, 32, 40))
    with pytest.raises(ValueError, match="every=5"):
        model(torch.zeros(1, 3, 32, 32), every=5)


# ---------------------------------------------------------------- preprocessing

MEANS = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
         "lavin": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def ref_preprocess(rgb: Image.Image, mode: str, R: int = 224) -> np.ndarray:
    """PIL only for the bicubic resize; crop, scaling, normalisation and layout in numpy."""
    w, h = rgb.size
    if mode == "lavin":
        a = np.asarray(rgb.resize((R, R), Image.BICUBIC), dtype=np.float64)
    else:
        short, long = min(w, h), max(w, h)
        size = (R, int(R * long / short)) if w <= h else (int(R * long / short), R)
        a = np.asarray(rgb.resize(size, Image.BICUBIC), dtype=np.float64)
        top, left = int(round((a.shape[0] - R) / 2.0)), int(round((a.shape[1] - R) / 2.0))
        a = a[top:top + R, left:left + R]
    mean, std = MEANS[mode]
    return ((a / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


def pattern(w, h, channels=3, seed=0):
    """A smooth picture plus noise: the resize filter and the crop offsets both matter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = [(xx * 255 // max(w, 1)), (yy * 255 // max(h, 1)), ((xx + yy) * 7) % 256, (xx * 3) % 256][:channels]
    a = np.stack(base, -1) + rng.integers(-20, 21, (h, w, channels))
    return np.clip(a, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["clip", "lavin"])
@pytest.mark.parametrize("size", [(640, 480), (480, 640), (225, 224), (227, 224), (333, 517), (17, 31), (1, 1),
                                  (3, 500), (500, 3), (224, 224)])
def test_preprocess_matches_numpy_reference(mode, size):
    img = Image.fromarray(pattern(*size))
    x = clip.preprocess(img, mode=mode)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), ref_preprocess(img, mode), atol=1e-5)


def test_preprocess_other_resolution_and_path(tmp_path):
    img = Image.fromarray(pattern(300, 200))
    img.save(tmp_path / "a.png")
    x = clip.preprocess(tmp_path / "a.png", resolution=336)
    np.testing.assert_allclose(x.numpy(), ref_preprocess(img, "clip", 336), atol=1e-5)
    np.testing.assert_allclose(clip.preprocess(str(tmp_path / "a.png"), "lavin").numpy(),
                               ref_preprocess(img, "lavin"), atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        clip.preprocess(img, mode="imagenet")


def test_preprocess_large_image():
    a = np.empty((6000, 8000, 3), np.uint8)  # built by broadcasting: pattern() would take seconds here
    a[..., 0], a[..., 1] = (np.arange(8000) % 256)[None], (np.arange(6000) % 251)[:, None]
    a[..., 2] = np.random.default_rng(0).integers(0, 256, (6000, 8000), dtype=np.uint8)
    img = Image.fromarray(a)
    np.testing.assert_allclose(clip.preprocess(img).numpy(), ref_preprocess(img, "clip"), atol=1e-5)


def test_alpha_is_dropped_as_the_official_pipeline_does():
    a = pattern(40, 30, channels=4)
    a[:10, :, 3] = 0  # fully transparent band over arbitrary colours
    rgba = Image.fromarray(a, "RGBA")
    assert np.array_equal(np.asarray(clip.to_rgb(rgba)), a[..., :3])  # = Image.convert("RGB")
    np.testing.assert_allclose(clip.preprocess(rgba, "lavin").numpy(),
                               ref_preprocess(Image.fromarray(a[..., :3]), "lavin"), atol=1e-5)
    p = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "P")
    p.putpalette([10, 20, 30, 200, 0, 0, 0, 0, 0] + [0] * 759)
    p.info["transparency"] = 2
    assert np.asarray(clip.to_rgb(p)).tolist() == [[[10, 20, 30], [200, 0, 0]], [[0, 0, 0], [200, 0, 0]]]


def test_rgba_la_and_transparent_palette_composite_on_a_background():
    a = pattern(40, 30, channels=4)
    a[:10, :, 3] = 0  # fully transparent band over arbitrary colours
    a[10:12, :, 3] = 128
    alpha = a[..., 3:4] / 255.0
    want = np.round(a[..., :3] * alpha + 255 * (1 - alpha))
    rgba = Image.fromarray(a, "RGBA")
    white = (255, 255, 255)
    got = np.asarray(clip.to_rgb(rgba, white), dtype=np.float64)
    assert got.shape == (30, 40, 3) and np.abs(got - want).max() <= 1 and (got[:10] == 255).all()
    np.testing.assert_allclose(clip.preprocess(rgba, "lavin", background=white).numpy(),
                               ref_preprocess(Image.fromarray(want.astype(np.uint8)), "lavin"), atol=0.02)
    la = Image.fromarray(np.stack([a[..., 0], a[..., 3]], -1), "LA")
    want_la = np.round(a[..., 0] * alpha[..., 0] + 255 * (1 - alpha[..., 0]))
    assert np.abs(np.asarray(clip.to_rgb(la, white), dtype=np.float64) - want_la[..., None]).max() <= 1
    p = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "P")
    p.putpalette([10, 20, 30, 200, 0, 0, 0, 0, 0] + [0] * 759)
    p.info["transparency"] = 2  # palette entry 2 (black) is see-through
    assert np.asarray(clip.to_rgb(p, white)).tolist() == [[[10, 20, 30], [200, 0, 0]], [[255, 255, 255], [200, 0, 0]]]


def test_gray_palette_cmyk_modes():
    g = pattern(50, 40, channels=1)[..., 0]
    assert np.array_equal(np.asarray(clip.to_rgb(Image.fromarray(g, "L"))), np.repeat(g[..., None], 3, -1))
    img = Image.fromarray(g, "L")
    np.testing.assert_allclose(clip.preprocess(img).numpy(), ref_preprocess(img.convert("RGB"), "clip"), atol=1e-5)
    pal = np.random.default_rng(0).integers(0, 256, (256, 3), dtype=np.uint8)
    p = Image.fromarray(g, "P")
    p.putpalette(pal.ravel().tolist())
    assert np.array_equal(np.asarray(clip.to_rgb(p)), pal[g])
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), "CMYK")
    assert np.asarray(clip.to_rgb(cmyk)).tolist() == [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]]


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_gray_is_scaled_not_clipped(mode, tmp_path):
    v = np.array([[0, 257, 1000, 32768], [40000, 65535, 65000, 128]], dtype=np.uint16)
    img = Image.fromarray(v.astype(np.int32)).convert(mode) if mode == "I" else Image.frombytes(
        "I;16", (4, 2), v.astype("<u2").tobytes())
    assert img.mode == mode
    want = np.round(v / 257.0).astype(np.uint8)
    assert np.array_equal(np.asarray(clip.to_rgb(img)), np.repeat(want[..., None], 3, -1))
    if mode == "I;16":  # and the same through a 16-bit PNG file (Pillow opens those as I;16)
        img.save(tmp_path / "g16.png")
        assert np.array_equal(np.asarray(clip.load_image(tmp_path / "g16.png"))[..., 0], want)


@pytest.mark.parametrize("orientation,k", [(3, 2), (6, -1), (8, 1)])  # k: np.rot90 turns, negative = clockwise
def test_load_image_applies_exif_orientation(orientation, k, tmp_path):
    a = pattern(24, 16)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "r.png", exif=exif.tobytes())
    assert Image.open(tmp_path / "r.png").getexif()[0x0112] == orientation
    got = clip.load_image(tmp_path / "r.png")
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.rot90(a, k))
    np.testing.assert_allclose(clip.preprocess(tmp_path / "r.png").numpy(),
                               ref_preprocess(Image.fromarray(np.ascontiguousarray(np.rot90(a, k))), "clip"),
                               atol=1e-5)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_or_unreadable_images_name_the_file(fmt, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(pattern(200, 150)).save(buf, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=f"cut.{fmt.lower()}"):
        clip.load_image(path)
    with pytest.raises(ValueError, match=f"cut.{fmt.lower()}"):
        clip.preprocess(path)
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ValueError, match="text.jpg"):
        clip.load_image(tmp_path / "text.jpg")
    with pytest.raises(FileNotFoundError):
        clip.load_image(tmp_path / "absent.jpg")


# ----------------------------------------------------------------------------- Hugging Face's layout

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hugging_face_layout_gives_the_openai_archives_features(tmp_path, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    torch.manual_seed(0)
    vit = clip.VisionTransformer(resolution=32, patch_size=8, width=128, layers=4, output_dim=16).eval()
    torch.save({f"visual.{k}": v for k, v in vit.state_dict().items()}, tmp_path / "openai.pt")
    write_hf_clip(tmp_path / "hf", vit, fmt)
    openai, hf = clip.load_clip(tmp_path / "openai.pt"), clip.load_clip(tmp_path / "hf")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(hf(images, every=2), openai(images, every=2))
        assert torch.equal(hf.encode_image(images), openai.encode_image(images))
        assert torch.equal(hf(images, every=2), vit(images, every=2))


def test_hugging_face_layout_of_another_activation_is_refused(tmp_path):
    vit = clip.VisionTransformer(resolution=32, patch_size=8, width=64, layers=2, output_dim=16)
    write_hf_clip(tmp_path / "hf", vit, "bin", act="gelu")
    with pytest.raises(ValueError, match="hidden_act 'gelu'.*OpenAI's CLIP has quick_gelu"):
        clip.load_clip(tmp_path / "hf")
