"""LLaMA's tokenizer: Meta's sentencepiece model (`tokenizer.model`), BOS 1, EOS 2, no pad token.
model.py's loader finds it beside the weights and reads the vocabulary size off it."""
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

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))


def find_tokenizer(folder: Path) -> Path:
    """Meta ships one tokenizer.model beside the size folders (7B/, 13B/); a copy inside works too."""
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.model in {folder} or its parent {folder.parent}")
