"""LaVIN: a frozen LLaMA that sees through a frozen CLIP ViT (Luo et al., NeurIPS 2023, sec. 3).

    image ─> CLIP ViT (frozen, MM-adapter before attention in every block)
               └─ [CLS] after blocks 4, 8, .., 24 ─> adapter_proj (the visual neck) ─> 6 tokens ─┐
    tokens: [BOS] prompt answer [EOS]                                                             │
             └─> [BOS] "Image: " <6 visual tokens> prompt answer      (image samples) <───────────┘
                 [BOS] "Image: N/A" prompt answer                      (text-only samples)
    img_indicator ─> adapter_modality_embedding ─> modality token m ─> Llama.route(m)
                                                   └─> router weights of every LLaMA block
    LLaMA (frozen, MM-adapter before attention in every block, mixing its two paths by those
    weights) ─> logits ─> next-token loss on the answer only

The official code prepends m to the sequence and masks it from every text token. Since m then
sees only itself, its hidden states (and the routing weights read off them) do not depend on
the text: we run it through the blocks on its own (`Llama.route`) and keep the text on the fast
causal attention path. Text positions still start at 1, where the official code puts them.
Only names containing "adapter" train: ~3.8M parameters for LaVIN-7B, ~5.4M for 13B.
"""
import argparse
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapter import MMAdapter, RepAdapter, convert_official, fold_adapter, load_trainable, mark_trainable, trainable_state_dict
from clip import VisionTransformer, load_clip
from model import NO_ADAPTERS, ONE_PATH, Llama, ModelArgs, load_llama
from quant import QuantLinear, bits_of, held_bytes, quantize_
from router import modality_embedding

IGNORE_INDEX = -100  # label of every position that carries no loss
TEXT_START = 1  # the text's first position: the official code puts the modality token at 0


@dataclass
class LaVINArgs:
    adapter_dim: int = 8  # the adapters' bottleneck width
    adapter_groups: int = 2  # groups of the up-projections (block-diagonal)
    adapter_scale: float = 1.0  # s in x + s * adapter(x)
    adapter_dropout: float = 0.1
    temperature: float = 10.0  # router softmax temperature: 10 for LaVIN-7B, 5 for 13B
    adapter_mlp: bool = False  # the paper's "block" variant: a second adapter before the FFN
    hidden_proj: int = 128  # the visual neck's hidden width
    every: int = 4  # take CLIP's [CLS] after every 4th block: 6 visual tokens from ViT-L/14
    # ablations (train.py --no_visual / --no_router): what MMT's parts are worth
    visual: bool = True  # False: no visual tokens, no CLIP adapters, no neck; images unseen
    router: bool = True  # False: one adapter path (a RepAdapter) for both modalities, no router


