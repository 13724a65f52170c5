"""LLaMA in model.py: numerics against a float64 reference, KV cache, loading both layouts, errors."""
import dataclasses
import json
import math

import pytest
import torch

from model import KVCache, Llama, ModelArgs, Tokenizer, apply_rope, load_llama, rope_angles
from tests.formats import write_hf, write_meta
from tests.helpers import edit_json, random_state, tiny_args


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():  # a fixture, not a global switch: other test files train
        yield


def reference_logits(state, args, tokens, pos_offset=0):
    """Naive float64 LLaMA: loops over samples and heads, Meta's complex-number RoPE."""
    sd = {k: v.double() for k, v in state.items()}
    hd, nh, nkv = args.dim // args.n_heads, args.n_heads, args.kv_heads

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + args.norm_eps) * w

    def rotate(x, t):  # x (hd,) at position t, pairs (0,1), (2,3), ...
        freqs = 1.0 / args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        if args.use_scaled_rope:
            freqs = torch.tensor([llama31_frequency(f.item(), args) for f in freqs], dtype=torch.float64)
        z = torch.view_as_complex(x.reshape(hd // 2, 2).contiguous()) * torch.polar(
            torch.ones(hd // 2, dtype=torch.float64), t * freqs)
        return torch.view_as_real(z).reshape(hd)

    out = []
    for seq in tokens:
        T = len(seq)
        x = sd["tok_embeddings.weight"][seq]
        for i in range(args.n_layers):
            p = f"layers.{i}."
            h = rms(x, sd[p + "attention_norm.weight"])
            q, k, v = (h @ sd[p + f"attention.{n}.weight"].T for n in ("wq", "wk", "wv"))
            heads = []
            for head in range(nh):
                g = head // (nh // nkv)  # the key/value head this query head shares
                qh = torch.stack([rotate(q[t, head * hd:(head + 1) * hd], t + pos_offset) for t in range(T)])
                kh = torch.stack([rotate(k[t, g * hd:(g + 1) * hd], t + pos_offset) for t in range(T)])
                vh = v[:, g * hd:(g + 1) * hd]
                o = torch.zeros(T, hd, dtype=torch.float64)
                for t in range(T):
                    s = torch.tensor([qh[t] @ kh[j] / math.sqrt(hd) for j in range(t + 1)])
                    w = torch.exp(s - s.max())
                    o[t] = (w / w.sum()) @ vh[: t + 1]
                heads.append(o)
            x = x + torch.cat(heads, 1) @ sd[p + "attention.wo.weight"].T
            h = rms(x, sd[p + "ffn_norm.weight"])
            a, b = h @ sd[p + "feed_forward.w1.weight"].T, h @ sd[p + "feed_forward.w3.weight"].T
            x = x + (a / (1 + torch.exp(-a)) * b) @ sd[p + "feed_forward.w2.weight"].T
        out.append(rms(x, sd["norm.weight"]) @ sd["output.weight"].T)
    return torch.stack(out)


def llama31_frequency(f: float, args) -> float:
    """One RoPE frequency as LLaMA-3.1 scales it, case by case."""
    wavelength, context = 2 * math.pi / f, args.rope_original_context
    if wavelength < context / args.rope_high_freq_factor:
        return f
    if wavelength > context / args.rope_low_freq_factor:
        return f / args.rope_scaling_factor
    s = (context / wavelength - args.rope_low_freq_factor) / (args.rope_high_freq_factor - args.rope_low_freq_factor)
    return (1 - s) * f / args.rope_scaling_factor + s * f


def model_from(args, state):
    m = Llama(args)
    m.load_state_dict(state)
    return m.eval()


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_logits_match_float64_reference(n_kv_heads):
    args = tiny_args(n_kv_heads=n_kv_heads)
    state = random_state(args)
    tokens = torch.randint(0, args.vocab_size, (2, 9))
    got = model_from(args, state)(tokens).double()
    want = reference_logits(state, args, tokens)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_llama31_logits_match_float64_reference():
    """LLaMA-3.1's shape in small: grouped-query attention, rope_theta 500000 and RoPE scaling
    (head_dim 16: of its 8 frequencies, 3 are kept, 4 divided by the factor and 1 moved between at
    an original context of 1024)."""
    args = tiny_args(n_kv_heads=2, rope_theta=500000.0, use_scaled_rope=True, rope_original_context=1024)
    state = random_state(args)
    tokens = torch.randint(0, args.vocab_size, (2, 7))
    got = model_from(args, state)(tokens).double()
    want = reference_logits(state, args, tokens)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    plain = reference_logits(state, dataclasses.replace(args, use_scaled_rope=False), tokens)
    assert (plain - want).abs().max() > 1e-3 * want.abs().max()  # the scaling changes the logits 10x more
    inv = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    kept = [llama31_frequency(f.item(), args) == f.item() for f in inv]
    divided = [abs(llama31_frequency(f.item(), args) - f.item() / 8) < 1e-18 for f in inv]
    assert sum(kept) == 3 and sum(divided) == 4


def test_rope_rotates_adjacent_pairs_at_absolute_positions():
    # Attention scores only see relative positions, so check the rotation itself, far out too.
    x = torch.randn(1, 3, 2, 16)  # (B, T, H, hd)
    positions = torch.tensor([0, 7, 1500])
    cos, sin = rope_angles(positions, 16, 10000.0)
    got = apply_rope(x, cos[None], sin[None]).double()
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    for t, p in enumerate(positions.tolist()):
        z = torch.view_as_complex(x[0, t].double().reshape(2, 8, 2)) * torch.polar(
            torch.ones(8, dtype=torch.float64), p * freqs)
        assert (got[0, t] - torch.view_as_real(z).reshape(2, 16)).abs().max() < 1e-4


def test_ffn_width_follows_meta_rounding():
    assert ModelArgs(dim=4096, multiple_of=256).ffn_hidden == 11008  # LLaMA-7B
    assert ModelArgs(dim=5120, multiple_of=256).ffn_hidden == 13824  # LLaMA-13B
    assert ModelArgs(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3).ffn_hidden == 28672  # LLaMA-2-70B


def test_meta_one_and_two_shards_and_hf_give_identical_logits(tmp_path, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    args = tiny_args(vocab_size=tok.n_words)
    state = random_state(args)
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32, norm_eps=1e-5)
    # The tokenizer sits in the parent folder, as in Meta's release (llama/tokenizer.model, llama/7B/).
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    write_meta(tmp_path / "one", params, state, 1, extra={"rope.freqs": torch.ones(8)})
    write_meta(tmp_path / "two", params, state, 2)
    write_hf(tmp_path / "hf", args, state)
    (tmp_path / "hf" / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    tokens = torch.tensor([tok.encode("The quick brown fox", bos=True, eos=False)])
    logits = []
    for name in ("one", "two", "hf"):
        model, t = load_llama(tmp_path / name)
        assert model.args.vocab_size == tok.n_words and t.n_words == tok.n_words
        logits.append(model(tokens))
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    want = reference_logits(state, args, tokens)
    assert (logits[0].double() - want).abs().max() < 1e-4 * want.abs().max()


def test_llama31_rope_scaling_reads_from_both_layouts(tmp_path, tokenizer_path):
    """params.json's use_scaled_rope and config.json's rope_scaling (as LLaMA-3.1-8B's files state
    them) give the same model; another kind of scaling is one error naming it."""
    tok = Tokenizer(tokenizer_path)
    args = tiny_args(vocab_size=tok.n_words, n_kv_heads=2, rope_theta=500000.0, use_scaled_rope=True)
    state = random_state(args)
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32, norm_eps=1e-5,
                  rope_theta=500000.0, use_scaled_rope=True)
    write_meta(tmp_path / "meta", params, state)
    write_hf(tmp_path / "hf", args, state)
    (tmp_path / "hf" / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
              "rope_type": "llama3"}
    edit_json(tmp_path / "hf" / "config.json", lambda c: c.update(rope_theta=500000.0, rope_scaling=llama3))
    meta, _ = load_llama(tmp_path / "meta")
    hf, _ = load_llama(tmp_path / "hf")
    assert meta.args.rope_scaling == hf.args.rope_scaling == (8.0, 1.0, 4.0, 8192)
    tokens = torch.randint(0, args.vocab_size, (1, 6))
    assert torch.equal(meta(tokens), hf(tokens))
    edit_json(tmp_path / "hf" / "config.json", lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="rope_scaling of type 'yarn'; this LLaMA reads LLaMA-3.1's"):
        load_llama(tmp_path / "hf")


def test_mistral_in_hugging_faces_layout(tmp_path, tokenizer_path):
    """Mistral-7B's config.json in small (model_type mistral, GQA, rope_theta 1e6, a sliding window):
    the float64 reference's logits while max_seq_len stays within the window, one error past it;
    another model_type is refused by name."""
    args = tiny_args(vocab_size=Tokenizer(tokenizer_path).n_words, n_kv_heads=2, rope_theta=1e6)
    state = random_state(args)
    write_hf(tmp_path, args, state)
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    edit_json(tmp_path / "config.json", lambda c: c.update(model_type="mistral", architectures=["MistralForCausalLM"],
                                                           rope_theta=1e6, sliding_window=64))
    model, _ = load_llama(tmp_path, max_seq_len=64)
    assert model.args.sliding_window == 64 and model.args.rope_theta == 1e6 and model.args.kv_heads == 2
    tokens = torch.randint(0, args.vocab_size, (2, 8))
    want = reference_logits(state, args, tokens)
    assert (model(tokens).double() - want).abs().max() < 1e-4 * want.abs().max()
    with pytest.raises(ValueError, match="reaches back 64 positions .* max_seq_len 128 would attend past them"):
        load_llama(tmp_path, max_seq_len=128)
    edit_json(tmp_path / "config.json", lambda c: c.update(model_type="qwen2"))
    with pytest.raises(ValueError, match="model_type 'qwen2'; this LLaMA reads LLaMA's and Mistral's"):
        load_llama(tmp_path, max_seq_len=64)


def test_llama32_output_head_is_the_embedding(tmp_path, tokenizer_path):
    """config.json's tie_word_embeddings (LLaMA-3.2-1B/3B: the files hold no lm_head.weight): the
    float64 reference with the embedding as the head, one matrix in the model; untied, a file
    without the head is still one error naming it."""
    args = tiny_args(vocab_size=Tokenizer(tokenizer_path).n_words, n_kv_heads=2, rope_theta=500000.0)
    state = random_state(args)
    state["output.weight"] = state["tok_embeddings.weight"]
    write_hf(tmp_path, args, {k: v for k, v in state.items() if k != "output.weight"})
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    edit_json(tmp_path / "config.json", lambda c: c.update(tie_word_embeddings=True))
    model, _ = load_llama(tmp_path)
    assert model.output.weight is model.tok_embeddings.weight
    tokens = torch.randint(0, args.vocab_size, (2, 6))
    want = reference_logits(state, args, tokens)
    assert (model(tokens).double() - want).abs().max() < 1e-4 * want.abs().max()
    edit_json(tmp_path / "config.json", lambda c: c.update(tie_word_embeddings=False))
    with pytest.raises(KeyError, match=r"missing keys \['output.weight'\]"):
        load_llama(tmp_path)


def test_llama32_small_sizes_in_metas_layout_take_factor_32_and_a_tied_head(tmp_path):
    """Meta's params.json of LLaMA-3.2-1B states neither: read_meta knows the two sizes by their shape."""
    from llama_files import read_meta

    params = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.5,
                  multiple_of=256, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
    write_meta(tmp_path / "1B", params, {"tok_embeddings.weight": torch.zeros(4, 2)})
    got, _ = read_meta(tmp_path / "1B")
    assert (got["rope_scaling_factor"], got["tie_word_embeddings"]) == (32.0, True)
    assert ModelArgs.from_params(got).rope_scaling == (32.0, 1.0, 4.0, 8192)
    write_meta(tmp_path / "8B", dict(params, dim=4096, n_layers=32), {"tok_embeddings.weight": torch.zeros(4, 2)})
    got, _ = read_meta(tmp_path / "8B")  # LLaMA-3.1-8B: factor 8, its own head
    assert "rope_scaling_factor" not in got and "tie_word_embeddings" not in got
    assert ModelArgs.from_params(got).rope_scaling == (8.0, 1.0, 4.0, 8192)


def test_hf_safetensors(tmp_path, tokenizer_path):
    pytest.importorskip("safetensors")
    args = tiny_args(vocab_size=Tokenizer(tokenizer_path).n_words)
    state = random_state(args)
    write_hf(tmp_path, args, state, fmt="safetensors")
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    model, _ = load_llama(tmp_path)
    tokens = torch.randint(0, args.vocab_size, (1, 5))
    assert torch.equal(model(tokens), model_from(args, state)(tokens))


def test_load_in_requested_dtype(tmp_path, tokenizer_path):
    args = tiny_args(vocab_size=Tokenizer(tokenizer_path).n_words)
    write_meta(tmp_path, dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=args.vocab_size,
                              multiple_of=32, norm_eps=1e-5), random_state(args))
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    model, _ = load_llama(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def test_cached_decoding_equals_full_forward():
    args = tiny_args()
    model = model_from(args, random_state(args))
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    full = model(tokens, pos_offset=1)
    cache = KVCache(args, batch=2, max_len=16)
    steps = [model(tokens[:, :5], cache=cache, pos_offset=1)]  # prefill
    steps.append(model(tokens[:, 5:8], cache=cache, pos_offset=1))  # a chunk after the prefill
    steps += [model(tokens[:, t:t + 1], cache=cache, pos_offset=1) for t in range(8, 12)]  # decode
    assert cache.len == 12
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_left_padded_batch_of_different_lengths():
    args = tiny_args()
    model = model_from(args, random_state(args))
    a = torch.randint(3, args.vocab_size, (1, 9))
    b = torch.randint(3, args.vocab_size, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])  # b left-padded
    cache = KVCache(args, batch=2, max_len=14, pad=[0, 5])
    prefill = model(batch, cache=cache, pos_offset=1)
    nxt = torch.randint(3, args.vocab_size, (2, 3))
    steps = [model(nxt[:, t:t + 1], cache=cache, pos_offset=1) for t in range(3)]
    assert torch.isfinite(prefill).all()
    want_a = model(torch.cat([a, nxt[:1]], 1), pos_offset=1)
    want_b = model(torch.cat([b, nxt[1:]], 1), pos_offset=1)
    got = torch.cat([prefill[:, -1:]] + steps, 1)
    assert (got[0] - want_a[0, -4:]).abs().max() < 1e-5
    assert (got[1] - want_b[0, -4:]).abs().max() < 1e-5
    assert (prefill[1, 5:] - want_b[0, :4]).abs().max() < 1e-5


def test_decode_step_equals_forward_steps():
    """decode_step, every shape fixed (for CUDA graphs), gives forward's logits: a left-padded
    batch, and garbage in the slots no step has written yet (a reused cache)."""
    args = tiny_args()
    model = model_from(args, random_state(args))
    a = torch.randint(3, args.vocab_size, (1, 9))
    b = torch.randint(3, args.vocab_size, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])  # b left-padded
    nxt = torch.randint(3, args.vocab_size, (2, 3))
    cache = KVCache(args, batch=2, max_len=16, pad=[0, 5])
    model(batch, cache=cache, pos_offset=1)
    want = [model(nxt[:, t:t + 1], cache=cache, pos_offset=1)[:, -1] for t in range(3)]
    cache = KVCache(args, batch=2, max_len=16, pad=[0, 5])
    for t in cache.k + cache.v:
        t.normal_(0, 10)  # what an earlier batch left: decode_step sees every slot, the mask must hide it
    model(batch, cache=cache, pos_offset=1)
    before = [k.clone() for k in cache.k]
    got = []
    for t in range(3):
        got.append(model.decode_step(model.tok_embeddings(nxt[:, t:t + 1]), cache, torch.tensor([cache.len]),
                                     pos_offset=1))
        cache.len += 1
    assert (torch.stack(got) - torch.stack(want)).abs().max() < 1e-5
    for k, k0 in zip(cache.k, before):  # each step wrote its own slot and no other
        assert torch.equal(k[:, :, :9], k0[:, :, :9]) and torch.equal(k[:, :, 12:], k0[:, :, 12:])
        assert not (k[:, :, 9:12] == k0[:, :, 9:12]).all(-1).any()


def test_route_runs_single_tokens_without_rope():
    args = tiny_args()
    model = model_from(args, random_state(args))
    m = torch.randn(3, 1, args.dim)
    routes = model.route(m)
    assert routes == [(None, None)] * args.n_layers  # a plain LLaMA has no routers


def test_tokenizer(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ids = tok.encode("The quick brown fox", bos=True, eos=True)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2
    assert tok.decode(ids[1:-1]) == "The quick brown fox"
    assert tok.encode("fox", bos=False, eos=False)[0] not in (1, 2)
    assert tok.n_words == 320


# ------------------------------------------------------------------------------------ bad input

PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32, norm_eps=1e-5)


@pytest.fixture
def meta_dir(tmp_path, tokenizer_path):
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    return tmp_path


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no LLaMA checkpoint folder"):
        load_llama(tmp_path / "nope")


def test_empty_folder_names_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json.*config.json.*: it holds nothing$"):
        load_llama(tmp_path)
    for name in ("model.gguf", "tokenizer.json"):  # a format it does not read: named, with what is there
        (tmp_path / name).write_text("")
    with pytest.raises(FileNotFoundError, match=r"config.json \+ pytorch_model\*.bin or \*.safetensors\): it holds "
                                                r"model.gguf, tokenizer.json$"):
        load_llama(tmp_path)


def test_params_without_shards(meta_dir):
    (meta_dir / "params.json").write_text(json.dumps(PARAMS))
    with pytest.raises(FileNotFoundError, match="no consolidated"):
        load_llama(meta_dir)


def test_missing_tokenizer(tmp_path):
    write_meta(tmp_path / "7B", PARAMS, random_state(tiny_args()))
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_llama(tmp_path / "7B")


def test_shape_mismatch_names_key_and_shapes(meta_dir):
    write_meta(meta_dir, {**PARAMS, "dim": 128}, random_state(tiny_args()))
    with pytest.raises(ValueError, match=r"tok_embeddings.weight has shape \(320, 64\), the model\'s is \(320, 128\)"):
        load_llama(meta_dir)


def test_missing_and_unexpected_keys(meta_dir):
    state = random_state(tiny_args())
    state.pop("layers.1.ffn_norm.weight")
    state["layers.0.attention.bias"] = torch.zeros(3)
    write_meta(meta_dir, PARAMS, state)
    with pytest.raises(KeyError, match=r"missing keys \['layers.1.ffn_norm.weight'\].*unexpected keys \['layers.0.attention.bias'\]"):
        load_llama(meta_dir)


def test_unknown_params_key(meta_dir):
    write_meta(meta_dir, {**PARAMS, "moe_args": {"num_experts": 16}}, random_state(tiny_args()))  # LLaMA-4's
    with pytest.raises(ValueError, match=r"keys this LLaMA does not know: \['moe_args'\]"):
        load_llama(meta_dir)


def test_shards_that_disagree(meta_dir):
    write_meta(meta_dir, PARAMS, random_state(tiny_args()), n_shards=2)
    shard = torch.load(meta_dir / "consolidated.01.pth")
    shard["norm.weight"] = shard["norm.weight"] + 1  # a copied norm that differs
    torch.save(shard, meta_dir / "consolidated.01.pth")
    with pytest.raises(ValueError, match="shards disagree on norm.weight"):
        load_llama(meta_dir)
    shard.pop("output.weight")
    torch.save(shard, meta_dir / "consolidated.01.pth")
    with pytest.raises(ValueError, match="shards disagree.*output.weight"):
        load_llama(meta_dir)


def test_kv_cache_overflow():
    args = tiny_args()
    model = model_from(args, random_state(args))
    cache = KVCache(args, batch=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
