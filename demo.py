"""A web page to talk to a trained LaVIN, with its modality routers made visible (paper, sec. 3.2).

    python demo.py --run out/shapes-chat         # then open http://127.0.0.1:7860
    python demo.py --llama_path weights/vicuna-7b --clip_path weights/ViT-L-14.pt --adapters a.pth

    browser ──GET /──────────> demo.html (plain JavaScript and CSS; nothing is fetched from outside)
            ──GET /api/info──> the run: name, bits, dataset, device, example pictures of its test split
            ──POST /api/chat─> {"image": base64 | null, "messages": [{"role", "content"}...], ...}
                                 └─ picture checked and preprocessed, conversation encoded as in training
                                    ─> a queue (8 places) ─> the model, one generation at a time
            <── text/event-stream: data: {"token": "..."} per decoded piece, then
                data: {"done": true, "text": ..., "routing": {"llama": [[w0, w1]...], "clip": [...]}}

The page keeps the conversation and sends it whole; it is encoded as training did (data.encode_turns).
Routing: LLaMA's routers read the modality token (LaVIN.routes), CLIP's each token (LaVIN.clip_routing,
averaged over the picture). w0 weighs up-projection conv_B, w1 conv_D: which path a modality takes is learnt.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import ipaddress
import json
import math
import mimetypes
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import torch
from PIL import Image

import clip
import data
from data.batching import encode_turns
from data.scienceqa import DataError
from generate import Stream, generate
from lavin import LaVIN
from quant import bits_of
from router import IMAGE, TEXT
from runtime import UsageError, busy_cores_note, config_parser, message, pick_dtype, plain_warnings, setup_distributed
from sample import (CHOICES, RUNS, SampleConfig, check_at_least, load_model, read_checkpoint, resolve,
                    templated)

PAGE = Path(__file__).with_name("demo.html")
MAX_BODY = 20 * 2 ** 20  # bytes of a request: a picture of up to 14 MiB, base64 inflates by 4/3
QUEUE = 8  # requests that may wait for the model; one more is refused (503)
FORMATS = ("JPEG", "MPO", "PNG", "WEBP")  # MPO: a JPEG with a second picture in it, as many phones write


@dataclass
class DemoConfig(SampleConfig):
    """sample.py's settings (the weights, the answers' defaults, the machine), and the server's."""
    host: str = "127.0.0.1"  # this machine only; 0.0.0.0 serves every network interface (no login!)
    port: int = 7860  # 0 = a free port (printed)
    examples: int = 6  # example pictures from the run's test split, shown on the page


FLAGS = ("run", "llama_path", "clip_path", "adapters", "template",  # the weights, as sample.py takes them
         "host", "port", "examples",  # the server
         "max_new_tokens", "temperature", "top_p", "seed",  # the page's defaults (a request may ask for others)
         "max_seq_len", "image_mode", "device", "threads", "precision", "bits")  # the machine


def make_config(argv=None) -> DemoConfig:
    p = config_parser(DemoConfig, "A local web page to chat with a trained LaVIN and see its routers.", FLAGS,
                      choices=CHOICES)
    cfg = DemoConfig(**vars(p.parse_args(argv)))
    check_at_least(cfg, {"max_new_tokens": 1, "temperature": 0, "threads": 0, "examples": 0, "port": 0})
    if cfg.port > 65535:
        raise UsageError(f"--port must be at most 65535, got {cfg.port}")
    return cfg


class BadRequest(ValueError):
    """A request the server refuses (400), with one sentence for the user."""


class ClientGone(Exception):
    """The browser went away: its generation stops."""


# ----------------------------------------------------------------------------- the model's side

def read_picture(raw: bytes, mode: str, resolution: int) -> torch.Tensor:
    """A JPEG, PNG or WebP file's bytes -> (3, R, R); Pillow's decompression-bomb limit before decoding."""
    try:
        with clip.open_checked(io.BytesIO(raw)) as im:  # the pixel limit every image read here keeps
            kind = im.format
    except Image.DecompressionBombError as e:
        raise BadRequest(f"the picture is too large to open safely ({e})") from e
    except Exception as e:  # Pillow fails in many ways on what is not a picture
        raise BadRequest("the image is not a picture Pillow can read: send a JPEG, PNG or WebP file") from e
    if kind not in FORMATS:
        raise BadRequest(f"the picture is a {kind} file: send a JPEG, PNG or WebP")
    try:
        return clip.preprocess(clip.load_image(io.BytesIO(raw)), mode=mode, resolution=resolution)
    except ValueError as e:
        raise BadRequest(f"the picture is damaged: {message(e).removeprefix('cannot read image (bytes): ')}") from e


