"""Check the server's page at ``/`` in a real headless browser and take the screenshot in docs/inference.md.

Starts ``imglish serve`` on a free loopback port with tiny random-weight checkpoints (a VQA model and a retrieval
model, made here), opens the page in Debian's headless chromium, and drives it through the Chrome DevTools
Protocol as a person would: picks the zero-shot tab, puts an image into the file input, types labels, presses Run,
waits for the answer and checks that the page shows a row per label; then saves a PNG of the window. Exits 1 with
the reason when the page does not work.

Needs chromium (``apt install chromium``) and ``pip install websocket-client`` (for the DevTools socket; not a
dependency of imglish).

    python tools/serve_page_screenshot.py --out docs/images/serve-page.png
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("a photo of the red blue green small large dog cat ball cube circle square on under next to two three "
         "what colour is how many there are").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, what: str, log: Path, seconds: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    sys.exit(f"{what} did not answer {url} within {seconds:.0f} s")


def make_checkpoints(root: Path) -> list[Path]:
    import torch

    import imglish
    from imglish.tokenizers.processor import Processor
    from imglish.tokenizers.text import TextTokenizer, train_sentencepiece
    from imglish.tokenizers.transforms import TransformConfig

    rng = np.random.default_rng(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS, size=8)) for _ in range(500)) + "\n")
    tok = TextTokenizer(train_sentencepiece([corpus], vocab_size=80, output=root / "spm.model", model_type="bpe",
                                            seed=0))
    out = []
    for name, task, transform, kw, state in (
        ("beit3_tiny_patch16_224_vqav2", "vqav2", "vqav2", {"num_classes": 4},
         {"answers": ["red", "blue", "two", "yes"]}),
        ("beit3_tiny_patch16_224_retrieval", "coco_retrieval", "retrieval", {}, {}),
    ):
        torch.manual_seed(0)
        model = imglish.create_model(name, img_size=64, vocab_size=len(tok), depth=2, **kw)
        proc = Processor(tok, TransformConfig.for_task(transform, 64), max_length=32)
        path = imglish.save_model(model.eval(), root / name / "model.safetensors", processor=proc)
        (path.parent / "task.json").write_text(json.dumps({"task": task, "state": state}))
        out.append(path)
    return out


def photo(path: Path) -> Path:
    """A smooth, photo-like 320x240 picture (a red disc on a blue-green gradient)."""
    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    img = np.stack([40 + 60 * xx / 320, 90 + 80 * yy / 240, 160 + 40 * xx / 320], -1)
    disc = (xx - 180) ** 2 + (yy - 120) ** 2 < 60 ** 2
    img[disc] = (215, 40, 35)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    return path


class DevTools:
    """The few Chrome DevTools Protocol calls this needs, over one websocket."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60)
        self.n = 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/images/serve-page.png")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="serve_page_") as tmp:
        root = Path(tmp)
        ckpts = make_checkpoints(root)
        image = photo(root / "photo.png")
        port, dbg = free_port(), free_port()
        log = root / "server.log"
        cmd = [sys.executable, "-m", "imglish.cli.main", "serve", "--port", str(port), "--device", "cpu"]
        for c in ckpts:
            cmd += ["--checkpoint", str(c)]
        with open(log, "w") as fh:
            server = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        browser = None
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_http(url + "health", server, "imglish serve", log)
            blog = root / "chromium.log"
            with open(blog, "w") as fh:
                browser = subprocess.Popen(
                    [args.chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={dbg}",
                     f"--user-data-dir={root / 'profile'}", "--window-size=1200,720", "about:blank"],
                    stdout=fh, stderr=subprocess.STDOUT)
            wait_http(f"http://127.0.0.1:{dbg}/json/version", browser, "chromium", blog, 60)
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{dbg}/json/list") as r:
                page = next(t for t in json.load(r) if t["type"] == "page")
            dt = DevTools(page["webSocketDebuggerUrl"])
            dt.call("Page.enable")
            dt.call("DOM.enable")
            dt.call("Emulation.setDeviceMetricsOverride", width=1200, height=720, deviceScaleFactor=1, mobile=False)
            dt.call("Page.navigate", url=url)
            for _ in range(100):
                if dt.js("document.readyState") == "complete" and dt.js("document.querySelectorAll('nav button').length"):
                    break
                time.sleep(0.1)
            tabs = dt.js("[...document.querySelectorAll('nav button')].map(b => [b.textContent, b.disabled])")
            enabled = sorted(t for t, off in tabs if not off)
            if enabled != sorted(["VQA", "Zero-shot", "Embed image", "Embed text"]):
                sys.exit(f"the page's tabs are wrong: {tabs}")
            dt.js("[...document.querySelectorAll('nav button')].find(b => b.textContent === 'Zero-shot').click()")
            doc = dt.call("DOM.getDocument")["root"]["nodeId"]
            node = dt.call("DOM.querySelector", nodeId=doc, selector="#f-image")["nodeId"]
            dt.call("DOM.setFileInputFiles", files=[str(image)], nodeId=node)
            dt.js("document.getElementById('f-image').dispatchEvent(new Event('change'))")
            dt.js("document.getElementById('f-labels').value = 'red ball,blue sky,green tree,dog'")
            dt.js("document.querySelector('button.go').click()")
            rows = 0
            for _ in range(200):
                rows = dt.js("document.querySelectorAll('#out table tr').length")
                if rows or dt.js("!!document.querySelector('#out .err')"):
                    break
                time.sleep(0.1)
            if rows != 4:
                shown = dt.js("document.getElementById('out').innerText")
                sys.exit(f"the page did not show the answer: {shown}")
            time.sleep(0.3)  # let the preview image paint
            shot = dt.call("Page.captureScreenshot", format="png")["data"]
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot))
            print(f"the page answered with {rows} rows; wrote {out}")
        finally:
            for p in (browser, server):
                if p is not None:
                    p.terminate()
                    try:
                        p.wait(20)
                    except subprocess.TimeoutExpired:
                        p.kill()


if __name__ == "__main__":
    main()
