"""The LaVIN assembly (lavin.py): the inserted tokens, the loss, routing, folding, checkpoints, ablations."""
import argparse
import copy

import pytest
import torch
import torch.nn.functional as F

from adapter import trainable_state_dict
from lavin import IGNORE_INDEX, build_architecture, load_adapters, save_adapters
from router import IMAGE, TEXT
from tests.helpers import PREFIX_IMG, PREFIX_TXT, batch, official_checkpoint, tiny_lavin


def test_lavin_7b_and_13b_trainable_counts_match_the_paper():
    for name, n in (("lavin-7b", 3_781_296), ("lavin-13b", 5_390_080)):  # paper: 3.8M and 5.4M
        model = build_architecture(name)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n
    frozen = sum(p.numel() for p in build_architecture("lavin-7b").parameters() if not p.requires_grad)
    assert frozen == 6_738_415_616 + 303_966_208  # LLaMA-7B + ViT-L/14's vision tower


@pytest.mark.parametrize("name,llama", [("lavin-llama3-8b", 8_030_261_248), ("lavin-mistral-7b", 7_241_732_096)])
def test_todays_backbones_have_their_published_sizes_and_lavin_7bs_trainable_count(name, llama):
    """LLaMA-3.1-8B's and Mistral-7B's published parameter counts (GQA, a 14336-wide FFN, their
    vocabularies); the adapters see only the width and depth (4096 x 32), as in LLaMA-7B."""
    model = build_architecture(name)
    assert sum(p.numel() for p in model.llama.parameters() if not p.requires_grad) == llama
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3_781_296


def test_embed_inserts_prefix_and_visual_tokens_after_bos():
    model = tiny_lavin()
    tokens, images, ind, labels = batch()
    h, new_labels = model.embed(tokens, images, ind, labels)
    emb = model.llama.tok_embeddings
    vis = model.adapter_proj(model.visual(images, 4))  # (B, 2, dim)
    for b in range(3):  # the official per-sample construction
        if ind[b]:
            seq = [emb(tokens[b, :1]), emb(torch.tensor(PREFIX_IMG)), vis[b], emb(tokens[b, 1:])]
            lab = [labels[b, :1], torch.full((5,), IGNORE_INDEX), labels[b, 1:]]
        else:
            seq = [emb(tokens[b, :1]), emb(torch.tensor(PREFIX_TXT)), emb(tokens[b, 1:])]
            lab = [labels[b, :1], torch.full((4,), IGNORE_INDEX), labels[b, 1:]]
        seq, lab = torch.cat(seq), torch.cat(lab)
        assert torch.allclose(h[b, :len(seq)], seq)
        assert torch.equal(new_labels[b, :len(lab)], lab)
        assert (new_labels[b, len(lab):] == IGNORE_INDEX).all()
    assert h.shape[1] == 7 + 5 and (new_labels[1, -1:] == IGNORE_INDEX).all()  # text: 1 padding slot


def test_data_and_model_agree_on_the_ignore_index():
    import data

    assert data.IGNORE_INDEX == IGNORE_INDEX


def test_loss_is_next_token_cross_entropy_on_the_answer():
    model = tiny_lavin()
    tokens, images, ind, labels = batch()
    logits = model(tokens, images, ind).double()
    _, new_labels = model.embed(tokens, images, ind, labels)
    total, n = 0.0, 0
    for b in range(3):
        for t in range(new_labels.shape[1] - 1):
            if new_labels[b, t + 1] != IGNORE_INDEX:  # position t predicts token t + 1
                total -= torch.log_softmax(logits[b, t], -1)[new_labels[b, t + 1]]
                n += 1
    assert n == 3 * 4  # the 4 answer tokens of each sample
    assert abs(model(tokens, images, ind, labels).item() - total.item() / n) < 1e-4


def test_zero_initialised_adapters_leave_the_frozen_model_unchanged():
    model = tiny_lavin(randomize_adapters=False)
    plain_llama = copy.deepcopy(model.llama)
    plain_visual = copy.deepcopy(model.visual)
    for blk in list(plain_llama.layers) + list(plain_visual.transformer.resblocks):
        blk.adapter_attn = None
    tokens, images, ind, _ = batch()
    h, _ = model.embed(tokens, images, ind)
    assert torch.equal(model(tokens, images, ind), plain_llama(embeds=h, pos_offset=1))
    assert torch.equal(model.visual(images), plain_visual(images))


def test_only_the_adapter_side_gets_gradients_and_changes():
    model = tiny_lavin(randomize_adapters=False).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens, images, ind, labels = batch()
    loss = model(tokens, images, ind, labels)
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("adapter" in name), name
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("adapter" in k for k in changed)
    assert any(k.startswith("llama.") for k in changed) and any(k.startswith("visual.") for k in changed)
    assert "adapter_proj.conv_B.weight" in changed and "adapter_modality_embedding.weight" in changed


