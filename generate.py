"""Generation: LaVIN's prefill, one-token decode steps with the KV cache, and sampling. Both
command lines (sample.py's prompt, chat and evaluation; train.py's evaluation at the end) use it.

    prompt ids ─LaVIN.embed─> [BOS] "Image: " <visual tokens> prompt     (or [BOS] "Image: N/A" prompt)
      └─ each row cut to its own length, left-padded to the longest ─> one prefill into the KV cache
         (pad slots masked, positions counted from each row's first real token, + 1 as in training)
    modality token ─> router weights of every block, computed once, reused by every decode step
    loop: greedy or temperature + top-p ─> feed the token ─> next logits; a row ends at EOS or
          when `stop` says so (a dataset's rule, in evaluation); the batch ends with its last row
          (--compile: each step by StaticDecoder, shapes fixed, compiled; one CUDA graph launch on a GPU)
"""
from __future__ import annotations

import torch

from lavin import TEXT_START, LaVIN
from model import KVCache, Llama


class ContextTooLong(ValueError):
    """A prompt plus the tokens asked for do not fit the model's max_seq_len."""


def sample_next(logits, temperature: float, top_p: float, generator=None):
    """Next token per row from logits (B, vocab): argmax, or a draw from the smallest set of tokens
    whose probability reaches top_p, at the given temperature."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    p, idx = probs.sort(-1, descending=True)
    p = p.masked_fill(p.cumsum(-1) - p > top_p, 0.0)  # the most likely token always stays
    return idx.gather(-1, torch.multinomial(p, 1, generator=generator)).squeeze(-1)


def prefill_embeddings(model: LaVIN, prompts, images=None, img_indicator=None):
    """(x (B, L, dim), pad (B,), indicator (B,)): each row's embedding sequence as training builds
    it, left-padded with pad[b] zero slots to the longest row L. No indicator means text only."""
    device = model.llama.tok_embeddings.weight.device
    B = len(prompts)
    if B == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS)")
    ind = torch.zeros(B, dtype=torch.long, device=device) if img_indicator is None else img_indicator.to(device).long()
    if model.folded is not None and bool((ind != model.folded).any()):
        raise ValueError(f"this model's routing is folded for modality {model.folded} only")
    T = max(map(len, prompts))
    tokens = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, device=device)
    h, _ = model.embed(tokens, None if images is None else images.to(device), ind)  # (B, T + E, dim)
    lengths = torch.tensor([len(p) for p in prompts], device=device) + model.inserted(ind)  # (B,) real positions
    L = int(lengths.max())
    pad = L - lengths
    j = torch.arange(L, device=device)[None]  # (1, L)
    src = (j - pad[:, None]).clamp(min=0)  # (B, L): slot j holds position j - pad of the row
    x = h.gather(1, src[..., None].expand(-1, -1, h.shape[-1]))  # (B, L, dim)
    return x.masked_fill((j < pad[:, None])[..., None], 0.0), pad, ind


def cache_dtype(x: torch.Tensor):
    """Keys and values come out of the linear layers in autocast's dtype when it is on."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class StaticDecoder:
    """One-token decode steps by Llama.decode_step, whose shapes never change, compiled unless
    compile=False. On CUDA, mode="reduce-overhead" captures the step in a CUDA graph: a step is
    then one graph launch instead of hundreds of kernel launches, which bound the eager loop at
    batch 1 (it runs far below the speed of reading the weights). A graph reads its KV cache at
    the addresses it was captured with, so the decoder keeps one cache of max_seq_len slots per
    batch size and hands it out again, emptied, to every batch of that size."""

    def __init__(self, llama: Llama, compile: bool = True, backend: str = "inductor"):
        self.llama, self.caches, self.step = llama, {}, llama.decode_step
        if compile:
            cuda = llama.tok_embeddings.weight.device.type == "cuda"
            import torch._inductor.config as inductor

            options = {"triton.cudagraphs": cuda}  # what mode="reduce-overhead" sets (mode excludes options)
            if hasattr(inductor, "emulate_precision_casts"):  # not in every torch the requirements allow
                # Fused kernels round to bf16/fp16 where eager does: else the tokens drift from eager's.
                options["emulate_precision_casts"] = True
            # dynamic=False: one graph per batch size (an evaluation has two, its batch and its last)
            # backend "eager": traced as compiled code is (each layer's compiled branch) without building
            # kernels, for the tests
            self.step = torch.compile(llama.decode_step, backend=backend, options=options if backend == "inductor"
                                      else None, fullgraph=True, dynamic=False)

    def cache(self, batch: int, pad, dtype) -> KVCache:
        """The cache for `batch` rows with left padding pad (B,) (None: none), emptied."""
        cache = self.caches.get((batch, dtype))
        if cache is None:
            cache = KVCache(self.llama.args, batch, device=self.llama.tok_embeddings.weight.device, dtype=dtype)
            for t in cache.k + cache.v:  # a graph input at a fixed address: written in place, not copied in
                torch._dynamo.mark_static_address(t)
            self.caches[batch, dtype] = cache
        cache.reset(pad)
        return cache

    def __call__(self, embeds, cache: KVCache, routes, pos_offset: int):
        """Logits (B, vocab) of embeds (B, 1, dim) fed at the cache's next slot."""
        slot = torch.tensor([cache.len], device=embeds.device)  # a tensor: one graph serves every slot
        # The last step's logits are used up: the graph may overwrite its outputs in this step.
        torch.compiler.cudagraph_mark_step_begin()
        logits = self.step(embeds, cache, slot, routes, pos_offset)
        cache.len += 1
        return logits


