"""tokenizer.py's LLaMA-3 tokenizer (tiktoken's ranks file) against a BPE written here, and against
tiktoken itself where it is installed, on a ranks file trained here from a small corpus."""
import base64
import json

import pytest
import torch

import tokenizer
from model import load_llama
from tests.formats import LLAMA3_PATTERN, train_ranks, write_hf, write_meta, write_tokenizer_json
from tests.helpers import random_state, tiny_args

regex = pytest.importorskip("regex")

TRAIN = ("The cat's toy isn't here; they'll say we've 12345 apples and 7 pears.\n\n  Indented   text\tand tabs. "
         "Café au lait, naïve façade, Übermäßig große Straße, 東京は日本の首都です。 Привет, мир! 😀 emoji "
         "I'm you're he'd THEY'LL We'VE 3.14159 2024-12-07 $100,000 #hashtag @user http://x.y/z?a=1 ") * 3
CORPUS = ["Hello world", "It's 2026, isn't it?", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n\n",
          "Ünïcödé façade, 東京の猫 😀👍", "numbers 1234567 and 3.5e10", "CONTRACTIONS: I'M, WE'LL, THEY'D",
          "a" * 50 + " " * 20 + "b", "<|eot_id|> is text here", "", "x\n\n\n   \n y", "中文,標點。混合abc123",
          "DON'TWORRY, 'VEry 'LLama HE'SOK"]  # upper-case contractions glued to letters: the (?i)


