"""The tests' shared builders (their fixtures: conftest.py). No test module imports another.

  checkpoints  tiny LLaMA / CLIP / adapter files: LaVIN's released adapters here, the backbones'
               official layouts in formats.py, so the loaders under test are the ones that read real files
  models       tiny_args (the one tiny ModelArgs), tiny_lavin, random_lavin, scripted_lavin, lite
  data         a mini ScienceQA release, the Karpathy split, the shapes set's files
  runs         train.py configs and command lines; demo.py's HTTP client
"""
import argparse
import base64
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types
import warnings
from collections import Counter
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image

import demo
import quant
from clip import VisionTransformer
from config import PRESETS
from data.captions import tokenize
from lavin import IGNORE_INDEX, LaVIN, LaVINArgs
from model import Llama, ModelArgs
from router import IMAGE, TEXT
from train import TrainConfig


TOKENIZER_TEXT = """The quick brown fox jumps over the lazy dog.
Question: Which animal is faster? Context: N/A Options: (A) fox (B) dog Response:
The answer is A. BECAUSE: foxes run faster than lazy dogs.
Image: N/A Instruction: describe the picture. Response: a cat sits on a mat.
LLaMA reads text; LaVIN teaches it to see through CLIP with tiny adapters.
""" * 20


def train_tokenizer(path: Path, vocab_size: int = 320) -> Path:
    """A real sentencepiece model with LLaMA's ids: unk 0, BOS 1, EOS 2, no pad."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_TEXT.splitlines()), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def random_state(args, seed: int = 0) -> dict:
    """Meta-named weights of a LLaMA with the given ModelArgs, at a scale that keeps logits lively."""
    from model import Llama

    torch.manual_seed(seed)
    model = Llama(args)
    state = {}
    for k, v in model.state_dict().items():
        state[k] = (1 + 0.1 * torch.randn_like(v)) if k.endswith("norm.weight") else torch.randn_like(v) * 0.1
    return state


def write_chat_run(folder: Path, chat_set: Path, seed: int = 0, std: float = 0.05) -> Path:
    """A train.py output folder of the shapes-chat preset over the shipped tiny Vicuna and CLIP
    (adapters.pth with the run's config). The adapters are random where training would have moved
    them (up-projections, routers, modality tokens): they change the answers and the routing
    differs between layers, tokens and modalities."""
    from data import shapes
    from lavin import LaVINArgs, load_lavin, save_adapters

    llama, clip_path = shapes.BACKBONES / "vicuna", shapes.BACKBONES / "clip" / "ViT-tiny.pt"
    model, _ = load_lavin(llama, clip_path, LaVINArgs(), max_seq_len=256)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in (".conv_B.", ".conv_D.", ".expert_weights.", "modality_embedding")):
                p.normal_(0, std if ".conv_" in name else 1.0, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(dataset="shapes-chat", llama_path=str(llama), clip_path=str(clip_path), data_path=str(chat_set),
                  max_seq_len=256, image_mode="lavin", threads=1, bits=16)
    save_adapters(folder / "adapters.pth", model, config=config, step=1)
    return folder


def official_checkpoint(model, dim=64, width=64, hidden=8, groups=2, seed=3, args=None):
    """The released layout: DDP names, Conv1d kernels (out, in/groups, 1), a pickled Namespace."""
    g = torch.Generator().manual_seed(seed)

    def adapter(prefix, d):
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        return {f"{prefix}.conv_A.weight": r(hidden, d, 1), f"{prefix}.conv_A.bias": r(hidden),
                f"{prefix}.conv_B.weight": r(d, hidden // groups, 1), f"{prefix}.conv_B.bias": r(d),
                f"{prefix}.conv_D.weight": r(d, hidden // groups, 1), f"{prefix}.conv_D.bias": r(d),
                f"{prefix}.expert_weights.weight": r(2, d), f"{prefix}.expert_weights.bias": r(2)}

    state = {}
    for i in range(2):
        state.update(adapter(f"module.layers.{i}.adapter_attn", dim))
    for i in range(8):
        state.update(adapter(f"module.backbone.visual.transformer.resblocks.{i}.adapter_attn", width))
    state.update({"module.adapter_proj.conv_A.weight": torch.randn(128, width, generator=g),
                  "module.adapter_proj.conv_A.bias": torch.randn(128, generator=g),
                  "module.adapter_proj.conv_B.weight": torch.randn(dim, 128, generator=g),
                  "module.adapter_proj.conv_B.bias": torch.randn(dim, generator=g),
                  "module.adapter_modality_embedding.weight": torch.randn(2, dim, generator=g)})
    ns = args or argparse.Namespace(adapter_dim=hidden, temperature=10.0, hidden_proj=128,
                                    adapter_type="attn", visual_adapter_type="router",
                                    adapter_scale=1.0, llm_model="7B", max_seq_len=512)
    return {"model": state, "epoch": 19, "args": ns}


# ----------------------------------------------------------------------------- tiny models

def tiny_args(**kw) -> ModelArgs:
    """The tests' tiny LLaMA config: 2 blocks of 64, 4 heads sharing 2 key/value heads, the 320
    pieces of train_tokenizer's vocabulary; kw changes any field."""
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32, norm_eps=1e-5)
    return ModelArgs(**{**base, **kw})


