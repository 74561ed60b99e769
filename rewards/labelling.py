"""A local web page for labelling preference pairs by hand: ``vlmrl label PAIRS``.

The page (standard library only: ``http.server`` on 127.0.0.1) shows one pair at a time: the image, the
prompt and the two answers in a per-row random order (so that the position of an answer says nothing
about which column it came from), and asks which answer is better: A, B, equally good, or skip. Every
label is appended to a JSON-lines file as one line (row, labeller, UTC time, choice, which column the
preferred answer was in), flushed and fsync'ed before the page moves on, so a crash loses at most the
label being written and a half-written last line is ignored on reading. A labeller who comes back starts
at the first row they have not labelled; a pair labelled again by the same labeller (a double click, a
resent form) keeps its first label. Keys a, b, t and s press the buttons. :func:`labelled_pairs` turns the
labels into a preference set (``images, prompt, chosen, rejected``) for ``vlmrl reward-model train``.

The pairs are any preference set in TRL's format (``images``, ``prompt``, ``chosen``, ``rejected``: the
two candidate answers; their columns are only the order in which they were proposed).
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import random
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlparse

import tyro

CHOICES = ("a", "b", "tie", "skip")


def pair_key(row: dict[str, Any]) -> str:
    """A short hash of a pair's prompt and answers: labels stay attached to their pair if the file changes."""
    text = json.dumps([str(row["prompt"]), str(row["chosen"]), str(row["rejected"])])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def a_is_chosen(index: int, key: str) -> bool:
    """Whether answer A is the ``chosen`` column for this row: a coin flip fixed by the pair itself."""
    return random.Random(f"{index}:{key}").random() < 0.5