def test_routes_sum_to_one_and_differ_between_modalities():
    model = tiny_lavin()
    routes = model.routes(torch.tensor([IMAGE, TEXT, IMAGE]), 3, "cpu", torch.float32)
    assert len(routes) == 2
    for w_attn, w_mlp in routes:
        assert w_attn.shape == (3, 1, 2) and w_mlp is None
        assert torch.allclose(w_attn.sum(-1), torch.ones(3, 1))
        assert torch.equal(w_attn[0], w_attn[2]) and not torch.allclose(w_attn[0], w_attn[1])


def test_text_only_logits_do_not_depend_on_images():
    model = tiny_lavin()
    tokens, images, ind, _ = batch()
    a = model(tokens, images, ind)
    b = model(tokens, torch.randn_like(images), ind)
    assert torch.equal(a[1], b[1])  # the text-only sample
    assert not torch.allclose(a[0], b[0])  # an image sample sees its image
    assert torch.allclose(model(tokens[1:2], None, ind[1:2]), a[1:2], atol=1e-5)


@pytest.mark.parametrize("adapter_mlp", [False, True])
def test_fast_modality_path_equals_masked_formulation(adapter_mlp):
    """The official form: m at position 0 of one sequence, masked from every text token, each
    block's routing read off position 0. Written out here with an explicit attention mask."""
    model = tiny_lavin(adapter_mlp=adapter_mlp)
    tokens, images, ind, _ = batch()
    h, _ = model.embed(tokens, images, ind)
    x = torch.cat([model.adapter_modality_embedding(ind)[:, None], h], 1)  # (B, 1 + T, dim)
    T1 = x.shape[1]
    mask = torch.ones(T1, T1).tril().bool()
    mask[1:, 0] = False  # no text token sees the modality token
    from model import rope_angles

    cos, sin = rope_angles(torch.arange(T1), model.llama.args.head_dim, 10000.0)
    for blk in model.llama.layers:
        hn = blk.attention_norm(x)
        hn = blk.adapter_attn(hn, blk.adapter_attn.expert_weights(hn[:, :1]))
        x = x + blk.attention(hn, (cos[None], sin[None]), mask[None, None])
        hn = blk.ffn_norm(x)
        if adapter_mlp:
            hn = blk.adapter_mlp(hn, blk.adapter_mlp.expert_weights(hn[:, :1]))
        x = x + blk.feed_forward(hn)
    want = model.llama.output(model.llama.norm(x))[:, 1:]
    assert (model(tokens, images, ind) - want).abs().max() < 1e-5


@pytest.mark.parametrize("adapter_mlp", [False, True])
def test_folded_model_equals_unfolded(adapter_mlp):
    model = tiny_lavin(adapter_mlp=adapter_mlp)
    tokens, images, ind, _ = batch()
    for modality in (IMAGE, TEXT):
        rows = (ind == modality).nonzero().flatten()
        want = model(tokens[rows], images[rows], ind[rows])
        folded = copy.deepcopy(model).fold(modality)
        assert all(b.adapter_attn is None for b in folded.llama.layers)
        assert (folded(tokens[rows], images[rows], ind[rows]) - want).abs().max() < 1e-4
        with pytest.raises(ValueError, match="folded"):
            folded(tokens, images, ind)


# ------------------------------------------------------------------------------- checkpoints

def test_save_and_load_own_checkpoint(tmp_path):
    model = tiny_lavin(seed=0)
    save_adapters(tmp_path / "ckpt.pth", model, epoch=3)
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert set(ckpt["model"]) == set(trainable_state_dict(model)) and ckpt["epoch"] == 3
    assert ckpt["lavin_args"]["temperature"] == 10.0 and ckpt["llama_args"]["dim"] == 64
    other = tiny_lavin(seed=0)  # the same frozen backbones, other adapter weights
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.normal_()
    assert not torch.equal(other(*batch()[:3]), model(*batch()[:3]))
    load_adapters(other, tmp_path / "ckpt.pth")
    tokens, images, ind, _ = batch()
    assert torch.equal(other(tokens, images, ind), model(tokens, images, ind))