@torch.inference_mode()
def decode(model: LaVIN, tokenizer, cache: KVCache, routes, x, max_new_tokens: int, temperature=0.0,
           top_p=1.0, generator=None, stop=None, on_token=None, decoder: StaticDecoder | None = None):
    """Feed embeddings x (B, T, dim) into the cache, then sample up to max_new_tokens per row.
    Returns (new tokens per row without EOS, whether each row ended at EOS, decode steps). The
    last token sampled is never fed: a caller that goes on (chat) feeds it first. x always runs
    through the eager forward; the one-token steps through decoder if given (cache must be its)."""
    if cache.len + x.shape[1] + max_new_tokens - 1 > cache.max_len:
        raise ContextTooLong(f"{cache.len + x.shape[1]} positions + {max_new_tokens} new tokens do not "
                             f"fit the context of {cache.max_len}")
    B, ends = x.shape[0], tokenizer.stop_ids  # EOS; LLaMA-3's chat models also end at <|eot_id|>
    out, alive, at_eos = [[] for _ in range(B)], [True] * B, [False] * B
    # Only the last position's logits are needed: norm and output on it alone (a 500-token batch
    # of 16 would otherwise make a GiB of fp32 logits for nothing).
    h = model.llama(embeds=x, cache=cache, routes=routes, pos_offset=TEXT_START, head=False)[:, -1]  # (B, dim)
    logits = model.llama.output(model.llama.norm(h))
    steps = 0
    while True:
        nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
        steps += 1
        for b, t in enumerate(nxt.tolist()):  # one host sync per step: stop needs the ids anyway
            if not alive[b]:
                continue
            if t in ends:
                alive[b], at_eos[b] = False, True
                continue
            out[b].append(t)
            if on_token is not None:
                on_token(b, out[b])
            if stop is not None and stop(b, out[b]):
                alive[b] = False
        if not any(alive) or steps == max_new_tokens:
            return out, at_eos, steps
        # Rows that ended keep decoding (their tokens are dropped): the batch keeps one shape.
        emb = model.llama.tok_embeddings(nxt[:, None])  # (B, 1, dim)
        if decoder is None:
            logits = model.llama(embeds=emb, cache=cache, routes=routes, pos_offset=TEXT_START)[:, -1]
        else:
            logits = decoder(emb, cache, routes, pos_offset=TEXT_START)


@torch.inference_mode()
def generate(model: LaVIN, tokenizer, prompts: list[list[int]], images=None, img_indicator=None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, generator=None,
             stop=None, on_token=None, stats: dict | None = None,
             decoder: StaticDecoder | None = None) -> list[list[int]]:
    """New tokens for each prompt (token ids starting with BOS), cut before EOS.

    images (B, 3, R, R) and img_indicator (B,) as in training (1 = the row shows its image; None:
    all text). Greedy when temperature is 0. stop(row, new_ids) -> True ends a row early;
    on_token(row, new_ids) is called after each token a row gets (streaming). stats, if given,
    receives "steps": the tokens sampled per row, the batch's last row included. decoder: a
    StaticDecoder (--compile) for the one-token steps, in its own cache; None: the eager forward.
    Pass one decoder to every call: a new one would allocate and capture its graph anew.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    x, pad, ind = prefill_embeddings(model, prompts, images, img_indicator)
    B, L = x.shape[:2]
    limit = model.llama.args.max_seq_len
    if L - int(pad.min()) + max_new_tokens > limit:
        b = int(pad.argmin())
        raise ContextTooLong(f"prompt {b} takes {L} positions ({len(prompts[b])} tokens + {L - len(prompts[b])} "
                             f"inserted); with max_new_tokens={max_new_tokens} that exceeds max_seq_len={limit}")
    routes = model.routes(ind, B, x.device, x.dtype)  # once, for every step
    if decoder is None:
        cache = KVCache(model.llama.args, B, L + max_new_tokens, pad=pad, device=x.device, dtype=cache_dtype(x))
    else:
        cache = decoder.cache(B, pad, cache_dtype(x))
    out, _, steps = decode(model, tokenizer, cache, routes, x, max_new_tokens, temperature, top_p,
                           generator, stop, on_token, decoder)
    if stats is not None:
        stats["steps"] = steps
    return out


class Stream:
    """An on_token callback that prints one row's answer as it grows. The whole answer is decoded
    each time because sentencepiece decodes a lone piece without its leading space; text ending
    in U+FFFD is half a UTF-8 character whose other bytes are still to come."""

    def __init__(self, tokenizer, write=None):
        self.tok, self.shown = tokenizer, ""
        self.write = write or (lambda s: print(s, end="", flush=True))

    def __call__(self, row, ids, final: bool = False):
        text = self.tok.decode(ids)
        if text.startswith(self.shown) and text != self.shown and (final or not text.endswith("\ufffd")):
            self.write(text[len(self.shown):])
            self.shown = text

