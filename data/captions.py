"""Caption metrics as the coco-caption toolkit computes them: BLEU-1..4 and CIDEr-D.

    captions, each image's references ─ tokenize: lower case, PTB-style tokens, punctuation dropped
        │
        ├─> BLEU-n (Papineni et al., 2002), corpus level: clipped n-gram matches of every caption
        │   summed over the corpus, divided by every caption's n-gram count; the geometric mean
        │   over 1..n; times the brevity penalty exp(1 - r/c) when the captions' total length c is
        │   below r, the sum over images of the reference length closest to the caption's
        └─> CIDEr-D (Vedantam et al., 2015): each sentence a TF-IDF vector per n = 1..4, the
            document frequency of an n-gram = the images whose references hold it, idf =
            log(images) - log(max(1, df)); per reference, the caption's weights clipped at the
            reference's, the cosine similarity times a Gaussian penalty on the length difference
            (sigma 6); averaged over n and references, times 10, averaged over images

Toolkit conventions kept: the smoothing constants of its BLEU (1e-15, 1e-9), the closest reference
length with ties to the shorter, and the "length" of CIDEr-D's penalty, which the toolkit counts
as the sentence's bigrams. The tokenizer is ours: the toolkit runs Stanford's PTB tokenizer in
Java; this one splits the same way on caption text (clitics, punctuation) in a few lines.

`Evaluation` is what evaluate.py asks of COCO (data/coco.py reads the split): a prompt per
image, the stop at a line's end, the scores and the table.

    python -m data.captions --data DIR --split test --preds preds.json [--out results.json]
    preds.json: {"<cocoid>": "a generated caption", ...}
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter

from data import coco
from data.scienceqa import DataError, load_json, save_json

# What the toolkit drops after tokenising; PTB writes ( ) { } as -LRB- -RRB- -LCB- -RCB- and a
# double quote as `` or '', all of them dropped, so here they are dropped as they are
PUNCTUATION = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...",
               ";", "(", ")", "{", "}", '"'}
TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\.\.\.|--|\d+(?:,\d{3})+|[a-z0-9]+(?:[-'./&][a-z0-9]+)*|\S")
SIGMA = 6.0  # CIDEr-D's length penalty


def tokenize(text: str) -> list[str]:
    """Lower-cased tokens as PTB tokenisation leaves them, punctuation tokens removed:
    "A man's dog, running." -> ["a", "man", "'s", "dog", "running"]."""
    text = re.sub(r"([a-z])n't\b", r"\1 n't", text.lower())  # don't -> do n't
    text = re.sub(r"([a-z])'(s|re|ve|ll|d|m)\b", r"\1 '\2", text)  # man's -> man 's
    return [t for t in TOKEN.findall(text) if t not in PUNCTUATION]


def ngrams(words: list[str], n: int) -> Counter:
    """Counts of every k-gram, k = 1..n, as tuples."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


# ----------------------------------------------------------------------------- BLEU

def bleu(candidates: list[list[str]], references: list[list[list[str]]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (fractions) of tokenised candidates, one per image, against its references."""
    correct, guess = [0] * n, [0] * n
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        best = Counter()  # each n-gram's largest count in any one reference: the clip
        for ref in refs:
            best |= ngrams(ref, n)
        for gram, count in ngrams(cand, n).items():
            correct[len(gram) - 1] += min(count, best[gram])
        for k in range(n):
            guess[k] += max(0, len(cand) - k)
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]  # closest; a tie: the shorter
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + 1e-15) / (guess[k] + 1e-9)
        scores.append(product ** (1 / (k + 1)))
    ratio = (cand_len + 1e-15) / (ref_len + 1e-9)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * penalty for s in scores]


# ----------------------------------------------------------------------------- CIDEr-D

def tfidf(counts: Counter, df: Counter, log_images: float, n: int = 4):
    """(vectors per n, their norms, the length CIDEr-D penalises: the number of bigrams)."""
    vecs, norms = [{} for _ in range(n)], [0.0] * n
    for gram, tf in counts.items():
        w = tf * (log_images - math.log(max(1.0, df[gram])))
        vecs[len(gram) - 1][gram] = w
        norms[len(gram) - 1] += w * w
    return vecs, [math.sqrt(x) for x in norms], sum(tf for g, tf in counts.items() if len(g) == 2)


def cider_d(candidates: list[list[str]], references: list[list[list[str]]], n: int = 4) -> tuple[float, list]:
    """(CIDEr-D of the corpus, each image's score); document frequencies from these references."""
    df = Counter()
    for refs in references:
        df.update({gram for ref in refs for gram in ngrams(ref, n)})
    log_images = math.log(len(references))
    scores = []
    for cand, refs in zip(candidates, references):
        vec, norm, length = tfidf(ngrams(cand, n), df, log_images, n)
        total = 0.0
        for ref in refs:
            rvec, rnorm, rlength = tfidf(ngrams(ref, n), df, log_images, n)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * SIGMA ** 2))
            for k in range(n):
                dot = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] and rnorm[k]:
                    dot /= norm[k] * rnorm[k]
                total += dot * penalty / n
        scores.append(10.0 * total / len(refs))
    return sum(scores) / len(scores), scores