def test_import_official_checkpoint(tmp_path):
    model = tiny_lavin(seed=0)
    ckpt = official_checkpoint(model)
    torch.save(ckpt, tmp_path / "checkpoint-19.pth")
    load_adapters(model, tmp_path / "checkpoint-19.pth")
    # The official adapter, computed as its code does: Conv1d over (B, dim, L), weights from m.
    sd = ckpt["model"]
    p = "module.layers.1.adapter_attn."
    x = torch.randn(2, 5, 64)
    w = torch.softmax((x[:, 0] @ sd[p + "expert_weights.weight"].T + sd[p + "expert_weights.bias"]) / 10.0, -1)
    xt = x.transpose(1, 2)
    h = F.conv1d(xt, sd[p + "conv_A.weight"], sd[p + "conv_A.bias"])
    out = (F.conv1d(h, sd[p + "conv_B.weight"], sd[p + "conv_B.bias"], groups=2) * w[:, 0, None, None]
           + F.conv1d(h, sd[p + "conv_D.weight"], sd[p + "conv_D.bias"], groups=2) * w[:, 1, None, None] + xt)
    ad = model.llama.layers[1].adapter_attn
    assert torch.allclose(ad(x, ad.expert_weights(x[:, :1])), out.transpose(1, 2), atol=1e-4)
    assert torch.equal(model.adapter_modality_embedding.weight, sd["module.adapter_modality_embedding.weight"])
    assert torch.equal(model.visual.transformer.resblocks[7].adapter_attn.conv_B.weight,
                       sd["module.backbone.visual.transformer.resblocks.7.adapter_attn.conv_B.weight"][..., 0])


def test_checkpoint_of_another_size_is_refused_and_nothing_loads(tmp_path):
    model = tiny_lavin(seed=0)
    before = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    ckpt = official_checkpoint(model)
    ckpt["model"]["module.adapter_modality_embedding.weight"] = torch.randn(2, 128)  # a bigger LLaMA's
    torch.save(ckpt, tmp_path / "big.pth")
    with pytest.raises(ValueError, match=r"adapter_modality_embedding.weight has shape \(2, 128\), the model's is \(2, 64\)"):
        load_adapters(model, tmp_path / "big.pth")
    ckpt = official_checkpoint(model, hidden=16,
                               args=argparse.Namespace(adapter_dim=16, temperature=10.0, hidden_proj=128))
    torch.save(ckpt, tmp_path / "dim16.pth")
    with pytest.raises(ValueError, match="adapter_dim=16.*adapter_dim=8"):
        load_adapters(model, tmp_path / "dim16.pth")
    ckpt["args"] = None
    torch.save(ckpt, tmp_path / "dim16_noargs.pth")
    with pytest.raises(ValueError, match=r"conv_A.weight has shape \(16, 64\), the model's is \(8, 64\)"):
        load_adapters(model, tmp_path / "dim16_noargs.pth")
    for k, v in trainable_state_dict(model).items():
        assert torch.equal(v, before[k]), k


def test_fp32_adapters_on_a_half_precision_backbone_without_autocast():
    model = tiny_lavin()
    tokens, images, ind, labels = batch()
    want = model(tokens, images, ind)
    model.llama.to(torch.bfloat16)
    model.visual.to(torch.bfloat16)
    for name, p in model.named_parameters():  # the trainable side stays fp32, as train.py keeps it
        if "adapter" in name:
            p.data = p.data.float()
    got = model(tokens, images, ind)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


def test_image_indicator_without_images_is_refused():
    model = tiny_lavin()
    tokens, _, ind, _ = batch()
    with pytest.raises(ValueError, match="no images were given"):
        model(tokens, None, ind)


def test_fold_in_train_mode_bakes_in_no_dropout():
    model = tiny_lavin().train()
    tokens, images, ind, _ = batch()
    want = copy.deepcopy(model).eval()(tokens[1:2], images[1:2], ind[1:2])
    assert (model.fold(TEXT)(tokens[1:2], images[1:2], ind[1:2]) - want).abs().max() < 1e-4


@pytest.mark.parametrize("change, match", [
    (dict(adapter_type="block"), "adapter_mlp=True"),
    (dict(visual_adapter_type="normal"), "visual_adapter_type='normal'"),
    (dict(adapter_scale=0.1), "adapter_scale=0.1"),
])
def test_official_training_settings_that_do_not_fit_are_refused(tmp_path, change, match):
    model = tiny_lavin()
    ns = argparse.Namespace(adapter_dim=8, temperature=10.0, hidden_proj=128, adapter_type="attn",
                            visual_adapter_type="router", adapter_scale=1.0)
    torch.save(official_checkpoint(model, args=argparse.Namespace(**{**vars(ns), **change})), tmp_path / "c.pth")
    with pytest.raises(ValueError, match=match):
        load_adapters(model, tmp_path / "c.pth")


# ------------------------------------------------------------------------------- gaps a mutation pass found