class AdapterMLP(nn.Module):
    """The visual neck: Linear(clip width, 128) -> SiLU -> Linear(128, LLaMA dim), xavier init."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.conv_A = nn.Linear(in_features, hidden)  # official names (Linear layers there too)
        self.conv_B = nn.Linear(hidden, out_features)
        for layer in (self.conv_A, self.conv_B):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        return self.conv_B(F.silu(self.conv_A(x)))


class LaVIN(nn.Module):
    def __init__(self, args: LaVINArgs, llama: Llama, visual: nn.Module, prefix_img, prefix_text):
        """llama and visual are the (loaded, frozen) backbones; their adapter slots get filled here.
        prefix_img / prefix_text: token ids of "Image: " and "Image: N/A", each encoded on its own
        without BOS (as the official code does, so sentencepiece adds its leading space)."""
        super().__init__()
        self.args = args
        self.llama, self.visual = llama, visual
        dim, width = llama.args.dim, visual.width
        device = llama.tok_embeddings.weight.device

        def mm_adapter(d):
            if not args.router:
                return RepAdapter(d, args.adapter_dim, args.adapter_groups, args.adapter_scale,
                                  args.adapter_dropout).to(device)
            return MMAdapter(d, args.adapter_dim, args.adapter_groups, args.adapter_scale,
                             args.adapter_dropout, args.temperature).to(device)

        for block in llama.layers:
            block.adapter_attn = mm_adapter(dim)
            if args.adapter_mlp:
                block.adapter_mlp = mm_adapter(dim)
        for block in visual.transformer.resblocks if args.visual else ():
            block.adapter_attn = mm_adapter(width)
        self.adapter_proj = AdapterMLP(width, args.hidden_proj, dim).to(device) if args.visual else None
        self.adapter_modality_embedding = modality_embedding(dim).to(device) if args.router else None
        self.register_buffer("prefix_img", torch.tensor(prefix_img, device=device), persistent=False)
        self.register_buffer("prefix_text", torch.tensor(prefix_text, device=device), persistent=False)
        self.n_visual = visual.layers // args.every
        self.folded = None  # the modality whose routing is folded into LLaMA (see fold)
        mark_trainable(self)

    @property
    def n_inserted(self) -> int:
        """Positions `embed` adds to every sequence: what a data pipeline reserves of max_seq_len."""
        return max(len(self.prefix_img) + self.n_visual, len(self.prefix_text))

    def inserted(self, img_indicator: torch.Tensor) -> torch.Tensor:
        """Tokens `embed` inserts after BOS in each sample (B,): "Image: " and the visual tokens
        where img_indicator (B,) marks an image, else "Image: N/A" (always, without the visual path)."""
        has_img = img_indicator.bool() & self.args.visual
        return torch.where(has_img, len(self.prefix_img) + self.n_visual, len(self.prefix_text))

    def embed(self, tokens, images=None, img_indicator=None, labels=None):
        """Token ids (B, T) -> embeddings (B, T + E, dim) with "Image: " and the visual tokens, or
        "Image: N/A", inserted after BOS; labels (B, T) are moved along with their tokens and the
        inserted positions get IGNORE_INDEX. E is the longer insertion; samples with a shorter one
        end in E' padding positions that carry no loss (the causal mask keeps them harmless).

        Per sample this is the official construction, cat([BOS, insertion, the rest of the text]),
        which tests/test_lavin.py test_embed_inserts_prefix_and_visual_tokens_after_bos writes out;
        here it is one gather for the whole batch."""
        B, T = tokens.shape
        if not self.args.visual:  # the ablation: every sample reads "Image: N/A"
            images = img_indicator = None
        has_img = torch.zeros(B, dtype=torch.bool, device=tokens.device) if img_indicator is None \
            else img_indicator.bool()
        ins, E = self.insertions(images, has_img), self.n_inserted  # (B, E, dim)
        n_ins = self.inserted(has_img)[:, None]  # (B, 1): the length of each sample's insertion
        # New position j holds BOS (j = 0), insertion token j - 1 (1 <= j <= n_ins), or text token
        # j - n_ins (past the text's end: its last token again, whose label is dropped below).
        j = torch.arange(T + E, device=tokens.device)[None]  # (1, T + E)
        is_inserted = (j >= 1) & (j < 1 + n_ins)  # (B, T + E)
        text_at = torch.where(j == 0, 0, j - n_ins).clamp(0, T - 1)  # (B, T + E) a text index
        insertion_at = (j - 1).clamp(0, E - 1)[..., None].expand(B, -1, ins.shape[-1])  # (B, T + E, dim)
        text = self.llama.tok_embeddings(tokens.gather(1, text_at))  # (B, T + E, dim)
        h = torch.where(is_inserted[..., None], ins.gather(1, insertion_at), text)
        if labels is None:
            return h, None
        past_end = j - n_ins >= T  # the padding tail of samples with the shorter insertion
        new_labels = labels.gather(1, text_at).masked_fill(is_inserted | past_end, IGNORE_INDEX)
        return h, new_labels

    def insertions(self, images, has_img) -> torch.Tensor:
        """What `embed` inserts after BOS, (B, E, dim), zero-padded to E: the embedded "Image: " and
        the visual neck's tokens where has_img (B,), else the embedded "Image: N/A"."""
        emb = self.llama.tok_embeddings
        B, (dim, dtype), E = len(has_img), (emb.weight.shape[1], emb.weight.dtype), self.n_inserted
        text_only = F.pad(emb(self.prefix_text), (0, 0, 0, E - len(self.prefix_text))).expand(B, E, dim)
        if images is None:
            if has_img.any():
                raise ValueError("img_indicator marks samples with an image, but no images were given")
            return text_only  # every sample is text-only
        feats = self.visual(images, self.args.every)  # (B, n_visual, clip width)
        vis = self.adapter_proj(feats.to(self.adapter_proj.conv_A.weight.dtype)).to(dtype)  # the visual neck
        with_img = torch.cat([emb(self.prefix_img).expand(B, -1, dim), vis], 1)  # (B, n_img, dim)
        with_img = F.pad(with_img, (0, 0, 0, E - with_img.shape[1]))  # (B, E, dim)
        return torch.where(has_img[:, None, None], with_img, text_only)

    def routes(self, img_indicator, batch: int, device, dtype):
        """Router weights of every LLaMA block, one (w_attn, w_mlp) pair each, from the modality
        token (B, 1, dim) alone; model.ONE_PATH without a router, model.NO_ADAPTERS once fold()
        has baked one modality's routing into the weights."""
        if self.folded is not None:
            return NO_ADAPTERS
        if not self.args.router:  # one adapter path for every sample: nothing to route
            return ONE_PATH
        ind = torch.zeros(batch, dtype=torch.long, device=device) if img_indicator is None else img_indicator.long()
        m = self.adapter_modality_embedding(ind)[:, None].to(dtype)  # (B, 1, dim)
        return self.llama.route(m)

    @contextmanager
    def clip_routing(self):
        """Within the block, what CLIP's routers choose as images pass through: yields a list
        that receives, for each CLIP block in order, the router weights (B, L, 2) of every token
        (demo.py draws them). Forward hooks on the routers: what the model computes is unchanged,
        and they are removed on leaving. Empty without a router or without the visual path."""
        found = []
        routers = [b.adapter_attn.expert_weights for b in self.visual.transformer.resblocks
                   if isinstance(b.adapter_attn, MMAdapter)]
        hooks = [r.register_forward_hook(lambda module, args, w: found.append(w.detach())) for r in routers]
        try:
            yield found
        finally:
            for hook in hooks:
                hook.remove()

    def forward(self, tokens, images=None, img_indicator=None, labels=None, reduction: str = "mean"):
        """Logits (B, T + E, vocab) of the sequence `embed` builds; with labels, the next-token
        cross-entropy over the answer tokens instead (their mean, or with reduction="sum" their
        sum: a trainer that normalises by a count across processes wants the sum)."""
        if self.folded is not None and img_indicator is not None and bool((img_indicator != self.folded).any()):
            raise ValueError(f"this model's routing is folded for modality {self.folded} only")
        h, labels = self.embed(tokens, images, img_indicator, labels)
        routes = self.routes(img_indicator, tokens.shape[0], tokens.device, h.dtype)
        if labels is None:
            return self.llama(embeds=h, routes=routes, pos_offset=TEXT_START)
        h = self.llama(embeds=h, routes=routes, pos_offset=TEXT_START, head=False)  # (B, T + E, dim)
        # Only answer positions carry loss, so norm and the vocabulary projection run on those
        # alone: no (B, T + E, vocab) logits, a tenth of the positions in ScienceQA.
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX  # (B, T + E - 1)
        logits = self.llama.output(self.llama.norm(h[:, :-1][keep]))  # (N answer tokens, vocab)
        return F.cross_entropy(logits.float(), target[keep], reduction=reduction)

    @torch.no_grad()
    def fold(self, modality: int):
        """Fold the LLaMA adapters into wq/wk/wv (and w1/w3) for one modality (router.IMAGE or
        router.TEXT): all samples of a modality share one routing, so each adapter is then a
        fixed affine map. Inference then costs what plain LLaMA costs. CLIP's adapters route every
        token on its own hidden state, so they stay as they are. Quantized weights (LaVIN-lite)
        cannot take an adapter in: such a model runs with its adapters unfolded."""
        if bits_of(self.llama) != 16:
            raise ValueError(f"the LLaMA weights are quantized to {bits_of(self.llama)} bits: an adapter cannot be "
                             f"folded into them; run the model with its adapters unfolded")
        self.eval()  # folding is for inference: no dropout may leak into the routing baked in
        ind = torch.tensor([modality], device=self.llama.tok_embeddings.weight.device)
        routes = self.routes(ind, 1, ind.device, torch.float32)
        if routes == ONE_PATH:  # without a router each adapter is one affine map already: no weights
            routes = [(None, None)] * len(self.llama.layers)
        for block, (w_attn, w_mlp) in zip(self.llama.layers, routes):
            for adapter, w, readers in ((block.adapter_attn, w_attn, (block.attention, "wq", "wk", "wv")),
                                        (block.adapter_mlp, w_mlp, (block.feed_forward, "w1", "w3"))):
                if adapter is None:
                    continue
                parent, *names = readers
                for name in names:
                    old = getattr(parent, name)
                    W, b = fold_adapter(adapter, w, old.weight, old.bias)
                    new = nn.Linear(W.shape[1], W.shape[0], bias=True, device=W.device, dtype=W.dtype)
                    new.weight.copy_(W)
                    new.bias.copy_(b)
                    setattr(parent, name, new.requires_grad_(False))
            block.adapter_attn = block.adapter_mlp = None
        self.folded = modality
        return self