def conversation_ids(tok, template: str, texts: list) -> list:
    """BOS, each past (question, answer) as training encoded it (prompt + answer, EOS), then the new prompt."""
    prompt = partial(templated, template)
    past = list(zip(map(prompt, texts[:-1:2]), texts[1:-1:2]))
    ids = encode_turns(tok, past)[0] if past else []
    return ids + tok.encode(prompt(texts[-1]), bos=not past, eos=False)


class Demo:
    """A loaded model and what the page needs of it: the checks of a request and its answer."""

    def __init__(self, model: LaVIN, tok, settings: SampleConfig, info: dict, examples: list | None = None):
        self.model, self.tok, self.settings = model, tok, settings
        self.examples = examples or []  # [(path, the question to ask about it)]
        keys = ("template", "max_new_tokens", "temperature", "top_p")
        self.info = {**info, **{k: getattr(settings, k) for k in keys}, "max_seq_len": model.llama.args.max_seq_len,
                     "examples": [{"url": f"/examples/{i}", "prompt": q} for i, (_, q) in enumerate(self.examples)]}
        self.line, self.counting = [], threading.Lock()  # the model's line: its head holds the model
        self.decoding = threading.BoundedSemaphore(2)  # pictures decoded at once (one can take 300 MB)

    def check(self, req) -> SimpleNamespace:
        """A request's fields checked, its picture decoded (image: (3, R, R) or None), its conversation
        encoded (ids, taking `positions`): what the model needs, with nothing left to fail on the user's input."""
        s = self.settings
        if not isinstance(req, dict):
            raise BadRequest("the body must be a JSON object")
        known = {"image", "messages", "max_new_tokens", "temperature", "top_p", "seed"}
        if unknown := sorted(set(req) - known):
            raise BadRequest(f"unknown field {unknown[0]!r}: the fields are {', '.join(sorted(known))}")
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"}")
        for i, m in enumerate(msgs):
            role = "user" if i % 2 == 0 else "assistant"
            if not isinstance(m, dict) or m.get("role") != role or not isinstance(m.get("content"), str):
                raise BadRequest(f"message {i} must be {{\"role\": \"{role}\", \"content\": \"...\"}}: the "
                                 f"conversation alternates user and assistant, starting with the user")
        if len(msgs) % 2 == 0:
            raise BadRequest("the last message must be the user's: it is the one to answer")
        if not msgs[-1]["content"].strip():
            raise BadRequest("the question is empty")
        numbers = {}
        for name, kind, default, ok, rule in (
                ("max_new_tokens", int, s.max_new_tokens, lambda v: v >= 1, "an integer of at least 1"),
                ("temperature", float, s.temperature, lambda v: 0 <= v <= 100, "a number from 0 (greedy) to 100"),
                ("top_p", float, s.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]"),
                ("seed", int, s.seed, lambda v: 0 <= v < 2 ** 63, "an integer from 0 to 2**63 - 1")):
            v = req.get(name, default)
            number = (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))
            if not number or (kind is int and isinstance(v, float) and not v.is_integer()) or not ok(v):
                raise BadRequest(f"'{name}' must be {rule}, got {json.dumps(v)[:40]}")
            numbers[name] = kind(v)
        image = req.get("image")
        if image is not None:
            if not isinstance(image, str):
                raise BadRequest("'image' must be the picture file's bytes in base64, or null")
            try:  # a data: URL's header is allowed (what a browser's FileReader gives)
                raw = base64.b64decode(re.sub(r"^data:[^,]*;base64,", "", image), validate=True)
            except binascii.Error as e:
                raise BadRequest("'image' is not valid base64") from e
            image = read_picture(raw, s.image_mode, self.model.visual.resolution)
        ids = conversation_ids(self.tok, s.template, [m["content"] for m in msgs])
        positions = len(ids) + int(self.model.inserted(torch.tensor([image is not None])))
        if positions >= self.model.llama.args.max_seq_len:
            raise BadRequest(f"the conversation takes {positions} positions, the model reads "
                             f"{self.model.llama.args.max_seq_len} at most: start a new chat")
        return SimpleNamespace(ids=ids, image=image, positions=positions, **numbers)

    def enter(self) -> threading.Event | None:
        """A place in line (first come, first served; None if QUEUE wait), set when the model is its own."""
        with self.counting:
            if len(self.line) > QUEUE:
                return None
            self.line.append(threading.Event())
            self.line[0].set()
            return self.line[-1]

    def leave(self, turn: threading.Event):
        with self.counting:
            self.line.remove(turn)
            if self.line:
                self.line[0].set()

    @torch.inference_mode()
    def answer(self, job: SimpleNamespace, send, still_there) -> dict:
        """Generate (holding the model): each decoded piece to send(str) as it comes; stops (ClientGone)
        once still_there() says the client left. Returns the done event's fields."""
        model, device = self.model, self.model.llama.tok_embeddings.weight.device
        ind = torch.tensor([IMAGE if job.image is not None else TEXT], device=device)
        stream = Stream(self.tok, send)

        def on_token(row, ids):
            if not still_there():
                raise ClientGone
            stream(row, ids)

        g, room = torch.Generator(device).manual_seed(job.seed), model.llama.args.max_seq_len - job.positions
        t0 = time.perf_counter()
        with model.clip_routing() as seen:
            out = generate(model, self.tok, [job.ids], None if job.image is None else job.image[None].to(device), ind,
                           min(job.max_new_tokens, room), job.temperature, job.top_p, generator=g, on_token=on_token)
        seconds = time.perf_counter() - t0
        stream(0, out[0], final=True)  # what was held back: the answer ended inside a character
        routes = model.routes(ind, 1, device, model.llama.tok_embeddings.weight.dtype)
        routes = [] if isinstance(routes, str) else routes  # ONE_PATH or NO_ADAPTERS: no router chose
        routing = {"llama": [w[0, 0].tolist() for w, _ in routes],
                   "clip": [w[0].float().mean(0).tolist() for w in seen]}  # (L, 2): the mean over tokens
        if any(w is not None for _, w in routes):  # the "block" variant: adapters before the FFN too
            routing["llama_mlp"] = [w[0, 0].tolist() for _, w in routes]
        return {"text": self.tok.decode(out[0]), "routing": routing, "tokens": len(out[0]),
                "positions": job.positions, "seconds": round(seconds, 3)}