class LabelStore:
    """Labels in a JSON-lines file, appended one whole line at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock = threading.Lock()

    def read(self) -> list[dict[str, Any]]:
        """Every complete label; a torn last line (a crash mid-write) is left out."""
        if not self.path.exists():
            return []
        labels = []
        for line in self.path.read_text().splitlines():
            try:
                labels.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return labels

    def append(self, label: dict[str, Any]) -> None:
        line = json.dumps(label, ensure_ascii=False) + "\n"
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as file:
                # A torn line from a crash would glue onto this one: start on a fresh line.
                file.seek(0, os.SEEK_END)
                if file.tell():
                    file.seek(-1, os.SEEK_END)
                    if file.read(1) != b"\n":
                        file.write(b"\n")
                file.write(line.encode())
                file.flush()
                os.fsync(file.fileno())


class Labeller:
    """The pairs, the store and what the page needs: the next row for a labeller, and recording a choice."""

    def __init__(self, pairs: Any, store: LabelStore) -> None:
        self.pairs = pairs
        self.store = store
        self.keys = [pair_key(pairs[i]) for i in range(len(pairs))]
        self.lock = threading.Lock()  # the server answers each request in a thread

    def done_rows(self, labeller: str) -> set[int]:
        return {label["row"] for label in self.store.read() if label["labeller"] == labeller}

    def next_row(self, labeller: str) -> int | None:
        done = self.done_rows(labeller)
        return next((i for i in range(len(self.pairs)) if i not in done), None)

    def record(self, row: int, choice: str, labeller: str) -> dict[str, Any]:
        if choice not in CHOICES:
            raise ValueError(f"choice {choice!r}; use one of {', '.join(CHOICES)}.")
        if not labeller.strip():
            raise ValueError("a label needs the labeller's name.")
        if not 0 <= row < len(self.pairs):
            raise ValueError(f"row {row} is not in the pair set (0 .. {len(self.pairs) - 1}).")
        with self.lock:
            return self._record_once(row, choice, labeller.strip())

    def _record_once(self, row: int, choice: str, labeller: str) -> dict[str, Any]:
        earlier = [label for label in self.store.read() if label["row"] == row and label["labeller"] == labeller]
        if earlier:  # a second click or a resent form: the first label stands, and the file has each pair once
            return earlier[0]
        a_chosen = a_is_chosen(row, self.keys[row])
        preferred = {"a": "chosen" if a_chosen else "rejected", "b": "rejected" if a_chosen else "chosen"}.get(choice)
        label = {
            "row": row,
            "key": self.keys[row],
            "labeller": labeller,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "choice": choice,
            "preferred_column": preferred,
        }
        self.store.append(label)
        return label

    # -- the page -------------------------------------------------------------------------------------------
    def page(self, labeller: str) -> str:
        if not labeller:
            body = (
                '<form method="get" action="/"><label>Your name: <input name="labeller" autofocus required>'
                '</label> <button type="submit">Start</button></form>'
            )
            return _html("Label preference pairs", body)
        row = self.next_row(labeller)
        name = html.escape(labeller)
        done = len(self.done_rows(labeller))
        if row is None:
            return _html("Done", f"<p>All {len(self.pairs)} pairs are labelled by {name}. Thank you.</p>")
        pair = self.pairs[row]
        a_chosen = a_is_chosen(row, self.keys[row])
        first, second = (pair["chosen"], pair["rejected"]) if a_chosen else (pair["rejected"], pair["chosen"])
        buttons = "".join(
            f'<button name="choice" value="{choice}" accesskey="{choice[0]}">{text} ({choice[0]})</button> '
            for choice, text in (("a", "A is better"), ("b", "B is better"), ("tie", "Equally good"), ("skip", "Skip"))
        )
        body = (
            f"<p>{name}: pair {row + 1} of {len(self.pairs)} ({done} labelled)</p>"
            f'<img src="/image/{row}" alt="observation" style="image-rendering: pixelated; width: 256px">'
            f"<h3>Prompt</h3><pre>{html.escape(_text(pair['prompt']))}</pre>"
            f"<h3>A</h3><pre>{html.escape(_text(first))}</pre><h3>B</h3><pre>{html.escape(_text(second))}</pre>"
            f'<form method="post" action="/label"><input type="hidden" name="row" value="{row}">'
            f'<input type="hidden" name="labeller" value="{name}">{buttons}</form>{KEYS_SCRIPT}'
        )
        return _html("Which answer is better?", body)

    def image_png(self, row: int) -> bytes:
        import numpy as np
        from PIL import Image

        images = self.pairs[row]["images"]
        image = images[0] if isinstance(images, (list, tuple)) else images
        if not isinstance(image, Image.Image):  # a uint8 array (the datasets Image feature gives PIL already)
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()


#: One key per button (a, b, t, s: the letter after its label), without a modifier: access keys need Alt (or
#: Alt+Shift, by browser), which is slow over hundreds of pairs. Only the first press sends the form, so a
#: key held down or pressed twice cannot label the next pair unseen.
KEYS_SCRIPT = """<script>
let sent = false;
document.addEventListener("keydown", (event) => {
  if (sent || event.repeat || event.ctrlKey || event.metaKey || event.altKey) return;
  const button = document.querySelector(`button[accesskey="${event.key.toLowerCase()}"]`);
  if (button) { sent = true; event.preventDefault(); button.click(); }
});
</script>"""


def _text(value: Any) -> str:
    """A prompt or answer as plain text (a conversation's text parts joined)."""
    from rewards.reward_model import answer_text

    return answer_text(value)


def _html(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body style='font-family: sans-serif; max-width: 50em; margin: 2em auto'><h2>{html.escape(title)}</h2>"
        f"{body}</body></html>"
    )


def make_server(labeller: Labeller, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """An HTTP server for the page (not started: call ``serve_forever``). ``port=0`` picks a free port."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep the terminal for the URL
            pass

        def _send(self, status: int, content: bytes, content_type: str, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(content)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(content)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlparse(self.path)
            if url.path == "/":
                name = parse_qs(url.query).get("labeller", [""])[0]
                self._send(HTTPStatus.OK, labeller.page(name).encode(), "text/html; charset=utf-8")
            elif url.path.startswith("/image/") and url.path[7:].isdigit() and int(url.path[7:]) < len(labeller.pairs):
                self._send(HTTPStatus.OK, labeller.image_png(int(url.path[7:])), "image/png")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

        def do_POST(self) -> None:  # noqa: N802
            if urlparse(self.path).path != "/label":
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
                return
            length = int(self.headers.get("Content-Length", 0))
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            try:
                label = labeller.record(int(form.get("row", -1)), form.get("choice", ""), form.get("labeller", ""))
            except ValueError as error:
                self._send(HTTPStatus.BAD_REQUEST, str(error).encode(), "text/plain; charset=utf-8")
                return
            self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": "/?labeller=" + quote(label["labeller"])})

    return ThreadingHTTPServer((host, port), Handler)


def labelled_pairs(pairs: Any, labels: list[dict[str, Any]]) -> Any:
    """A preference set from human labels: each A/B label of a pair that is still the same pair becomes one
    row, ``chosen`` the preferred answer (ties and skips are left out)."""
    rows, swapped = [], []
    for label in labels:
        row = label["row"]
        if label["preferred_column"] is None or row >= len(pairs) or pair_key(pairs[row]) != label["key"]:
            continue
        rows.append(row)
        swapped.append(label["preferred_column"] == "rejected")
    selected = pairs.select(rows)

    def orient(example: dict[str, Any], index: int) -> dict[str, Any]:
        if swapped[index]:
            example["chosen"], example["rejected"] = example["rejected"], example["chosen"]
        return example

    return selected.map(orient, with_indices=True)


@dataclass
class LabelConfig:
    """``vlmrl label PAIRS``: label preference pairs by hand in the browser."""

    pairs: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PAIRS")]
    """Pair set: a ``save_to_disk`` directory, .parquet or .jsonl with images, prompt, chosen, rejected."""
    out: str | None = None
    """Labels file (JSON lines, appended); default: ``labels.jsonl`` beside (or inside a directory of) the pairs."""
    port: int = 8765
    """Port on 127.0.0.1 (0: any free port)."""


def main(argv: list[str] | None = None) -> None:
    from rewards.reward_model import load_pairs

    config = tyro.cli(LabelConfig, args=argv)
    pairs = load_pairs(config.pairs)
    source = Path(config.pairs)
    out = config.out or str(source / "labels.jsonl" if source.is_dir() else source.with_suffix(".labels.jsonl"))
    server = make_server(Labeller(pairs, LabelStore(out)), config.port)
    print(f"Labelling {len(pairs)} pairs at http://127.0.0.1:{server.server_address[1]}/ ; labels go to {out}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