def compile_blocks(model: LaVIN):
    """torch.compile every transformer block of both backbones (train.py's default on a GPU). Each
    block is compiled on its own, gradient checkpointing inside it (Block.forward), so the compiler
    fuses the recomputation too; blocks of one shape share their compiled code."""
    for block in [*model.llama.layers, *model.visual.transformer.resblocks]:
        block.compile()


def load_lavin(llama_path, clip_path, args: LaVINArgs | None = None, dtype=torch.float32, device="cpu",
               max_seq_len: int = 2048, bits: int = 16):
    """(LaVIN, Tokenizer) from a LLaMA folder (Meta's or Hugging Face's layout) and an OpenAI CLIP
    checkpoint: frozen backbones in `dtype`, fresh fp32 adapters. Load trained adapters after.
    bits 4 or 8: the LLaMA blocks' linear layers quantized (LaVIN-lite); CLIP stays in `dtype`."""
    llama, tokenizer = load_llama(llama_path, dtype=dtype, device=device, max_seq_len=max_seq_len, bits=bits)
    visual = load_clip(clip_path, dtype=dtype, device=device)
    model = LaVIN(args or LaVINArgs(), llama, visual, tokenizer.encode("Image: ", bos=False, eos=False),
                  tokenizer.encode("Image: N/A", bos=False, eos=False))
    return model, tokenizer