def example_pictures(run: str, tok, model: LaVIN, n: int, template: str) -> tuple[list, str]:
    """([(picture path, its question)] of up to n pictures of the run's test split, a note if none)."""
    if not run or n == 0:
        return [], ""
    try:
        cfg, _ = resolve(SampleConfig(run=run))  # the run's evaluation: its dataset, data and split
        task = data.evaluation(cfg.dataset, cfg.data_path, cfg.split, tok, prompt_format=cfg.prompt_format,
                               resolution=model.visual.resolution)
    except (UsageError, DataError, OSError, ValueError) as e:
        return [], f"no example pictures: the run's test split cannot be read ({message(e)})"
    found = {}  # picture -> its first question
    for s in task.dataset.samples:
        if s.image and s.image not in found and len(found) < n:
            question = s.turns[0][0]
            if template == "instruction":  # the page sends what the user types; the server adds the template
                question = question.removeprefix("Instruction: ").removesuffix("\nResponse:")
            found[s.image] = question
    return list(found.items()), "" if found else f"no example pictures: the {cfg.dataset} test split has none"


def load(cfg: DemoConfig, runs=RUNS) -> Demo:
    """The model and the page's facts, as sample.py --run loads them (without --run: the newest under runs)."""
    settings, _ = resolve(dataclasses.replace(cfg, chat=True), runs)
    _, _, device = setup_distributed(settings.device)
    if note := busy_cores_note(device, settings.threads):
        print(f"note: {note}", file=sys.stderr)
    torch.manual_seed(settings.seed)
    ckpt = read_checkpoint(settings.adapters) if settings.adapters else {}  # read once, for the model and its run
    model, tok = load_model(settings, device, pick_dtype(settings.precision, device), ckpt or None)
    trained = ckpt.get("config") or {}
    examples, note = example_pictures(settings.run, tok, model, cfg.examples, settings.template)
    if note:
        print(f"note: {note}", file=sys.stderr)
    name = Path(settings.run or settings.adapters).name if settings.run or settings.adapters else "untrained"
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    info = {"run": name, "bits": bits_of(model.llama), "dataset": trained.get("dataset", ""),
            "device": f"{device}{gpu}", "router": model.args.router, "visual": model.args.visual}
    return Demo(model, tok, settings, info, examples)


