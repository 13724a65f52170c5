"""LLaMA's tokenizers, both read from the `tokenizer.model` beside the weights (model.py's loader
finds it and reads the vocabulary size off it), told apart by what the file holds:
    LLaMA-1/2, Vicuna, Mistral  sentencepiece's model (a protobuf): BOS 1, EOS 2, no pad token
    LLaMA-3.x                   tiktoken's BPE ranks, a line `base64(token bytes) rank` per token, then
                                256 special tokens: <|begin_of_text|> (BOS), <|end_of_text|> (EOS), ...
"""
import base64
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
    """LLaMA-3's byte-level BPE from its ranks file, with the interface of Tokenizer. stop_ids:
    every token that ends a reply (<|end_of_text|>, and the chat models' <|eot_id|>, <|eom_id|>)."""

    def __init__(self, path: str | Path):
        try:
            import regex  # Python's re has no \p{L} (letters) or \p{N} (digits) of every script
        except ImportError as e:
            raise ImportError(f"{path} is LLaMA-3's tokenizer: pip install regex to read it") from e
        self.pattern = regex.compile(LLAMA3_PATTERN)
        self.ranks = {}
        for line in Path(path).read_text().splitlines():
            if line:
                token, rank = line.split()
                self.ranks[base64.b64decode(token)] = int(rank)
        self.bytes_of = {rank: token for token, rank in self.ranks.items()}
        base = len(self.ranks)
        unnamed = [i for i in range(256) if i not in LLAMA3_SPECIAL]  # reserved_0, _1, ... in order
        self.special = {base + i: LLAMA3_SPECIAL.get(i) or f"<|reserved_special_token_{unnamed.index(i)}|>"
                        for i in range(256)}
        self.n_words, self.bos_id, self.eos_id = base + 256, base, base + 1
        self.stop_ids = {base + 1, base + 8, base + 9}

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
    base64 and a number, sentencepiece's model is binary."""
    with open(path, "rb") as f:
        head = f.read(200).split(b"\n")[0]
    if re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", head):
        return TiktokenTokenizer(path)
    return Tokenizer(path)


def find_tokenizer(folder: Path) -> Path:
    """Meta ships one tokenizer.model beside the size folders (7B/, 13B/); a copy inside works too."""
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.model in {folder} or its parent {folder.parent}")
