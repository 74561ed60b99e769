"""The labelling page: crash-safe label file, resuming a labeller, the HTTP round trip, labels -> pairs."""

from __future__ import annotations

import http.client
import threading
from urllib.parse import urlencode

import pytest

from rewards.labelling import Labeller, LabelStore, a_is_chosen, labelled_pairs, make_server
from rewards.reward_model import expert_pairs


@pytest.fixture(scope="module")
def pairs():
    return expert_pairs("vlmrl/GridWorld-v0", 3, env_kwargs={"size": 4, "n_walls": 0})


def test_labels_append_resume_and_survive_a_torn_line(pairs, tmp_path):
    store = LabelStore(tmp_path / "labels.jsonl")
    labeller = Labeller(pairs, store)
    assert labeller.next_row("ann") == 0
    labeller.record(0, "a", "ann")
    with open(store.path, "a") as file:  # a crash in the middle of writing the next label
        file.write('{"row": 1, "label')
    assert [label["row"] for label in store.read()] == [0]
    labeller.record(1, "tie", "ann")
    assert [label["row"] for label in store.read()] == [0, 1]
    assert labeller.next_row("ann") == 2 and labeller.next_row("bob") == 0
    with pytest.raises(ValueError, match=r"choice 'maybe'"):
        labeller.record(2, "maybe", "ann")
    with pytest.raises(ValueError, match=r"labeller's name"):
        labeller.record(2, "a", " ")


def test_labelled_pairs_orient_chosen_by_the_human(pairs, tmp_path):
    labeller = Labeller(pairs, LabelStore(tmp_path / "labels.jsonl"))
    labeller.record(0, "a", "ann")
    labeller.record(1, "b", "ann")
    labeller.record(2, "skip", "ann")
    result = labelled_pairs(pairs, labeller.store.read())
    assert len(result) == 2
    for out_row, (row, choice) in zip(result, [(0, "a"), (1, "b")]):
        a_chosen = a_is_chosen(row, labeller.keys[row])
        human_picked_original_chosen = a_chosen == (choice == "a")
        expected = pairs[row]["chosen"] if human_picked_original_chosen else pairs[row]["rejected"]
        assert out_row["chosen"] == expected


def test_the_page_over_http(pairs, tmp_path):
    server = make_server(Labeller(pairs, LabelStore(tmp_path / "labels.jsonl")), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:

        def request(method, path, body=None):
            connection = http.client.HTTPConnection(host, port, timeout=5)
            headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheader("Location"), response.read()

        assert host == "127.0.0.1"
        status, _, page = request("GET", "/")
        assert status == 200 and b"Your name" in page
        status, _, page = request("GET", "/?labeller=Ann%20Lee")
        assert status == 200 and b"pair 1 of 3" in page and pairs[0]["chosen"].encode() in page
        status, _, image = request("GET", "/image/0")
        assert status == 200 and image.startswith(b"\x89PNG")
        status, location, _ = request("POST", "/label", urlencode({"row": 0, "choice": "b", "labeller": "Ann Lee"}))
        assert status == 303 and location == "/?labeller=Ann%20Lee"
        assert b"pair 2 of 3" in request("GET", location)[2]
        # The same form sent again (a double click): the first label stands, once.
        status, location, _ = request("POST", "/label", urlencode({"row": 0, "choice": "a", "labeller": "Ann Lee"}))
        assert status == 303 and b"pair 2 of 3" in request("GET", location)[2]
        status, _, message = request("POST", "/label", urlencode({"row": 9, "choice": "a", "labeller": "Ann Lee"}))
        assert status == 400 and b"row 9" in message
        [label] = LabelStore(tmp_path / "labels.jsonl").read()
        assert label["labeller"] == "Ann Lee" and label["choice"] == "b" and label["time"].endswith("+00:00")
    finally:
        server.shutdown()
        server.server_close()


def test_reward_model_training_refuses_labels_that_label_nothing(pairs, tmp_path):
    from rewards.reward_model import RewardTrainConfig, train_reward_model

    labeller = Labeller(pairs, LabelStore(tmp_path / "labels.jsonl"))
    labeller.record(0, "skip", "ann")
    config = RewardTrainConfig(pairs="-", out=str(tmp_path / "rm"), labels=str(labeller.store.path))
    with pytest.raises(ValueError, match=r"the pairs labelled in .* has no pairs"):
        train_reward_model(config, pairs=pairs)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_labelling_in_a_browser(tmp_path):
    """`vlmrl label` in headless Chromium: three pairs labelled by mouse and by key, then a reload."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (bash scripts/setup.sh, or pip install -e '.[dev]')"
    )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no browser at {CHROMIUM} (Debian: apt-get install chromium)")

    pairs = expert_pairs("vlmrl/GridWorld-v0", 5, env_kwargs={"size": 4, "n_walls": 0})
    assert len(pairs) == 5
    pairs.save_to_disk(str(tmp_path / "pairs"))
    labels_path = tmp_path / "pairs" / "labels.jsonl"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "experiments.cli", "label", str(tmp_path / "pairs"), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        first_line = server.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", first_line)
        assert url, f"vlmrl label printed {first_line!r}"
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.set_default_timeout(10_000)
            page.goto(url.group(0))
            page.fill("input[name=labeller]", "Ann Lee")
            page.keyboard.press("Enter")
            page.wait_for_selector("text=pair 1 of 5 (0 labelled)")
            assert page.eval_on_selector("img", "image => image.naturalWidth") > 0

            # Row 0: a click on "B is better"; row 1: key a; row 2: key b.
            page.get_by_role("button", name="B is better").click()
            page.wait_for_selector("text=pair 2 of 5 (1 labelled)")
            page.keyboard.press("a")
            page.wait_for_selector("text=pair 3 of 5 (2 labelled)")
            page.keyboard.press("b")
            page.wait_for_selector("text=pair 4 of 5 (3 labelled)")

            page.reload()
            page.wait_for_selector("text=pair 4 of 5 (3 labelled)")
            assert page.get_attribute("input[name=row]", "value") == "3"
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)

    labels = LabelStore(labels_path).read()
    assert [(label["row"], label["choice"], label["labeller"]) for label in labels] == [
        (0, "b", "Ann Lee"),
        (1, "a", "Ann Lee"),
        (2, "b", "Ann Lee"),
    ]
    keys = Labeller(pairs, LabelStore(labels_path)).keys
    for label in labels:
        a_chosen = a_is_chosen(label["row"], keys[label["row"]])
        assert label["preferred_column"] == ("chosen" if a_chosen == (label["choice"] == "a") else "rejected")