# ----------------------------------------------------------------------------- checkpoints

def atomic_save(obj, path):
    """torch.save to a temporary file, flushed to disk, then renamed over `path`: a crash or an
    error while writing leaves the previous file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a vanished folder, a second Ctrl-C: no half-written file left
        tmp.unlink(missing_ok=True)
        raise


def save_adapters(path, model: LaVIN, **extra):
    """Only what trains, plus the configs it belongs to; written atomically. Loadable with
    weights_only=True."""
    state = {"model": {k: v.detach().cpu() for k, v in trainable_state_dict(model).items()},
             "lavin_args": asdict(model.args), "llama_args": asdict(model.llama.args),
             "bits": bits_of(model.llama), **extra}  # the backbone the adapters were trained against
    atomic_save(state, path)


def read_adapters(path) -> dict:
    """Our adapter checkpoint or an official LaVIN one (`checkpoint-19.pth`), as its dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter checkpoint at {path}")
    # The official files pickle the training script's argparse.Namespace; allow that one class.
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise KeyError(f"{path}: not an adapter checkpoint (no 'model' entry)")
    return ckpt


def load_adapters(model: LaVIN, path, ckpt: dict | None = None):
    """Load our own adapter checkpoint or an official LaVIN one; every key and shape is checked
    before anything is copied. ckpt: the file's dict if the caller has read it already (it is
    not read again). Returns the checkpoint dict."""
    ckpt = read_adapters(path) if ckpt is None else ckpt
    state = ckpt["model"]
    official = "lavin_args" not in ckpt
    if official:
        check_official_args(ckpt.get("args"), model.args, path)
        state = convert_official(state)
    load_trainable(model, state, source=str(path))
    trained, have = trained_bits(ckpt), bits_of(model.llama)
    if official and trained == 8:  # bitsandbytes' Linear8bitLt: int8 activations with fp16 outliers
        warnings.warn(f"{path} was trained against bitsandbytes' LLM.int8() LLaMA (the official --bits 8bit), which "
                      f"this project does not implement; this model's LLaMA is {have}-bit, so its answers may differ",
                      stacklevel=2)
    elif trained != have:
        kind = {4: "a 4-bit (NF4) LLaMA", 8: "an 8-bit LLaMA", 16: "a 16-bit LLaMA"}[trained]
        warnings.warn(f"{path} was trained against {kind}{' (LaVIN-lite)' if trained == 4 else ''}; this model's "
                      f"LLaMA is {have}-bit, so its answers may differ: load it with bits={trained} (--bits {trained})",
                      stacklevel=2)
    return ckpt


def trained_bits(ckpt: dict) -> int:
    """The bits of the LLaMA an adapter checkpoint was trained against: ours say so; the official
    Namespace has --bits 4bit | 8bit | 16bit (the official lite: 4bit)."""
    if "lavin_args" in ckpt:
        return ckpt.get("bits", 16)
    return {"4bit": 4, "8bit": 8}.get(getattr(ckpt.get("args"), "bits", "16bit"), 16)


