"""LLaMA's tokenizers, read from the files beside the weights (model.py's loader finds them and
reads the vocabulary size off them), told apart by what the file holds:
    LLaMA-1/2, Vicuna, Mistral  tokenizer.model, sentencepiece's model (a protobuf): BOS 1, EOS 2, no pad
    LLaMA-3.x, Meta's layout    tokenizer.model, tiktoken's BPE ranks: a line `base64(token bytes) rank`
                                per token, then 256 special tokens: <|begin_of_text|> (BOS), <|end_of_text|>
                                (EOS), ...
    LLaMA-3.x, Hugging Face's   tokenizer.json: the same ranks as a byte-level BPE vocabulary, its
                                special tokens listed as added_tokens
"""
import base64
import json
import re
from pathlib import Path


class Tokenizer:
    """LLaMA's sentencepiece tokenizer: BOS 1, EOS 2, no pad token."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece tokenizer at {path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.n_words, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()
        self.stop_ids = {self.eos_id}  # the tokens that end a reply

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))


# LLaMA-3's pre-tokenisation: contractions, letter runs (with one leading non-letter), 1-3 digits,
# punctuation runs, newlines, other whitespace; each piece is then merged by rank on its own.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The named ones of the 256 special tokens after the ranks (LLaMA-3.1's names; the rest are reserved).
LLAMA3_SPECIAL = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 5: "<|step_id|>",
                  6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
                  10: "<|python_tag|>"}


class TiktokenTokenizer:
    """LLaMA-3's byte-level BPE, with the interface of Tokenizer: ranks (token bytes -> id) and the
    special tokens (id -> name), from read_ranks or read_hf_json. stop_ids: every token that ends a
    reply (<|end_of_text|>, and the chat models' <|eot_id|>, <|eom_id|>)."""

    def __init__(self, ranks: dict[bytes, int], special: dict[int, str], source: str | Path):
        try:
            import regex  # Python's re has no \p{L} (letters) or \p{N} (digits) of every script
        except ImportError as e:
            raise ImportError(f"{source} is LLaMA-3's tokenizer: pip install regex to read it") from e
        self.pattern = regex.compile(LLAMA3_PATTERN)
        self.ranks, self.special = ranks, special
        self.bytes_of = {rank: token for token, rank in ranks.items()}
        named = {name: i for i, name in special.items()}
        for name in ("<|begin_of_text|>", "<|end_of_text|>"):
            if name not in named:
                raise ValueError(f"{source}: no special token {name}, which LLaMA-3's prompts begin and end with")
        self.n_words = max([*self.bytes_of, *special]) + 1
        self.bos_id, self.eos_id = named["<|begin_of_text|>"], named["<|end_of_text|>"]
        self.stop_ids = {named[n] for n in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>") if n in named}

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Special-token names in the text are read as plain text, as Meta's encode does by default."""
        ids = []
        for chunk in chunks(text):
            for piece in self.pattern.findall(chunk):
                ids += self.merge(piece.encode("utf-8"))
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def merge(self, piece: bytes) -> list[int]:
        """BPE: a piece that is a token is one; else, from single bytes, merge the adjacent pair
        whose joined bytes have the lowest rank until no joined pair is a token."""
        if piece in self.ranks:
            return [self.ranks[piece]]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            rank, i = min((self.ranks.get(parts[i] + parts[i + 1], float("inf")), i) for i in range(len(parts) - 1))
            if rank == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.ranks[p] for p in parts]

    def decode(self, ids) -> str:
        out = b"".join(self.bytes_of[i] if i in self.bytes_of else self.special[i].encode() for i in ids)
        return out.decode("utf-8", errors="replace")


def read_ranks(path: Path) -> tuple[dict[bytes, int], dict[int, str]]:
    """Meta's tokenizer.model: the ranks, and the 256 special tokens numbered after them."""
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    base = len(ranks)
    unnamed = [i for i in range(256) if i not in LLAMA3_SPECIAL]  # reserved_0, _1, ... in order
    special = {base + i: LLAMA3_SPECIAL.get(i) or f"<|reserved_special_token_{unnamed.index(i)}|>" for i in range(256)}
    return ranks, special


def byte_symbols() -> dict[str, int]:
    """Byte-level BPE's spelling of bytes as characters (GPT-2's): the printable bytes stand for
    themselves, the other 68 (controls, space, 127-160, 173) for the characters 256, 257, ... in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def read_hf_json(path: Path) -> tuple[dict[bytes, int], dict[int, str]]:
    """Hugging Face's tokenizer.json of LLaMA-3: its vocabulary spells each token's bytes with
    byte_symbols and numbers it by its tiktoken rank, so merging the pair whose join has the
    lowest id is its merges list's order too (HF's converter writes them so; ignore_merges means
    a piece that is a token stays one, as TiktokenTokenizer.merge does)."""
    spec = json.loads(path.read_text())
    model, pre = spec.get("model", {}), json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or json.dumps(LLAMA3_PATTERN)[1:-1] not in pre or not model.get("ignore_merges"):
        raise ValueError(f"{path} is not LLaMA-3's byte-level BPE (model type {model.get('type')!r}, its "
                         f"pre-tokenizer another pattern, or merges not ignored for whole tokens): for "
                         f"sentencepiece models (LLaMA-1/2, Vicuna, Mistral) put their tokenizer.model beside it")
    symbols, special = byte_symbols(), {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    ranks = {bytes(symbols[c] for c in token): i for token, i in model["vocab"].items()}
    return ranks, special


def chunks(text: str, most: int = 400_000, run: int = 25_000):
    """Meta's cut of a long text before encoding: pieces of at most 400k characters, each cut
    again wherever a run of whitespace or of non-whitespace passes 25k characters (the regex would
    otherwise take quadratic time on it)."""
    for start in range(0, max(len(text), 1), most):
        part, begin, length, space = text[start:start + most], 0, 0, None
        for i, c in enumerate(part):
            if c.isspace() != space:
                space, length = c.isspace(), 0
            length += 1
            if length > run:
                yield part[begin:i]
                begin, length = i, 1
        yield part[begin:]


def load_tokenizer(path: str | Path):
    """Tokenizer or TiktokenTokenizer, as the file at path holds: LLaMA-3's ranks are text lines of
    base64 and a number, sentencepiece's model is binary, tokenizer.json is Hugging Face's."""
    path = Path(path)
    if path.suffix == ".json":
        return TiktokenTokenizer(*read_hf_json(path), path)
    with open(path, "rb") as f:
        head = f.read(200).split(b"\n")[0]
    if re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", head):
        return TiktokenTokenizer(*read_ranks(path), path)
    return Tokenizer(path)


def find_tokenizer(folder: Path) -> Path:
    """tokenizer.model in the folder, else Hugging Face's tokenizer.json there, else Meta's one
    tokenizer.model beside the size folders (llama/tokenizer.model next to llama/7B/)."""
    for candidate in (folder / "tokenizer.model", folder / "tokenizer.json", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {folder}, nor tokenizer.model in its parent "
                            f"{folder.parent}")
