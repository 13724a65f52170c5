"""demo.py over HTTP: a real server on a free port, the shipped tiny Vicuna and CLIP with random
adapters (the `site` fixture of conftest.py), requests made with the standard library. The page in
a real browser: test_demo_browser.py."""
import base64
import copy
import http.client
import io
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import demo
import sample
from generate import generate
from router import IMAGE, TEXT
from tests.formats import png_header
from tests.helpers import Paced, chat, events, request, serve, user


ROOT = Path(__file__).resolve().parents[1]


def test_streamed_answer_is_sample_pys_greedy_answer(site):
    for image in (site.picture, None):
        tokens, done = chat(site, [user(site.question)], image)
        assert len(tokens) == done["tokens"] >= 2 and "".join(tokens) == done["text"]  # an event per token
        expected = sample.main(sample.SampleConfig(run=str(site.run), image=str(image or ""), prompt=site.question))
        assert done["text"] == expected and done["tokens"] >= 2


def test_jpeg_png_webp_and_a_phones_jpeg_with_two_pictures_are_read(site):
    im = Image.open(site.picture).convert("RGB")
    for fmt, extra in (("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("MPO", {"save_all": True, "append_images": [im]})):
        buf = io.BytesIO()
        im.save(buf, fmt, **extra)
        assert Image.open(io.BytesIO(buf.getvalue())).format == fmt
        status, _, raw = request(site, "POST", "/api/chat", {"image": b64(buf.getvalue()), "messages": [user("a")]})
        assert status == 200 and events(raw)[-1]["done"], (fmt, raw)


def test_follow_up_reads_the_conversation_as_training_wrote_it(site):
    _, first = chat(site, [user(site.question)], site.picture)
    follow = "What is in the picture?"
    tokens, done = chat(site, [user(site.question), {"role": "assistant", "content": first["text"]}, user(follow)],
                        site.picture)
    tok, model = site.demo.tok, site.demo.model
    # training's multi-turn format (data.encode_turns): each turn prompt + answer in one string, EOS after it
    ids = tok.encode(f"Instruction: {site.question}\nResponse:{first['text']}", bos=True, eos=True)
    ids += tok.encode(f"Instruction: {follow}\nResponse:", bos=False, eos=False)
    assert done["positions"] == len(ids) + int(model.inserted(torch.tensor([IMAGE])))
    image = demo.read_picture(Path(site.picture).read_bytes(), "lavin", model.visual.resolution)
    out = generate(model, tok, [ids], image[None], torch.tensor([IMAGE]), max_new_tokens=64)
    assert done["text"] == "".join(tokens) == tok.decode(out[0])


def reference_llama_routes(model, modality) -> list:
    """The routers' formula in float64: the modality token alone through every block (it attends
    only to itself, so attention returns its own value), w = softmax(Linear(RMSNorm(h)) / tau)."""
    def rms(x, w, eps):
        return x / torch.sqrt(x.pow(2).mean() + eps) * w.double()

    def lin(m, x):
        return m.weight.double() @ x + (m.bias.double() if m.bias is not None else 0)

    def up(conv, x):  # a grouped 1x1 convolution as the block-diagonal matrix it is
        blocks = conv.weight.double().unflatten(0, (conv.groups, -1))
        return torch.block_diag(*blocks) @ x + conv.bias.double()

    args, pairs = model.llama.args, []
    h = model.adapter_modality_embedding.weight[modality].double()
    for block in model.llama.layers:
        t = rms(h, block.attention_norm.weight, args.norm_eps)
        ad = block.adapter_attn
        w = torch.softmax(lin(ad.expert_weights, t) / ad.expert_weights.temperature, -1)
        pairs.append(w.tolist())
        down = lin(ad.conv_A, t)
        a = t + ad.scale * (w[0] * up(ad.conv_B, down) + w[1] * up(ad.conv_D, down))
        att = block.attention
        v = lin(att.wv, a).view(args.kv_heads, -1).repeat_interleave(args.n_heads // args.kv_heads, 0).flatten()
        h = h + lin(att.wo, v)
        n = rms(h, block.ffn_norm.weight, args.norm_eps)
        ff = block.feed_forward
        h = h + lin(ff.w2, torch.nn.functional.silu(lin(ff.w1, n)) * lin(ff.w3, n))
    return pairs


def reference_clip_routes(model, image) -> list:
    """Each CLIP block's router on each token's ln_1(x), in float64, averaged over the tokens."""
    visual = copy.deepcopy(model.visual).double()
    x, pairs = visual.embed(image[None].double()), []
    for block in visual.transformer.resblocks:
        r = block.adapter_attn.expert_weights
        w = torch.softmax((block.ln_1(x) @ r.weight.T + r.bias) / r.temperature, -1)  # (1, L, 2)
        pairs.append(w[0].mean(0).tolist())
        x = block.layer(x)
    return pairs


def test_routing_is_the_routers_formula_per_layer(site):
    model = site.demo.model
    _, with_picture = chat(site, [user(site.question)], site.picture)
    _, text_only = chat(site, [user(site.question)])
    image = demo.read_picture(Path(site.picture).read_bytes(), "lavin", model.visual.resolution)
    for done, modality in ((with_picture, IMAGE), (text_only, TEXT)):
        llama = done["routing"]["llama"]
        assert len(llama) == len(model.llama.layers) and "llama_mlp" not in done["routing"]
        assert all(abs(sum(p) - 1) < 1e-6 for p in llama)
        expected = torch.tensor(reference_llama_routes(model, modality), dtype=torch.float64)
        assert torch.allclose(torch.tensor(llama, dtype=torch.float64), expected, atol=1e-5)
    assert with_picture["routing"]["llama"] != text_only["routing"]["llama"]  # the modality token decides
    clip = with_picture["routing"]["clip"]
    assert len(clip) == len(model.visual.transformer.resblocks) and all(abs(sum(p) - 1) < 1e-6 for p in clip)
    expected = torch.tensor(reference_clip_routes(model, image), dtype=torch.float64)
    assert torch.allclose(torch.tensor(clip, dtype=torch.float64), expected, atol=1e-5)
    assert text_only["routing"]["clip"] == []  # no picture: CLIP does not run


def test_info_page_and_example_pictures(site):
    status, kind, raw = request(site, "GET", "/api/info")
    info = json.loads(raw)
    assert (status, kind) == (200, "application/json")
    assert {k: info[k] for k in ("run", "bits", "dataset", "device", "template", "router", "visual")} == \
        {"run": "run", "bits": 16, "dataset": "shapes-chat", "device": "cpu", "template": "instruction", "router": True,
         "visual": True}
    assert len(info["examples"]) == 4 and info["examples"][0]["prompt"] == site.question
    assert "/mme/" in site.picture and site.question.endswith("Please answer yes or no.")  # MME: the run's test
    status, kind, raw = request(site, "GET", info["examples"][0]["url"])
    assert (status, raw) == (200, Path(site.picture).read_bytes()) and kind.startswith("image/")
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=30)
    conn.request("GET", "/")
    res = conn.getresponse()
    page, policy = res.read(), res.getheader("Content-Security-Policy")
    assert res.status == 200 and page == (ROOT / "demo.html").read_bytes()
    assert b"http://" not in page and b"https://" not in page and b"src=\"//" not in page  # nothing from outside
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]


def picture_bytes(fmt) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(buf, fmt)
    return buf.getvalue()


def raw_exchange(site, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", site.port), timeout=30) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: s.recv(65536), b""))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


BAD_CHATS = [  # (body, status, a piece of the message)
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "alternates user and assistant"),
    ({"messages": [user("a"), user("b")]}, 400, "message 1 must be"),
    ({"messages": [user("a"), {"role": "assistant", "content": "b"}]}, 400, "last message must be the user's"),
    ({"messages": [user("  ")]}, 400, "question is empty"),
    ({"messages": [user("a")], "temprature": 1}, 400, "unknown field 'temprature'"),
    ({"messages": [user("a")], "max_new_tokens": 0}, 400, "'max_new_tokens' must be an integer of at least 1"),
    ({"messages": [user("a")], "max_new_tokens": "5"}, 400, "'max_new_tokens' must be"),
    ({"messages": [user("a")], "max_new_tokens": True}, 400, "'max_new_tokens' must be"),
    ({"messages": [user("a")], "temperature": -1}, 400, "'temperature' must be a number from 0 (greedy) to 100"),
    ({"messages": [user("a")], "temperature": 10 ** 400}, 400, "'temperature' must be"),
    ({"messages": [user("a")], "max_new_tokens": 10 ** 400, "seed": 10 ** 400}, 400, "'seed' must be"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),  # nested too deep
    (b'{"seed": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),  # a number too long
    ({"messages": [user("a")], "top_p": 0}, 400, "'top_p' must be a number in (0, 1]"),
    ({"messages": [user("a")], "seed": 2 ** 64}, 400, "'seed' must be"),
    ({"messages": [user("a")], "image": 5}, 400, "'image' must be"),
    ({"messages": [user("a")], "image": "not base64!"}, 400, "not valid base64"),
    ({"messages": [user("a")], "image": b64(b"plain text, no picture")}, 400, "not a picture"),
    ({"messages": [user("a")], "image": b64(picture_bytes("GIF"))}, 400, "a GIF file: send a JPEG, PNG or WebP"),
    ({"messages": [user("a")], "image": b64(picture_bytes("BMP"))}, 400, "a BMP file"),
    ({"messages": [user("a")], "image": b64(picture_bytes("PNG")[:60])}, 400, "the picture is damaged"),
    ({"messages": [user("a")], "image": b64(png_header(10_000, 10_000))}, 400, "decompression-bomb limit"),
    ({"messages": [user("a")], "image": b64(png_header(20_000, 20_000))}, 400, "too large to open safely"),
    ({"messages": [user("word " * 400)]}, 400, "start a new chat"),
]
BAD_PATHS = ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/examples/../../etc/passwd",
             "/examples/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "//etc/passwd", "/demo.py", "/demo.html", "/examples/4",
             "/examples/-1", "/examples/0x0", "/examples/%30", "/api/chat"]


def test_bad_requests_get_their_status_and_a_sentence_and_the_server_goes_on(site):
    for body, status, text in BAD_CHATS:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, kind, answer = request(site, "POST", "/api/chat", raw, {"Content-Type": "application/json"})
        assert (got, kind) == (status, "application/json") and text in json.loads(answer)["error"], (body, answer)
    assert chat(site, [user("a")], max_new_tokens=10 ** 400)[1]["text"]  # as many as the context holds
    for path in BAD_PATHS:
        got, kind, answer = request(site, "GET", path)
        assert (got, kind) == (404, "application/json") and b"root:" not in answer, path
    assert request(site, "POST", "/api/chat", b"{}", {"Content-Type": "text/plain"})[0] == 415
    assert request(site, "POST", "/api/elsewhere", {"messages": [user("a")]})[0] == 404
    assert request(site, "PUT", "/api/chat", {"messages": [user("a")]})[0] == 501
    # a body over 20 MB is refused from its header alone: none of it is sent
    big = b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 20971521\r\n\r\n"
    head, _, answer = raw_exchange(site, big).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 413") and "20 MiB" in json.loads(answer)["error"]
    head, _, answer = raw_exchange(site, big.replace(b"20971521", b"9" * 5000)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 413")
    # a client that sends the whole body before it reads (http.client) still reads the 413, not a reset
    status, _, answer = request(site, "POST", "/api/chat", b"x" * (demo.MAX_BODY + 1), {"Content-Type": "application/json"})
    assert status == 413 and "20 MiB" in json.loads(answer)["error"]
    for host in ("evil.example", "evil.example:7860", "10.0.0.1"):  # DNS rebinding: a loopback server's own names only
        status, _, answer = request(site, "GET", "/api/info", headers={"Host": host})
        assert status == 403 and "localhost only" in json.loads(answer)["error"]
    assert request(site, "GET", "/api/info", headers={"Host": f"localhost:{site.port}"})[0] == 200
    head, _, answer = raw_exchange(site, b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\n\r\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 411") and "Content-Length" in json.loads(answer)["error"]
    head, _, answer = raw_exchange(site, b"GET /a b HTTP/1.1\r\n\r\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400") and "Bad request syntax" in json.loads(answer)["error"]
    tokens, done = chat(site, [user(site.question)], site.picture)  # and the next good one is answered
    assert done["text"] and "".join(tokens) == done["text"]


def wait_for(condition, seconds=20.0):
    until = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < until, "timed out"
        time.sleep(0.02)


def waiting(d) -> int:
    """Requests in line behind the one that holds the model."""
    return max(len(d.line) - 1, 0)


def test_the_line_is_first_come_first_served():
    d = demo.Demo.__new__(demo.Demo)  # the line alone, no model
    d.line, d.counting = [], threading.Lock()
    first, second, third = d.enter(), d.enter(), d.enter()
    assert [e.is_set() for e in (first, second, third)] == [True, False, False]
    d.leave(first)
    late = d.enter()  # a newcomer does not overtake those waiting
    assert [e.is_set() for e in (second, third, late)] == [True, False, False]
    d.leave(third)  # gone while waiting: the one at the head keeps the model
    assert second.is_set() and not late.is_set()
    d.leave(second)
    assert late.is_set() and d.line == [late]
    assert [d.enter() is None for _ in range(demo.QUEUE + 1)] == [False] * demo.QUEUE + [True]


def test_twelve_clients_eight_wait_four_are_turned_away_none_hangs(site):
    d, results = site.demo, []
    body = {"image": b64(Path(site.picture).read_bytes()), "messages": [user(site.question)]}

    def client():
        status, _, raw = request(site, "POST", "/api/chat", body, timeout=120)
        results.append((status, raw))

    held = d.enter()  # the model is busy: every client must queue
    threads = [threading.Thread(target=client) for _ in range(12)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: waiting(d) == demo.QUEUE and len(results) == 12 - demo.QUEUE)
        assert all(s == 503 and "8 requests wait already" in json.loads(r)["error"] for s, r in results)
    finally:
        d.leave(held)
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and d.line == []
    assert all(r.startswith(b": waiting for the model\n\n") for s, r in results if s == 200)  # a comment: skipped
    answered = [events(r)[-1] for s, r in results if s == 200]
    assert len(answered) == demo.QUEUE and len({a["text"] for a in answered}) == 1 and answered[0]["done"]


def raw_chat(port, body: dict, linger=False) -> socket.socket:
    """A connection that has sent a chat request; linger: a close then resets it (RST)."""
    payload = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if linger:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return s


def test_a_client_that_leaves_gives_up_its_place_and_its_generation(site):
    d = site.demo
    held = d.enter()  # in the line, then gone: its place is freed and it never reaches the model
    try:
        s = raw_chat(site.port, {"messages": [user(site.question)]})
        assert s.recv(12) == b"HTTP/1.0 200"
        wait_for(lambda: waiting(d) == 1)
        s.close()
        wait_for(lambda: waiting(d) == 0)
        # reset while its request is being checked: the place it then takes is given back too
        for _ in range(2):
            d.decoding.acquire()  # every check waits
        try:
            s = raw_chat(site.port, {"messages": [user("a")]}, linger=True)
            time.sleep(0.5)  # the server has read the request and waits to check it
            s.close()
        finally:
            d.decoding.release(2)
        time.sleep(0.5)
        wait_for(lambda: waiting(d) == 0)
    finally:
        d.leave(held)
    # during the answer: over a real connection, generation stops at the next token
    server, paced = serve(Paced, d)
    try:
        _, full = chat(types.SimpleNamespace(port=server.server_address[1]), [user(site.question)], site.picture)
        s = raw_chat(server.server_address[1], {"messages": [user(site.question)],
                                                "image": b64(Path(site.picture).read_bytes())})
        got = b""
        while b'data: {"token"' not in got:  # the first piece, then gone
            got += s.recv(4096)
        s.close()
        wait_for(lambda: paced.line == [])
        assert 1 <= len(paced.sent) <= 3 < full["tokens"]  # what was on its way when it left, no more
    finally:
        server.shutdown()
        server.server_close()
    sent, checks = [], []

    def still_there():  # and called directly: the client leaves after two tokens
        checks.append(1)
        return len(checks) <= 2

    job = d.check({"messages": [user(site.question)], "image": b64(Path(site.picture).read_bytes())})
    with pytest.raises(demo.ClientGone):
        d.answer(job, sent.append, still_there)
    assert len(checks) == 3 < full["tokens"] and len(sent) <= 2
    assert chat(site, [user(site.question)])[1]["text"]  # and the server goes on


def test_command_line_serves_until_ctrl_c(site, tmp_path):
    assert demo.is_loopback("127.0.0.1") and demo.is_loopback("::1") and not demo.is_loopback("0.0.0.0")
    assert not demo.is_loopback("localhost")  # a name: it is not looked up
    with pytest.raises(sample.UsageError, match=f"cannot serve on 127.0.0.1:{site.port} \\(--port 0 picks a free"):
        demo.make_server(site.demo, "127.0.0.1", site.port)  # taken
    proc = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), "--run", str(site.run), "--port", "0"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("LaVIN demo of run on http://127.0.0.1:") and "(Ctrl-C stops it)" in line, line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        info = json.loads(request(types.SimpleNamespace(port=port), "GET", "/api/info")[2])
        assert info["run"] == "run"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out == "stopped\n" and "Traceback" not in err, (out, err)


def test_flags_are_checked_before_anything_loads(tmp_path):
    cfg = demo.make_config(["--run", "out/x", "--port", "0", "--temperature", "0.7", "--examples", "2"])
    assert (cfg.run, cfg.port, cfg.temperature, cfg.examples, cfg.host, cfg.max_new_tokens) == \
        ("out/x", 0, 0.7, 2, "127.0.0.1", sample.SampleConfig.max_new_tokens)
    for flags, text in ((["--port", "70000"], "--port must be at most 65535"), (["--port", "-1"], "--port must be"),
                        (["--temperature", "-1"], "--temperature must be at least 0"),
                        (["--top_p", "0"], "--top_p must be in"), (["--max_new_tokens", "0"], "--max_new_tokens")):
        with pytest.raises(sample.UsageError, match=text):
            demo.make_config(flags)
    with pytest.raises(sample.UsageError, match=f"--run {tmp_path}: no adapters.pth there"):
        demo.load(demo.make_config(["--run", str(tmp_path)]))
    with pytest.raises(sample.UsageError, match="give --llama_path and --clip_path, or --run"):
        demo.load(demo.make_config(["--llama_path", str(tmp_path)]))
    with pytest.raises(sample.UsageError, match=r"no trained run under .*: train one with `python train.py --dataset"):
        demo.load(demo.make_config([]), runs=tmp_path)