def test_visual_neck_from_raw_checkpoint_tensors_in_float64(tmp_path):
    """Linear -> SiLU -> Linear, written out from the official tensors (fails with GELU or ReLU)."""
    model = tiny_lavin()
    ckpt = official_checkpoint(model)
    torch.save(ckpt, tmp_path / "checkpoint-19.pth")
    load_adapters(model, tmp_path / "checkpoint-19.pth")
    sd = {k: v.double() for k, v in ckpt["model"].items() if "adapter_proj" in k}
    _, images, ind, _ = batch()
    feats = model.visual(images, 4).double()  # (B, 2, 64): the [CLS] after blocks 4 and 8
    z = feats @ sd["module.adapter_proj.conv_A.weight"].T + sd["module.adapter_proj.conv_A.bias"]
    want = (z / (1 + torch.exp(-z))) @ sd["module.adapter_proj.conv_B.weight"].T + sd["module.adapter_proj.conv_B.bias"]
    assert torch.allclose(model.adapter_proj.double()(feats), want, rtol=0, atol=1e-9)
    model.float()
    tokens = batch()[0]
    h, _ = model.embed(tokens, images, ind)  # the visual tokens sit after BOS and "Image: "
    assert torch.allclose(h[0, 1 + len(PREFIX_IMG):1 + len(PREFIX_IMG) + 2].double(), want[0], atol=1e-4)


def test_no_image_indicator_means_text():
    model = tiny_lavin()
    tokens = batch()[0]
    none = model.routes(None, 3, "cpu", torch.float32)
    text = model.routes(torch.full((3,), TEXT), 3, "cpu", torch.float32)
    image = model.routes(torch.full((3,), IMAGE), 3, "cpu", torch.float32)
    for (a, _), (t, _), (i, _) in zip(none, text, image):
        assert torch.equal(a, t) and not torch.allclose(a, i)
    assert torch.equal(model(tokens), model(tokens, None, torch.full((3,), TEXT)))


def test_official_checkpoint_with_another_router_temperature_is_refused(tmp_path):
    model = tiny_lavin()  # temperature 10, as LaVIN-7B
    ns = argparse.Namespace(adapter_dim=8, temperature=5.0, hidden_proj=128, adapter_type="attn",
                            visual_adapter_type="router", adapter_scale=1.0)  # a 13B run's
    torch.save(official_checkpoint(model, args=ns), tmp_path / "c.pth")
    with pytest.raises(ValueError, match="temperature=5.0.*temperature=10.0"):
        load_adapters(model, tmp_path / "c.pth")


# ------------------------------------------------------------------------------- the ablations

def test_no_router_is_one_adapter_path_for_both_modalities():
    """router=False equals LaVIN whose two up-projections are equal (any routing then mixes the
    same path), and has no conv_D, no routers and no modality embedding to train."""
    plain = tiny_lavin(router=False, adapter_mlp=True)
    both = tiny_lavin(adapter_mlp=True)
    with torch.no_grad():
        for name, p in both.named_parameters():
            if "adapter" not in name:
                continue
            twin = name.replace(".conv_D.", ".conv_B.")
            if ".expert_weights." in name or "modality_embedding" in name:
                p.normal_(0, 1.0)  # any router: its weights sum to one
            else:
                p.copy_(dict(plain.named_parameters())[twin])
    names = [n for n, p in plain.named_parameters() if p.requires_grad]
    assert not [n for n in names if "conv_D" in n or "expert_weights" in n or "modality" in n]
    tokens, images, ind, labels = batch()
    assert torch.allclose(plain(tokens, images, ind), both(tokens, images, ind), atol=1e-5)
    assert torch.allclose(plain(tokens, images, ind, labels), both(tokens, images, ind, labels), atol=1e-6)
    folded, ones = copy.deepcopy(plain).fold(IMAGE), torch.ones_like(ind)  # and it folds too
    assert torch.allclose(folded(tokens, images, ones), plain(tokens, images, ones), atol=1e-4)


def test_no_visual_never_looks_at_the_picture_but_still_routes():
    model = tiny_lavin(visual=False)
    assert model.adapter_proj is None
    assert all(b.adapter_attn is None for b in model.visual.transformer.resblocks)
    assert not [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("visual.")]
    tokens, images, ind, _ = batch()
    out = model(tokens, images, ind)
    assert torch.equal(out, model(tokens, torch.randn_like(images), ind))
    assert torch.equal(out, model(tokens, None, ind))  # no pixels needed
    h, _ = model.embed(tokens, images, ind)  # every sample reads "Image: N/A"
    text, _ = model.embed(tokens)
    assert torch.equal(h, text)
    assert not torch.allclose(out[0], model(tokens, images, torch.zeros_like(ind))[0])  # the router still switches