def check_official_args(ns, args: LaVINArgs, path):
    """The official Namespace says which adapter dim and temperature the weights were trained with."""
    if ns is None:
        return
    for key in ("adapter_dim", "temperature", "hidden_proj", "adapter_scale"):
        if hasattr(ns, key) and getattr(ns, key) != getattr(args, key):
            raise ValueError(f"{path} was trained with {key}={getattr(ns, key)}, this model has "
                             f"{key}={getattr(args, key)}")
    # The official --adapter_type "block" also puts an adapter before LLaMA's feed-forward.
    if (getattr(ns, "adapter_type", "attn") == "block") != args.adapter_mlp:
        raise ValueError(f"{path} has adapter_type={getattr(ns, 'adapter_type', None)!r}: build the model "
                         f"with adapter_mlp={not args.adapter_mlp}")
    if getattr(ns, "visual_adapter_type", "router") != "router":
        raise ValueError(f"{path} has visual_adapter_type={ns.visual_adapter_type!r}; this model has the "
                         "paper's mixture-of-modality adapters in CLIP ('router') only")


# ----------------------------------------------------------------------------- presets

# The architectures LaVIN is built in: the LLaMA size and the adapter settings (config.PRESETS, the
# paper's training recipes, says which one each recipe trains).
LLAMA_SIZES = {  # Meta's params.json of each size (vocab from the tokenizer: 32000)
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-6),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, norm_eps=1e-6),
    # LLaMA-3.1-8B's params.json: grouped-query attention, FFN 14336, RoPE scaled
    "llama3.1-8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                             ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
    # Mistral-7B-v0.1's config.json as llama_files.read_hf reads it (the FFN width stated outright)
    "mistral-7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000, multiple_of=14336,
                            norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096),
}
VIT_L14 = dict(resolution=224, patch_size=14, width=1024, layers=24, output_dim=768)
# The adapters follow the LLaMA's width and depth only: the 4096-wide, 32-block backbones train as many
# parameters as LLaMA-7B (grouped-query attention and the vocabulary change none of them).
ARCHITECTURES = {"lavin-7b": ("7B", LaVINArgs(temperature=10.0)), "lavin-13b": ("13B", LaVINArgs(temperature=5.0)),
                 "lavin-llama3-8b": ("llama3.1-8B", LaVINArgs(temperature=10.0)),
                 "lavin-mistral-7b": ("mistral-7B", LaVINArgs(temperature=10.0))}


def build_architecture(name: str, device="meta", args: LaVINArgs | None = None) -> LaVIN:
    """One of ARCHITECTURES built from configs alone (on the meta device: no memory, no files);
    args replaces its adapter settings."""
    size, preset_args = ARCHITECTURES[name]
    with torch.device(device):
        llama = Llama(LLAMA_SIZES[size])
        visual = VisionTransformer(**VIT_L14)
    # Placeholder ids for "Image: " and "Image: N/A": they change no parameter count.
    return LaVIN(args or preset_args, llama, visual, [0] * 3, [0] * 5)


def llama_bytes(args: ModelArgs, bits: int, dtype=torch.bfloat16) -> int:
    """Bytes of a frozen LLaMA of these sizes with its blocks' linear layers at `bits` and the rest
    (embeddings, norms, output head) in dtype: exact, from the config alone (the meta device)."""
    with torch.device("meta"):
        llama = Llama(args).to(dtype)
    quantize_(llama.layers, bits, dtype)
    return held_bytes(llama)


def summary(model: LaVIN) -> str:
    def count(module, trainable=None):
        n = sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
        if trainable is not True:  # quantized weights (LaVIN-lite) are frozen buffers: count the weights they hold
            n += sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, QuantLinear))
        return n

    rows = [("total", count(model)), ("frozen", count(model, False)), ("trainable", count(model, True))]
    parts = {
        "  LLaMA adapters + routers": sum(count(b.adapter_attn) + (count(b.adapter_mlp) if b.adapter_mlp else 0)
                                          for b in model.llama.layers),
        "  CLIP adapters + routers": sum(count(b.adapter_attn) for b in model.visual.transformer.resblocks
                                         if b.adapter_attn is not None),
        "  visual neck (adapter_proj)": count(model.adapter_proj) if model.args.visual else 0,
        "  modality embedding": count(model.adapter_modality_embedding) if model.args.router else 0,
    }
    rows += list(parts.items())
    return "\n".join(f"{k:<32}{v:>16,}" for k, v in rows)
