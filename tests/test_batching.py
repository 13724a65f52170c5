"""data/batching.py: tokenisation and masking, padding, truncation, multi-turn encoding, the
length-grouped sampler over ranks. Expected tokens and numbers are written out by hand here."""
import pytest
import torch
from torch.utils.data import DataLoader

import data
from data import scienceqa
from data.batching import IGNORE_INDEX, Collator, LengthGroupedBatchSampler, encode_turns
from tests.helpers import R


def test_loss_only_on_the_target(tok, sqa):
    ds = data.build_dataset("scienceqa", str(sqa), "train", tok, resolution=R)
    for i, s in enumerate(ds.samples):
        (prompt, target), = s.turns
        item = ds[i]
        tokens, labels = item["tokens"], item["labels"]
        assert tokens.tolist() == tok.encode(prompt + target, bos=True, eos=True)  # one string
        assert tokens[0] == 1 and tokens[-1] == 2 and labels.shape == tokens.shape
        on = labels != IGNORE_INDEX
        assert torch.equal(labels[on], tokens[on])  # aligned, unshifted
        assert int((~on).sum()) == len(tok.encode(prompt, bos=True, eos=False))
        assert bool(on[-1])  # EOS carries loss: the model learns to stop
        assert tok.decode(tokens[on].tolist()) == target
        assert tok.decode(tokens[~on].tolist()) == prompt


def test_padding_batch_fields_and_images(tok, sqa):
    import clip

    ds = data.build_dataset("scienceqa", str(sqa), "train", tok, resolution=R)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=ds.collate)))
    lengths = [len(tok.encode("".join(s.turns[0]), bos=True, eos=True)) for s in ds.samples]
    B, T = 4, max(lengths)
    assert batch["tokens"].shape == (B, T) and batch["tokens"].dtype == torch.long
    assert batch["labels"].shape == (B, T) and batch["labels"].dtype == torch.long
    assert batch["lengths"].tolist() == lengths
    assert batch["pids"] == ["101", "102", "103", "104"]
    assert batch["img_indicator"].tolist() == [1, 0, 1, 0]
    for b, n in enumerate(lengths):
        assert (batch["tokens"][b, n:] == 0).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
    assert batch["images"].shape == (B, 3, R, R) and batch["images"].dtype == torch.float32
    assert (batch["images"][[1, 3]] == 0).all()
    expected = clip.preprocess(clip.load_image(sqa / "images/train/103/image.png"), mode="lavin", resolution=R)
    assert torch.equal(batch["images"][2], expected)
    # an all-text batch still has images of the configured size
    text_only = Collator(resolution=R)([ds[1], ds[3]])
    assert text_only["images"].shape == (2, 3, R, R) and text_only["img_indicator"].tolist() == [0, 0]


def test_truncation_is_counted_and_reported(tok, sqa):
    full = [tok.encode("".join(s.turns[0]), bos=True, eos=True) for s in scienceqa.load_samples(sqa, "train")]
    lengths = sorted(len(t) for t in full)
    # the cap exactly fits: nothing cut, nothing said
    ds = data.build_dataset("scienceqa", str(sqa), "train", tok, max_seq_len=lengths[-1] + 8, reserve=8)
    assert ds.n_truncated == 0 and ds.lengths == [len(t) for t in full]
    # one more reserved position cuts exactly the samples of the maximal length
    n_max = lengths.count(lengths[-1])
    with pytest.warns(UserWarning, match=f"{n_max} of 4 samples"):
        ds = data.build_dataset("scienceqa", str(sqa), "train", tok, max_seq_len=lengths[-1] + 8, reserve=9)
    assert ds.n_truncated == n_max
    # a cap in the middle: every longer sample cut to the cap, the others untouched
    reserve, cap = 8, lengths[1] + 8
    n_long = sum(n > lengths[1] for n in lengths)
    assert 0 < n_long < 4
    with pytest.warns(UserWarning, match=f"{n_long} of 4 samples"):
        ds = data.build_dataset("scienceqa", str(sqa), "train", tok, max_seq_len=cap, reserve=reserve)
    assert ds.n_truncated == n_long and max(ds.lengths) == cap - reserve
    for i, t in enumerate(full):
        assert ds[i]["tokens"].tolist() == t[:cap - reserve]
        assert ds[i]["labels"].shape == ds[i]["tokens"].shape


def test_unreadable_image_named_when_loaded(sqa, tok):
    path = sqa / "images/train/103/image.png"
    path.write_bytes(path.read_bytes()[:30])  # truncated PNG: exists, so opening the set works
    ds = data.build_dataset("scienceqa", str(sqa), "train", tok, resolution=R)
    ds[1]  # text-only samples are unaffected
    with pytest.raises(RuntimeError, match=r"sample 103: cannot load image .*103/image.png"):
        ds[2]


def test_multiturn_encoding(tok):
    turns = (("Instruction: What color?\nResponse:", "Red."), ("Instruction: How many?\nResponse:", "Two."))
    tokens, labels, cut = encode_turns(tok, turns)
    first = tok.encode("Instruction: What color?\nResponse:Red.", bos=True, eos=True)
    second = tok.encode("Instruction: How many?\nResponse:Two.", bos=False, eos=True)
    assert tokens == first + second and not cut
    on = [t for t, lab in zip(tokens, labels) if lab != IGNORE_INDEX]
    assert on.count(2) == 2  # EOS after each answer carries loss
    n1 = len(tok.encode("Instruction: What color?\nResponse:", bos=True, eos=False))
    n2 = len(tok.encode("Instruction: How many?\nResponse:", bos=False, eos=False))
    assert labels == [IGNORE_INDEX] * n1 + first[n1:] + [IGNORE_INDEX] * n2 + second[n2:]
    assert tok.decode(first[n1:]) == "Red." and tok.decode(second[n2:]) == "Two."


# ----------------------------------------------------------------------------- sampler

def rank_batches(lengths, world, epoch=0, **kw):
    out = []
    for r in range(world):
        s = LengthGroupedBatchSampler(lengths, 4, rank=r, world_size=world, seed=7, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(s) == len(out[-1])
    return out


def test_sampler_ranks_are_disjoint_and_cover_everything():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (102,), generator=g).tolist()
    per_rank = rank_batches(lengths, 3)
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    for step in zip(*per_rank):
        assert len({len(b) for b in step}) == 1  # same batch size at each step
    flat = [i for batches in per_rank for b in batches for i in b]
    assert sorted(flat) == list(range(102))  # disjoint, complete
    # 103 is not a multiple of 3: one index repeats so that the shares stay equal
    flat = [i for batches in rank_batches(lengths + [9], 3) for b in batches for i in b]
    assert set(flat) == set(range(103)) and len(flat) == 105
    # drop_last: only full batches
    dl = rank_batches(lengths, 3, drop_last=True)
    assert all(len(b) == 4 for batches in dl for b in batches) and len(dl[0]) == 102 // 12


def test_sampler_is_deterministic_per_epoch_and_groups_lengths():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 500, (400,), generator=g).tolist()
    assert rank_batches(lengths, 2, epoch=3) == rank_batches(lengths, 2, epoch=3)
    assert rank_batches(lengths, 2, epoch=3) != rank_batches(lengths, 2, epoch=4)

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped = rank_batches(lengths, 1, mega_batches=10)[0]
    plain = rank_batches(lengths, 1, group_by_length=False)[0]
    assert sorted(i for b in plain for i in b) == list(range(400))
    assert padded(grouped) < 0.8 * padded(plain)
    assert max(lengths) in [lengths[i] for i in grouped[0]]  # the longest batch comes first
