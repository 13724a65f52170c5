"""Tokenisation, loss masking, padding and length-grouped batching, shared by every dataset.

LaVIN trains with the plain next-token loss on the answer only (paper, section 3,
"Mixture-of-Modality Training"); image and text-only samples share one batch and a per-sample
indicator picks the modality token. The dataset modules (scienceqa.py, instruct.py, coco.py)
turn their files into `Sample`s; everything after that lives here:

    Sample(pid, turns=((prompt, target), ...), image=path | None)
        │  encode_turns: per turn tokenizer.encode(prompt + target, bos=first turn, eos=True),
        │                the prompt's positions -> IGNORE_INDEX; cut to max_seq_len - reserve
        ▼
    TokenizedDataset[i] = {"pid": str, "tokens": (T,) long, "labels": (T,) long,
                           "image": (3, R, R) float | None}
        │  LengthGroupedBatchSampler: per-rank index batches of similar length
        ▼
    Collator(items) -> batch dict:
        tokens         (B, T) long    BOS prompt target EOS, right-padded with PAD_ID to the
                                      longest sample of the batch (not to a fixed length)
        labels         (B, T) long    aligned with tokens (labels[i] = tokens[i] on target
                                      positions; the model shifts), IGNORE_INDEX on prompt and pad
        images         (B, 3, R, R)   preprocessed image, zeros for a text-only sample
        img_indicator  (B,) long      1 = the sample has an image, 0 = text only
        lengths        (B,) long      unpadded length of each sample
        pids           list[str]

Usage (train.py): DataLoader(ds, batch_sampler=LengthGroupedBatchSampler(ds.lengths, ...),
collate_fn=ds.collate).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

IGNORE_INDEX = -100  # labels with this value carry no loss (torch's cross_entropy default)
PAD_ID = 0  # LLaMA has no pad token; 0 (<unk>) never carries loss, so any id would do


@dataclass(frozen=True)
class Sample:
    """One training example before tokenisation.

    turns: (prompt, target) pairs; one for ScienceQA and the chatbot recipe, several for a
    multi-turn conversation. image: path to the image file, None for a text-only sample.
    """

    pid: str
    turns: tuple[tuple[str, str], ...]
    image: str | None = None


def encode_turns(tokenizer, turns, max_len: int | None = None) -> tuple[list[int], list[int], bool]:
    """(tokens, labels, truncated) for a sequence of (prompt, target) turns.

    Each turn is tokenised as ONE string, prompt + target, as the reference does: sentencepiece
    may merge pieces across the boundary, so encoding the parts separately would give token
    sequences the model never sees at inference. The prompt's share is the length of the
    prompt encoded alone (with BOS on the first turn). BOS starts the first turn only and EOS
    ends every turn, so in a conversation each answer teaches the model where to stop.
    """
    tokens: list[int] = []
    labels: list[int] = []
    for i, (prompt, target) in enumerate(turns):
        ids = tokenizer.encode(prompt + target, bos=i == 0, eos=True)
        n_prompt = min(len(tokenizer.encode(prompt, bos=i == 0, eos=False)), len(ids))
        tokens += ids
        labels += [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    truncated = max_len is not None and len(tokens) > max_len
    if truncated:
        tokens, labels = tokens[:max_len], labels[:max_len]
    return tokens, labels, truncated


class TokenizedDataset(Dataset):
    """Samples tokenised once, up front, so lengths are known (for the sampler) and every
    truncation is counted and reported when the dataset is opened, not mid-training.

    max_seq_len caps the whole sequence the model sees; `reserve` of those positions belong to
    what the model inserts after BOS (LaVIN.n_inserted: "Image: " + 6 visual tokens, or "Image: N/A";
    the modality token is not in the sequence), so
    text gets max_seq_len - reserve. Images are read lazily in __getitem__ (DataLoader workers).
    image_loader(path) -> (3, R, R) tensor replaces clip.load_image + clip.preprocess (tests).
    """

    def __init__(self, samples: Sequence[Sample], tokenizer, *, max_seq_len: int | None = None,
                 reserve: int = 0, image_mode: str = "lavin", resolution: int = 224,
                 image_loader: Callable | None = None, name: str = "dataset"):
        self.samples = list(samples)
        self.name, self.image_mode, self.resolution = name, image_mode, resolution
        self.image_loader = image_loader
        self.max_text_len = None if max_seq_len is None else max_seq_len - reserve
        if self.max_text_len is not None and self.max_text_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len} leaves no room for text after reserve={reserve}")
        self.tokens, self.labels = [], []
        self.n_truncated = 0  # samples cut at max_text_len
        self.n_no_target = 0  # ... of which the cut removed every loss-carrying position
        for s in _progress(self.samples, f"tokenising {name}"):
            tokens, labels, truncated = encode_turns(tokenizer, s.turns, self.max_text_len)
            self.tokens.append(np.asarray(tokens, dtype=np.int32))  # compact: 400k samples fit
            self.labels.append(np.asarray(labels, dtype=np.int32))
            if truncated:
                self.n_truncated += 1
                self.n_no_target += all(x == IGNORE_INDEX for x in labels)
        if self.n_truncated:
            warnings.warn(
                f"{name}: {self.n_truncated} of {len(self.samples)} samples are longer than "
                f"max_seq_len={max_seq_len} - reserve={reserve} = {self.max_text_len} tokens and "
                f"were truncated ({self.n_no_target} of them lost their whole target)", stacklevel=2)
        self.lengths = [len(t) for t in self.tokens]
        self.collate = Collator(resolution=resolution)

    def __len__(self) -> int:
        return len(self.samples)

    def drop(self, indices) -> None:
        """Remove samples in place (train.py drops those whose image cannot be read)."""
        gone = set(indices)
        keep = [i for i in range(len(self.samples)) if i not in gone]
        self.samples = [self.samples[i] for i in keep]
        self.tokens = [self.tokens[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        return {"pid": s.pid,
                "tokens": torch.from_numpy(self.tokens[i].astype(np.int64)),
                "labels": torch.from_numpy(self.labels[i].astype(np.int64)),
                "image": None if s.image is None else self.load_image(s.pid, s.image)}

    def load_image(self, pid: str, path: str) -> torch.Tensor:
        try:
            if self.image_loader is not None:
                return self.image_loader(path)
            import clip  # lazily: text-only users need not import the vision tower's module

            return clip.preprocess(clip.load_image(path), mode=self.image_mode, resolution=self.resolution)
        except Exception as e:  # re-raised with the sample's id; the cause names the file
            raise RuntimeError(f"{self.name}: sample {pid}: cannot load image {path}: {e}") from e


def _progress(items, desc: str):
    """A progress bar for the big instruction set; silent for small sets."""
    if len(items) < 20000:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="samples", mininterval=2.0)


@dataclass
class Collator:
    """Pads a list of dataset items into the batch dict described in the module docstring."""

    pad_id: int = PAD_ID
    resolution: int = 224  # image side for an all-text batch (no image to copy the shape from)

    def __call__(self, items: list[dict]) -> dict:
        B, T = len(items), max(len(it["tokens"]) for it in items)
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["tokens"])
            tokens[b, :n], labels[b, :n] = it["tokens"], it["labels"]
        shape = next((it["image"].shape for it in items if it["image"] is not None),
                     (3, self.resolution, self.resolution))
        images = torch.zeros((B, *shape), dtype=torch.float32)
        for b, it in enumerate(items):
            if it["image"] is not None:
                images[b] = it["image"]
        return {"tokens": tokens, "labels": labels, "images": images,
                "img_indicator": torch.tensor([it["image"] is not None for it in items], dtype=torch.long),
                "lengths": torch.tensor([len(it["tokens"]) for it in items], dtype=torch.long),
                "pids": [it["pid"] for it in items]}


class LengthGroupedBatchSampler(Sampler):
    """Batches of indices for one rank, optionally grouped by length to waste less padding.

    Per epoch (seed + epoch, identical on every rank):
      1. shuffle all indices (or keep their order with shuffle=False);
      2. give every rank an equal share: pad by repeating the first indices up to a multiple of
         world_size (drop_last=False, as DistributedSampler does), or cut to whole global
         batches (drop_last=True);
      3. group_by_length: sort each mega-chunk of `mega_batches` global batches by length
         (longest first), so a global batch holds similar lengths;
      4. cut into global batches of batch_size * world_size, shuffle their order, and move the
         one with the longest sample to the front (an out-of-memory shows at step 1, not hours in);
      5. rank r takes positions r, r + world_size, ... of each global batch: ranks are disjoint,
         all have the same number of batches and, at each step, similar lengths.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, group_by_length: bool = True,
                 mega_batches: int = 50, drop_last: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or mega_batches < 1:
            raise ValueError("batch_size and mega_batches must be >= 1")
        self.lengths = list(lengths)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.group_by_length = seed, shuffle, group_by_length
        self.mega_batches, self.drop_last = mega_batches, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self, g: torch.Generator) -> list[int]:
        """Step 2: all indices, shuffled, sized to an equal share per rank."""
        n, W = len(self.lengths), self.world_size
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.drop_last:
            gb = self.batch_size * W
            return order[: n - n % gb]
        if n == 0:
            return order
        pad = (-n) % W
        return order + (order * math.ceil(pad / n))[:pad]

    def _global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = self._order(g)
        gb = self.batch_size * self.world_size
        if self.group_by_length:
            mega = gb * self.mega_batches
            order = [i for s in range(0, len(order), mega)
                     for i in sorted(order[s:s + mega], key=lambda i: -self.lengths[i])]
        batches = [order[s:s + gb] for s in range(0, len(order), gb)]
        if self.shuffle and self.group_by_length and batches:
            batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
            longest = max(range(len(batches)), key=lambda k: self.lengths[batches[k][0]])
            batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def __iter__(self):
        for batch in self._global_batches():
            yield batch[self.rank::self.world_size]

    def __len__(self) -> int:
        n, W, gb = len(self.lengths), self.world_size, self.batch_size * self.world_size
        if self.drop_last:
            return n // gb
        return math.ceil((n + (-n) % W) / gb)


class SkipBatches(Sampler):
    """The first `skip` batches of an epoch left out: where a resumed run picks up."""

    def __init__(self, batches: Sampler, skip: int):
        self.batches, self.skip = batches, skip

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i >= self.skip:
                yield batch

    def __len__(self):
        return max(len(self.batches) - self.skip, 0)