def reference_encode(text: str, ranks: dict) -> list[int]:
    """Classic BPE: the merges applied in the order they were learned, each over the whole piece."""
    merges = sorted((r, t) for t, r in ranks.items() if len(t) > 1)
    ids = []
    for piece in regex.findall(LLAMA3_PATTERN, text):
        b = piece.encode()
        if b in ranks:  # tiktoken and Meta take a piece that is a token whole
            ids.append(ranks[b])
            continue
        parts = [b[i:i + 1] for i in range(len(b))]
        for _, token in merges:
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] + parts[i + 1] == token:
                    out.append(token)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        ids += [ranks[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def ranks_file(tmp_path_factory):
    ranks = train_ranks(TRAIN)
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("".join(lines))  # as Meta ships it: a line per token, in rank order
    return path, ranks


def test_llama3_tokenizer_equals_an_independent_bpe_and_round_trips(ranks_file):
    path, ranks = ranks_file
    tok = tokenizer.load_tokenizer(path)
    assert isinstance(tok, tokenizer.TiktokenTokenizer)
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (len(ranks) + 256, len(ranks), len(ranks) + 1)
    assert len(ranks) > 400  # merges were learned: the pieces are more than bytes
    for text in CORPUS + [TRAIN]:
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == reference_encode(text, ranks), text
        assert tok.decode(ids) == text
    ids = tok.encode("hi", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode([len(ranks) + 9]) == "<|eot_id|>" and len(ranks) + 9 in tok.stop_ids
    assert tok.decode([len(ranks) + 2, len(ranks) + 11, len(ranks) + 255]) == \
        "<|reserved_special_token_0|><|reserved_special_token_2|><|reserved_special_token_246|>"  # Meta's names


def test_llama3_tokenizer_equals_tiktoken(ranks_file):
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken (Meta's reference) is not installed")
    path, ranks = ranks_file
    special = {f"<|reserved_special_token_{i}|>": len(ranks) + i for i in range(256)}
    enc = tiktoken.Encoding(name="tiny-llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    tok = tokenizer.load_tokenizer(path)
    for text in CORPUS + [TRAIN]:
        assert tok.encode(text, bos=False, eos=False) == enc.encode(text, disallowed_special=()), text


def test_pre_tokenisation_splits_as_llama3_does(ranks_file):
    """The pieces, written out by hand: contractions of any case, one leading space or mark joined
    to letters, digits in threes, a space left before the next word, newlines with their spaces."""
    tok = tokenizer.load_tokenizer(ranks_file[0])
    assert tok.pattern.findall("DON'TWORRY, it's 2026!") == \
        ["DON", "'T", "WORRY", ",", " it", "'s", " ", "202", "6", "!"]
    assert tok.pattern.findall("  hi  \n\n x") == [" ", " hi", "  \n\n", " x"]
    assert tok.pattern.findall("Café東京123456") == ["Café東京", "123", "456"]


def test_long_runs_are_cut_as_meta_cuts_them():
    assert [len(c) for c in tokenizer.chunks(" " * 60_000)] == [25_000, 25_000, 10_000]
    assert [len(c) for c in tokenizer.chunks("ab " * 10)] == [30]
    assert list(tokenizer.chunks("")) == [""]


def test_load_llama_takes_the_llama3_tokenizer_from_its_file(ranks_file, tmp_path):
    path, ranks = ranks_file
    folder = tmp_path / "llama3"
    args = tiny_args(vocab_size=len(ranks) + 256, n_kv_heads=2, rope_theta=500000.0, use_scaled_rope=True)
    write_meta(folder, dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(ranks) + 256, multiple_of=32,
                            norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True), random_state(args))
    (folder / "tokenizer.model").write_bytes(path.read_bytes())
    model, tok = load_llama(folder)
    assert isinstance(tok, tokenizer.TiktokenTokenizer) and model.args.vocab_size == tok.n_words
    ids = torch.tensor([tok.encode("Café 東京 it's", bos=True, eos=False)])
    assert model(ids).shape == (1, ids.shape[1], tok.n_words)


@pytest.fixture(scope="module")
def tokenizer_json(ranks_file, tmp_path_factory):
    _, ranks = ranks_file
    base = len(ranks)
    special = {base + i: f"<|reserved_special_token_{i}|>" for i in range(256)}
    special.update({base: "<|begin_of_text|>", base + 1: "<|end_of_text|>", base + 9: "<|eot_id|>"})
    return write_tokenizer_json(tmp_path_factory.mktemp("hf") / "tokenizer.json", ranks, special)


def test_hugging_faces_tokenizer_json_reads_as_the_ranks_file(ranks_file, tokenizer_json):
    """The same vocabulary in Hugging Face's tokenizer.json gives the same ids and the same special
    tokens, their names read from the file (this one names no <|eom_id|>: no such stop)."""
    meta, hf = tokenizer.load_tokenizer(ranks_file[0]), tokenizer.load_tokenizer(tokenizer_json)
    assert isinstance(hf, tokenizer.TiktokenTokenizer)
    base = len(ranks_file[1])
    assert (hf.n_words, hf.bos_id, hf.eos_id) == (meta.n_words, meta.bos_id, meta.eos_id)
    assert hf.stop_ids == {base + 1, base + 9} and meta.stop_ids == {base + 1, base + 8, base + 9}
    assert hf.decode([base + 8]) == "<|reserved_special_token_8|>"
    for text in CORPUS + [TRAIN]:
        ids = hf.encode(text, bos=True, eos=True)
        assert ids == meta.encode(text, bos=True, eos=True), text
        assert hf.decode(ids[1:-1]) == text


def test_hugging_faces_tokenizers_library_agrees(ranks_file, tokenizer_json):
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face's tokenizers is not installed")
    theirs = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    ours = tokenizer.load_tokenizer(tokenizer_json)
    for text in CORPUS + [TRAIN]:
        if "<|" in text:  # HF reads a special token's name in the text as that token; Meta's encode as text
            continue
        assert ours.encode(text, bos=False, eos=False) == theirs.encode(text, add_special_tokens=False).ids, text


def test_tokenizer_json_that_transformers_converts_from_the_ranks_file(ranks_file, tmp_path):
    """transformers' own converter (TikTokenConverter, as for LLaMA-3) writes the tokenizer.json read here."""
    pytest.importorskip("tiktoken", reason="tiktoken is not installed (transformers' converter reads the ranks with it)")
    convert = pytest.importorskip("transformers.convert_slow_tokenizer", reason="transformers is not installed")
    path, ranks = ranks_file
    names = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 256)]
    convert.TikTokenConverter(vocab_file=str(path), extra_special_tokens=names).converted().save(
        str(tmp_path / "tokenizer.json"))
    hf, meta = tokenizer.load_tokenizer(tmp_path / "tokenizer.json"), tokenizer.load_tokenizer(path)
    assert (hf.n_words, hf.bos_id, hf.eos_id) == (meta.n_words, meta.bos_id, meta.eos_id)
    for text in CORPUS + [TRAIN]:
        assert hf.encode(text, bos=False, eos=False) == meta.encode(text, bos=False, eos=False), text


def test_a_tokenizer_json_of_another_kind_is_refused(tmp_path):
    """Mistral's and Vicuna's tokenizer.json is sentencepiece's BPE (Metaspace, byte fallback)."""
    spec = {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"},
            "model": {"type": "BPE", "byte_fallback": True, "vocab": {"<unk>": 0}, "merges": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="is not LLaMA-3's byte-level BPE .* put their tokenizer.model beside it"):
        tokenizer.load_tokenizer(tmp_path / "tokenizer.json")


def test_load_llama_reads_hugging_faces_llama3_folder(ranks_file, tokenizer_json, tmp_path):
    """config.json, the weights and tokenizer.json only (no tokenizer.model): the LLaMA-3 tokenizer,
    and the model's vocabulary as config.json states it."""
    _, ranks = ranks_file
    args = tiny_args(vocab_size=len(ranks) + 256, n_kv_heads=2, rope_theta=500000.0)
    write_hf(tmp_path, args, random_state(args))
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    model, tok = load_llama(tmp_path)
    assert isinstance(tok, tokenizer.TiktokenTokenizer) and model.args.vocab_size == tok.n_words == len(ranks) + 256
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json in"):
        load_llama(tmp_path)