# ----------------------------------------------------------------------------- the server

def page_and_policy() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy: only its own script runs (by hash), and it reaches only here."""
    page = PAGE.read_bytes()
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.S)
    scripts = [s.replace(b"\r\n", b"\n").replace(b"\r", b"\n") for s in scripts]  # as a browser reads them
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'" for s in scripts)
    policy = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
              f"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, policy


class Handler(BaseHTTPRequestHandler):
    """GET / (the page), /api/info, /examples/N; POST /api/chat; anything else is a 404. No request path
    is joined to a folder: the files served are the page and the examples, by number in a fixed list."""

    server_version = "LaVIN-demo"
    timeout = 60  # seconds a client may stall mid-request before its thread is freed

    def __init__(self, *args, demo: Demo, page: tuple[bytes, str], **kwargs):
        self.demo, (self.page, self.policy) = demo, page
        super().__init__(*args, **kwargs)  # handles the request

    def send_head(self, status: int, kind: str, headers: dict | None = None):
        self.send_response(status)
        for key, value in {"Content-Type": kind, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
                           **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()

    def send_body(self, status: int, body: bytes, kind: str, headers: dict | None = None):
        self.send_head(status, kind, {"Content-Length": str(len(body)), **(headers or {})})
        self.wfile.write(body)

    def send_json(self, status: int, obj: dict):
        self.send_body(status, json.dumps(obj).encode(), "application/json")

    def send_error(self, code, message=None, explain=None):  # the standard library's refusals, as JSON too
        self.close_connection = True
        self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def log_request(self, code="-", size="-"):  # refusals only: do_POST logs each answer
        if str(code)[:1] in ("4", "5"):
            self.log(f'"{self.requestline[:200]}" {int(code)}')

    def log(self, text: str):
        text = re.sub(r"[\x00-\x1f\x7f]", "?", text)  # a request line may carry terminal escapes
        print(f"{time.strftime('%H:%M:%S')} {self.client_address[0]} {text}", file=sys.stderr, flush=True)

    def parse_request(self) -> bool:
        """The standard checks; on loopback, loopback names only (a page rebinding its DNS name gets a 403)."""
        if not super().parse_request():
            return False
        name = re.sub(r":[0-9]*$", "", self.headers.get("Host", "localhost")).strip("[]")
        if self.server.loopback and name != "localhost" and not is_loopback(name):
            self.send_json(403, {"error": f"this server answers to localhost only, not to {name[:100]!r}"})
            return False
        return True

    def not_found(self):
        self.send_json(404, {"error": "not found: this server serves the page, /api/info, /api/chat and examples only"})

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/":
            self.send_body(200, self.page, "text/html; charset=utf-8", {"Content-Security-Policy": self.policy})
        elif path == "/api/info":
            self.send_json(200, self.demo.info)
        elif (m := re.fullmatch(r"/examples/([0-9]{1,4})", path)) and int(m[1]) < len(self.demo.examples):
            file = self.demo.examples[int(m[1])][0]
            try:
                self.send_body(200, Path(file).read_bytes(), mimetypes.guess_type(file)[0] or "image/jpeg")
            except FileNotFoundError:
                self.send_json(410, {"error": "this example picture is gone from the disk"})
        else:
            self.not_found()

    def still_there(self) -> bool:
        """Whether the client still listens: a closed connection reads as end of file."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return not readable or self.connection.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def event(self, obj: dict | None):
        """A server-sent event; None: a comment line (clients skip those) saying the request waits."""
        line = b": waiting for the model" if obj is None else b"data: " + json.dumps(obj).encode()
        try:
            self.wfile.write(line + b"\n\n")
        except OSError as e:  # a broken pipe, a reset connection
            raise ClientGone from e

    def do_POST(self):
        if urlsplit(self.path).path != "/api/chat":
            return self.not_found()
        length = self.headers.get("Content-Length", "")
        if not length.isascii() or not length.isdigit():
            return self.send_json(411, {"error": "send the request with a Content-Length"})
        if len(length) > 9 or int(length) > MAX_BODY:  # refused before a byte of it is read
            self.send_json(413, {"error": f"the request is over {MAX_BODY // 2 ** 20} MiB: send a smaller picture"})
            return self.discard()
        if self.headers.get_content_type() != "application/json":  # and so no cross-site form can post here
            return self.send_json(415, {"error": "send the request as application/json"})
        try:
            req = json.loads(self.rfile.read(int(length)))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep, a number too long
            return self.send_json(400, {"error": "the request body is not valid JSON"})
        try:
            with self.demo.decoding:
                job = self.demo.check(req)
        except BadRequest as e:
            return self.send_json(400, {"error": str(e)})
        turn = self.demo.enter()
        if turn is None:
            return self.send_json(503, {"error": f"the model is busy: {QUEUE} requests wait already; try again soon"})
        try:
            self.send_head(200, "text/event-stream; charset=utf-8")
            self.close_connection = True  # the stream ends with the connection
            if not turn.is_set():
                self.event(None)
            while not turn.wait(0.2):
                if not self.still_there():
                    return self.log("left while waiting for the model")
            done = self.demo.answer(job, lambda piece: self.event({"token": piece}), self.still_there)
            self.event({"done": True, **done})
            self.log(f"answered: {done['tokens']} tokens after {done['positions']} positions in {done['seconds']} s")
        except (ClientGone, OSError):
            self.log("left: its answer stopped")
        except Exception as e:  # the model failed: the client hears it, the log has the traceback
            traceback.print_exc()
            with suppress(ClientGone):
                self.event({"error": f"the model failed: {type(e).__name__}: {message(e)}"})
        finally:
            self.demo.leave(turn)

    def discard(self):
        """Drop what a refused client still sends (64 MiB, 1 s idle at most): it reads the refusal, not a reset."""
        self.close_connection = True
        self.connection.settimeout(1)
        with suppress(OSError):
            for _ in range(1024):
                if not self.rfile.read1(1 << 16):
                    break