# ----------------------------------------------------------------------------- the table

def score(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """results.json's dict: BLEU-1..4 and CIDEr (x100, 2 decimals) over the images of references."""
    missing = [k for k in references if k not in predictions]
    if missing:
        raise DataError(f"no caption for {len(missing)} of the {len(references)} images (e.g. cocoid {missing[0]})")
    keys = list(references)
    for k in keys:
        if not isinstance(predictions[k], str):
            raise DataError(f"the caption of cocoid {k} should be a string, got {predictions[k]!r:.80}")
    cands = [tokenize(predictions[k]) for k in keys]
    refs = [[tokenize(r) for r in references[k]] for k in keys]
    result = {f"BLEU-{k + 1}": round(100 * b, 2) for k, b in enumerate(bleu(cands, refs))}
    result["CIDEr"] = round(100 * cider_d(cands, refs)[0], 2)
    return {**result, "images": len(keys), "empty": sum(not c for c in cands)}


def warnings_of(predictions: dict, references: dict, split: str) -> list[str]:
    """What score() takes as it is but a user must hear of: captions of images outside the split
    (left out: most likely another split's file) and empty captions (no word once tokenised; the
    toolkit scores them, near 0)."""
    def named(keys):
        return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")

    extra = [k for k in predictions if k not in references]
    empty = [k for k in references if isinstance(predictions.get(k), str) and not tokenize(predictions[k])]
    lines = [f"{len(extra)} caption(s) for images not in split {split}, left out: cocoid {named(extra)}"] if extra else []
    return lines + ([f"{len(empty)} empty caption(s), scored as they are: cocoid {named(empty)}"] if empty else [])


def format_table(result: dict, split: str = "") -> str:
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"]
    where = f"split {split}: " if split else ""
    empty = f" ({result['empty']} empty)" if result.get("empty") else ""
    return (f"{where}{result['images']} images, one caption each{empty}\n" + " ".join(f"{n:>7}" for n in names) + "\n"
            + " ".join(f"{result[n]:7.2f}" for n in names))


class Evaluation:
    """A split's captions for evaluate.py: one prompt per image, generated to EOS (or a line's end),
    scored with BLEU-1..4 and CIDEr-D against the image's references."""

    name = "coco"

    def __init__(self, root: str, split: str, tokenizer, image_mode: str = "lavin", resolution: int = 224):
        from data.batching import Sample, TokenizedDataset

        images = coco.read_karpathy(root)
        entries = coco.images_of(images, split)
        coco.check_images(root, entries)
        self.split, self.references = split, coco.references_of(images, split)
        samples = [Sample(str(e["cocoid"]), ((coco.CAPTION_PROMPT, ""),), coco.image_path(root, e)) for e in entries]
        self.dataset = TokenizedDataset(samples, tokenizer, image_mode=image_mode, resolution=resolution,
                                        name=f"coco/{split}")

    def stop(self, text: str) -> bool:
        return "\n" in text  # a caption is one line

    def score(self, texts: dict) -> tuple[dict, dict]:
        preds = {k: texts[k].split("\n")[0].strip() for k in texts}
        return {"dataset": "coco", "split": self.split, **score(preds, self.references)}, {"preds.json": preds}

    def table(self, result: dict) -> str:
        return format_table(result, self.split)


def parser() -> argparse.ArgumentParser:
    """main's command line (tests/test_docs.py checks the docs' commands with it)."""
    ap = argparse.ArgumentParser(description="BLEU-1..4 and CIDEr-D of captions, as the coco-caption toolkit.",
                                 allow_abbrev=False)
    ap.add_argument("--data", required=True, help="the folder of dataset_coco.json (Karpathy's split)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--preds", required=True, help='JSON {"<cocoid>": "caption"}')
    ap.add_argument("--out", help="write results.json here")
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    preds = load_json(args.preds)
    if not isinstance(preds, dict):
        raise DataError(f"{args.preds}: expected an object cocoid -> caption")
    references = coco.references_of(coco.read_karpathy(args.data), args.split)
    for line in warnings_of(preds, references, args.split):  # before score(): it may refuse the file
        print(f"warning: {line}", file=sys.stderr)
    result = score(preds, references)
    print(format_table(result, args.split))
    if args.out:
        save_json(args.out, result)
    return result


if __name__ == "__main__":
    try:
        main()
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