PREFIX_IMG, PREFIX_TXT = [7, 8, 9], [7, 8, 10, 11]  # stand-ins for "Image: " / "Image: N/A"


def tiny_lavin(seed=0, randomize_adapters=True, **kw):
    torch.manual_seed(seed)
    args = tiny_args(vocab_size=50)
    llama = Llama(args)
    llama.load_state_dict(random_state(args, seed))
    visual = VisionTransformer(resolution=32, patch_size=8, width=64, layers=8, output_dim=16)
    model = LaVIN(LaVINArgs(**kw), llama, visual, PREFIX_IMG, PREFIX_TXT)
    if randomize_adapters:  # zero-initialised up-projections would hide every routing effect
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adapter" in name and (".conv_B." in name or ".conv_D." in name):
                    p.normal_(0, 0.3)
    return model.eval()


def batch(B=3, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(13, 50, (B, T), generator=g)
    tokens[:, 0] = 1  # BOS
    images = torch.randn(B, 3, 32, 32, generator=g)
    ind = torch.tensor([1, 0, 1][:B])
    labels = tokens.clone()
    labels[:, :3] = IGNORE_INDEX  # the prompt
    return tokens, images, ind, labels


def lite(bits, **kw):
    model = tiny_lavin(seed=0, **kw)
    quant.quantize_(model.llama.layers, bits)
    return model


def finish(model, tok, seed=0, clip_layers=8, **lavin_args):
    """LaVIN around a LLaMA, with a tiny random CLIP and adapters that do something."""
    torch.manual_seed(seed)
    visual = VisionTransformer(resolution=32, patch_size=8, width=64, layers=clip_layers, output_dim=16)
    model = LaVIN(LaVINArgs(**lavin_args), model, visual, tok.encode("Image: ", bos=False, eos=False),
                  tok.encode("Image: N/A", bos=False, eos=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised up-projections and lukewarm routers would hide the routing
        for name, p in model.named_parameters():
            if "adapter" in name and (".conv_B." in name or ".conv_D." in name or ".expert_weights." in name):
                p.normal_(0, 0.5, generator=g)
    return model.eval()


def random_lavin(tok, seed=0, max_seq_len=256, n_layers=2, clip_layers=12, **lavin_args):
    args = tiny_args(n_layers=n_layers, vocab_size=tok.n_words, max_seq_len=max_seq_len)
    llama = Llama(args)
    llama.load_state_dict(random_state(args, seed))
    # 3 visual tokens: "Image: " + 3 is one longer than "Image: N/A", so text rows end in padding
    return finish(llama, tok, seed, clip_layers, **lavin_args)


def scripted_lavin(tok, content, big=60.0, g=30.0, seed=3):
    """A LLaMA wired by hand. Embeddings: dims 0..63 for every token (the bigram), dims 64..127 only
    for `content` tokens (the words that differ between problems). Attention (q = k = 0: uniform)
    writes the mean content of the context into dims 128..191; the FFN is off. The output reads the
    bigram ":" -> "The" -> "▁answer" -> "▁is" -> "▁" -> A|B|C|D -> "." -> "▁" ..., D -> EOS, off dims
    0..63; the letters also read dims 128..191, which breaks their tie by the problem's content."""
    gen = torch.Generator().manual_seed(seed)
    V, D, H = tok.n_words, 192, 64
    args = ModelArgs(dim=D, n_layers=1, n_heads=4, vocab_size=V, multiple_of=32, max_seq_len=256)
    llama = Llama(args)
    sd = {k: (torch.ones_like(v) if k.endswith("norm.weight") else torch.zeros_like(v))
          for k, v in llama.state_dict().items()}
    E = torch.zeros(V, D)
    E[:, :H] = torch.randn(V, H, generator=gen)
    E[content, H:2 * H] = torch.randn(len(content), H, generator=gen)
    E *= D ** 0.5 / E.norm(dim=1, keepdim=True)  # RMS 1: RMSNorm leaves a lone embedding as it is
    sd["tok_embeddings.weight"] = E
    sd["layers.0.attention.wv.weight"][H:2 * H, H:2 * H] = torch.eye(H)
    sd["layers.0.attention.wo.weight"][2 * H:, H:2 * H] = torch.randn(H, H, generator=gen) / H ** 0.5
    W, piece = sd["output.weight"], tok.sp.piece_to_id

    def link(x, y):  # the logit of y is `big` right after x
        W[y, :H] += big * E[x, :H] / E[x, :H].pow(2).sum()

    chain = [piece(p) for p in (":", "The", "▁answer", "▁is", "▁")]
    for a, b in zip(chain, chain[1:]):
        link(a, b)
    for letter in "ABCD":
        link(piece("▁"), piece(letter))
        W[piece(letter), 2 * H:] = g * F.normalize(torch.randn(H, generator=gen), dim=0)
        link(piece(letter), tok.eos_id if letter == "D" else piece("."))
    link(piece("."), piece("▁"))
    llama.load_state_dict(sd)
    return finish(llama, tok, seed)


def content_tokens(tok, prompts):
    """Tokens found in fewer than a third of the prompts: what tells one problem from another."""
    seen = Counter(t for p in prompts for t in set(tok.encode(p, bos=False, eos=False)))
    return sorted(t for t, n in seen.items() if n < len(prompts) / 3)


def rows(tok, seed=1, lengths=(5, 12, 3, 8)):
    """Prompts of different lengths (BOS + random ids), images, and an image/text mix."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[tok.bos_id] + torch.randint(3, tok.n_words, (n,), generator=g).tolist() for n in lengths]
    images = torch.randn(len(lengths), 3, 32, 32, generator=g)
    ind = torch.tensor([IMAGE, TEXT, IMAGE, TEXT][: len(lengths)])
    return prompts, images, ind


def eos_is(tok, eos):
    return types.SimpleNamespace(eos_id=eos, stop_ids={eos}, bos_id=tok.bos_id, decode=tok.decode)


# ----------------------------------------------------------------------------- data

R = 16  # image side in these tests: small and fast


def problem(question, choices, answer, hint="", image=None, subject="natural science", grade="grade3",
            lecture="", solution="", split="train"):
    return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
            "task": "closed choice", "grade": grade, "subject": subject, "topic": "t", "category": "c",
            "skill": "s", "lecture": lecture, "solution": solution, "split": split}


# (pid, subject, hint, has image, grade, answer, n choices) of the test split, for the table
TEST_ROWS = [
    ("t1", "natural science", "", True, 2, 0, 3), ("t2", "natural science", "h", False, 8, 1, 2),
    ("t3", "natural science", "", True, 9, 1, 2), ("t4", "natural science", "h", True, 4, 0, 2),
    ("t5", "natural science", "", False, 3, 2, 3), ("t6", "social science", "h", True, 5, 2, 3),
    ("t7", "social science", "h", False, 11, 0, 2), ("t8", "social science", "", False, 6, 1, 2),
    ("t9", "language science", "", False, 7, 1, 2), ("t10", "language science", "h", False, 12, 0, 2),
    ("t11", "language science", "", True, 10, 0, 2), ("t12", "language science", "", False, 1, 1, 2),
]


def write_png(path, rgb, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)


def write_release(root):
    """A mini ScienceQA in the official layout: image and text-only problems, captions."""
    problems = {
        "101": problem("What  color is the square?", ["red", "blue"], 0, image="image.png",
                       lecture="Colors  are everywhere.\nLook closely.", solution="The square is red."),
        "102": problem("Who has a dog?", ["Tom", "Ana", "Leo"], 0, hint="Tom has a dog.",
                       subject="social science", grade="grade8"),
        "103": problem("Which place is on the map?", ["Oak", "Pine", "Elm", "Ash"], 3, image="image.png",
                       hint="The picture shows a map.", subject="language science", grade="grade10",
                       lecture="Maps show places.", solution="The map shows Ash."),
        "104": problem("Which word is a noun?", ["run", "dog"], 1, lecture="A noun names a thing.",
                       solution="Dog names an animal.\nSo dog is a noun.", subject="language science"),
        "201": problem("What shape is it?", ["circle", "square"], 1, image="image.png", split="val",
                       solution="It has four sides."),
    }
    for pid, subject, hint, img, grade, answer, n in TEST_ROWS:
        problems[pid] = problem(f"Question {pid}?", [f"c{i}" for i in range(n)], answer, hint=hint,
                                image="image.png" if img else None, subject=subject,
                                grade=f"grade{grade}", split="test")
    splits = {"train": ["101", "102", "103", "104"], "val": ["201"], "test": [r[0] for r in TEST_ROWS],
              "trainval": ["101", "102", "103", "104", "201"], "minival": ["201"]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems, indent=1))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    (root / "captions.json").write_text(json.dumps({"captions": {"101": "A red square.", "103": "A map."}}))
    for pid, p in problems.items():
        if p["image"]:
            write_png(root / "images" / p["split"] / pid / "image.png", (200, 30 * len(pid), 40))
    return root


def edit_json(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def write_karpathy(root: Path) -> Path:
    entries = [("val2014", 1, "test", ["A red circle.", "a  red circle"]), ("val2014", 2, "test", ["A blue square."]),
               ("train2014", 3, "train", ["A green star.", "A star, green."]), ("val2014", 4, "restval", ["Two cats."]),
               ("val2014", 5, "val", ["A dog."])]
    images = []
    for folder, cocoid, split, sents in entries:
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(root / folder / name)
        images.append({"filepath": folder, "filename": name, "split": split, "cocoid": cocoid, "imgid": cocoid,
                       "sentences": [{"raw": s, "tokens": tokenize(s)} for s in sents]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


N = 60  # >= 54 (18 groups of subject x modality x grade band, 3 splits): every column everywhere


def read(root: Path, name: str):
    return json.loads((root / name).read_text())


def file_bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- runs

ROOT = Path(__file__).resolve().parents[1]


def config(tiny_set, out, **kw) -> TrainConfig:
    """The shapes preset, shrunk: 24 training samples, 3 steps of 8 per epoch."""
    base = dict(PRESETS["shapes"].flags, preset="shapes", data_path=str(tiny_set), output_dir=str(out), epochs=2,
                batch_size=4, effective_batch=8, skip_eval=True)
    return TrainConfig(**{**base, **kw})


def losses(out: Path) -> list:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "step" in r]


def run_cli(*args, nproc=0, timeout=120):
    cmd = [sys.executable, "train.py", *args] if not nproc else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", "train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def run_two(out: Path, *args):
    """train.py under torchrun with 2 Gloo processes into out, which must succeed. torchrun's launch
    failed once in ~10 suite runs: it gets one more try, and so does a process that aborted on its
    way out of a run that had finished (a C++ terminate at exit: rarer since train.drop_ddp, not
    gone, its cause not found), each with a warning that shows what happened."""
    r = run_cli(*args, "--output_dir", str(out), nproc=2)
    if r.returncode != 0:
        warnings.warn(f"torchrun failed, retrying once:\n{r.stderr[-3000:]}")  # and show why
        shutil.rmtree(out, ignore_errors=True)
        r = run_cli(*args, "--output_dir", str(out), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]


def request(site, method, path, body=None, headers=None, timeout=60):
    """(status, content type, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=timeout)
    if isinstance(body, dict):
        body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body, headers or {})
    res = conn.getresponse()
    out = res.status, res.getheader("Content-Type"), res.read()
    conn.close()
    return out


def events(body: bytes) -> list:
    """The data of each server-sent event, comments left out."""
    return [json.loads(block[len("data: "):]) for block in body.decode().split("\n\n")
            if block.startswith("data: ")]


def chat(site, messages, image=None, **fields):
    """(the stream's tokens, the done event) of one answer."""
    body = {"image": base64.b64encode(Path(image).read_bytes()).decode() if image else None,
            "messages": messages, **fields}
    status, kind, raw = request(site, "POST", "/api/chat", body)
    assert (status, kind) == (200, "text/event-stream; charset=utf-8"), raw
    evs = events(raw)
    assert evs[-1]["done"] and all(set(e) == {"token"} for e in evs[:-1])
    return [e["token"] for e in evs[:-1]], evs[-1]


def user(text):
    return {"role": "user", "content": text}


class Paced(demo.Demo):
    """The real model, its pieces sent 0.1 s apart (the tiny model answers in milliseconds), each
    one also kept in `sent`."""

    def answer(self, job, send, still_there):
        self.sent = []
        return super().answer(job, lambda piece: (time.sleep(0.1), self.sent.append(piece), send(piece)), still_there)


def serve(kind, d: demo.Demo):
    """Another server over the same model, with a Demo of another kind."""
    other = kind(d.model, d.tok, d.settings, d.info, d.examples)
    server = demo.make_server(other)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, other