class Server(ThreadingHTTPServer):
    daemon_threads = True  # an answer still streaming does not hold up Ctrl-C

    def __init__(self, address, handler):
        self.address_family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0][0]  # IPv4 or IPv6
        super().__init__(address, handler)
        self.loopback = is_loopback(self.server_address[0])


def make_server(demo: Demo, host: str = "127.0.0.1", port: int = 0) -> Server:
    """The server (bound, not yet serving) of a Demo."""
    try:
        return Server((host, port), partial(Handler, demo=demo, page=page_and_policy()))
    except OSError as e:
        free = " (--port 0 picks a free one)" if port else ""
        raise UsageError(f"cannot serve on {host}:{port}{free}: {e.strerror or e}") from e


def is_loopback(address: str) -> bool:
    """Whether an IP address (not a name: that would ask the DNS) is a loopback one."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def main(cfg: DemoConfig):
    demo = load(cfg)
    server = make_server(demo, cfg.host, cfg.port)
    port = server.server_address[1]
    if not server.loopback:
        print(f"warning: --host {cfg.host}: anyone who can reach this machine's port {port} can use the model and "
              f"read its answers; there is no login", file=sys.stderr)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host  # an IPv6 address in a URL
    print(f"LaVIN demo of {demo.info['run']} on http://{host}:{port}  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    plain_warnings()
    try:
        main(make_config())
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while the process exits: no traceback
        print("\nstopped" if sys.stdout.isatty() else "stopped", flush=True)  # a terminal has echoed ^C: a new line
    except (UsageError, FileNotFoundError, DataError) as e:
        sys.exit(f"error: {message(e)}")
