"""`protonet serve` as a user runs it: the real server process on a free port, spoken
to over HTTP (urllib) and from a real Chromium (Selenium), on a small random-weight
classifier built here and on open_nsfw's real weights (skipped when they cannot be
had offline, as in test_zoo)."""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest

import protonet
from protonet import classify, zoo

import conformance
from test_detect import face_images, res10_weights  # noqa: F401
from test_zoo import open_nsfw_files  # noqa: F401

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["apple", "banana", "cherry", "damson", "elder", "fig"]
TINY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 24 dim: 24 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 8 kernel_size: 3 stride: 2
                            weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""
TINY_FLAGS = ["--image-size", "28", "--mean-value", "128,128,128", "--scale", "0.0078125"]


# -- a server process -------------------------------------------------------------------------
@contextmanager
def server(*args, start_s: float = 90):
    """`python -m protonet serve ARGS --port 0`; yields (process, base URL)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.Popen([sys.executable, "-m", "protonet", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(start_s)
    try:
        url = first[0].strip() if first else ""
        if not url.startswith("http://"):
            proc.kill()
            raise AssertionError(f"server did not start: {url!r} {proc.communicate()[1]}")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def http(url, data=None, content_type=None, method=None, timeout=60):
    """(status, parsed JSON or text) of one request."""
    request = urllib.request.Request(url, data=data, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body, kind = response.status, response.read(), response.headers
    except urllib.error.HTTPError as e:
        status, body, kind = e.code, e.read(), e.headers
    if kind.get_content_type() == "application/json":
        return status, json.loads(body)
    return status, body.decode()


def multipart(data: bytes, field="image", filename="image.png"):
    """(body, content type) of a multipart form with one file."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def predict(url, data: bytes, query="", form=True):
    if form:
        body, kind = multipart(data)
        return http(f"{url}/predict{query}", body, kind)
    return http(f"{url}/predict{query}", data, "image/png")


def in_a_fresh_process(code: str):
    """What `code` (which prints JSON) prints in a new interpreter, as the server is one:
    the bitwise comparisons below must not depend on what earlier tests did to this
    process's torch (threads, kernels picked, caches)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def by_index(top):
    return {t["index"]: t["score"] for t in top}


# -- the tiny classifier ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(serve flags, Model, 32 distinct PNG images as bytes) of a random-weight net."""
    folder = tmp_path_factory.mktemp("tiny")
    deploy, weights, labels = folder / "deploy.prototxt", folder / "w.caffemodel", \
        folder / "labels.txt"
    deploy.write_text(TINY)
    protonet.set_random_seed(17)
    protonet.Net(str(deploy), protonet.TEST).save(str(weights))
    labels.write_text("\n".join(LABELS) + "\n")
    rng = np.random.default_rng(3)
    images = []
    for i in range(32):
        h, w = 20 + i % 7, 30 + i % 5
        image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        image[..., i % 3] //= 4                         # push the classes apart
        images.append(cv2.imencode(".png", image)[1].tobytes())
    flags = ["--model", str(deploy), "--weights", str(weights), "--labels", str(labels),
             *TINY_FLAGS]
    model = classify.Model(str(deploy), str(weights),
                           zoo.Preprocess(image_size=(28, 28), crop=None,
                                          mean=(128.0, 128.0, 128.0), scale=0.0078125),
                           LABELS)
    return flags, model, images


def alone(model, images, k=6, oversample=False):
    """What `protonet classify` gives each image run on its own: [[(i, score, label)]]."""
    c = classify.Classifier(model)
    return [c.top(c.scores([c.inputs(classify.decode_image(data, "test"), oversample)])[0],
                  k) for data in images]


@pytest.fixture(scope="module")
def tiny_server(tiny):
    flags, _, _ = tiny
    with server(*flags, "--max-batch", "8", "--max-wait-ms", "40",
                "--max-upload-bytes", "300000") as (proc, url):
        yield url


def test_binds_localhost_and_describes_the_model(tiny_server):
    assert tiny_server.startswith("http://127.0.0.1:")
    status, health = http(f"{tiny_server}/healthz")
    assert status == 200 and health["status"] == "ok"
    status, about = http(f"{tiny_server}/model")
    assert status == 200 and about["kind"] == "classifier" and about["labels"] == LABELS
    assert about["inputs"] == {"data": [1, 3, 24, 24]} and about["output"] == "prob"
    assert about["preprocessing"]["mean"] == [128, 128, 128]
    assert about["preprocessing"]["crop"] == [24, 24] and about["max_batch"] == 8
    assert "/" not in about["deploy"]                    # no server paths shown
    status, page = http(f"{tiny_server}/")
    assert status == 200 and 'type="file"' in page and "http" not in page.split("<script>")[1]


def test_answers_equal_a_single_image_classify_run(tiny, tiny_server):
    flags, model, images = tiny
    expected = alone(model, images[:2]) + alone(model, images[:1], oversample=True)
    got = [predict(tiny_server, images[0], "?k=6")[1],
           predict(tiny_server, images[1], "?k=6", form=False)[1],
           predict(tiny_server, images[0], "?k=6&oversample=1")[1]]
    for answer, want in zip(got, expected):
        assert answer["model"] == "deploy.prototxt"
        # One image in its batch: the same forward as classify's; to float32 rounding,
        # as Net.forward runs the inference plan once the server's net is warm.
        assert [(t["index"], t["label"]) for t in answer["top"]] == \
            [(i, label) for i, _, label in want]
        np.testing.assert_allclose([t["score"] for t in answer["top"]],
                                   [score for _, score, _ in want], rtol=1e-5, atol=1e-7)
    status, answer = predict(tiny_server, images[0], "?k=2")
    assert status == 200 and len(answer["top"]) == 2


def test_32_concurrent_clients_each_get_their_own_answer(tiny, tiny_server):
    flags, model, images = tiny
    expected = [{i: s for i, s, _ in top} for top in alone(model, images)]
    # The images really are told apart by their answers.
    vectors = np.array([[e[i] for i in range(6)] for e in expected])
    gaps = np.abs(vectors[:, None] - vectors[None]).max(axis=2)
    assert gaps[~np.eye(32, dtype=bool)].min() > 1e-3
    _, before = http(f"{tiny_server}/healthz")
    start = threading.Barrier(32)

    def client(i):
        start.wait()
        return predict(tiny_server, images[i], "?k=6", form=i % 2 == 0)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(client, range(32)))
    for i, (status, answer) in enumerate(answers):
        assert status == 200, answer
        got = by_index(answer["top"])
        # Batched with others: equal up to the kernels' rounding for another batch size.
        np.testing.assert_allclose([got[j] for j in range(6)], vectors[i],
                                   rtol=1e-5, atol=1e-7, err_msg=f"client {i}")
    _, after = http(f"{tiny_server}/healthz")
    images_run = after["images"] - before["images"]
    batches = after["batches"] - before["batches"]
    assert images_run == 32 and batches < 32            # they shared forward passes


def png_header(width, height) -> bytes:
    """A PNG whose header claims width x height (and then stops)."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))


@pytest.mark.parametrize("case, status, message", [
    ("garbage", 400, "cannot decode"),
    ("empty", 400, "empty"),
    ("text/plain", 415, "Content-Type 'text/plain' is not accepted"),
    ("json", 415, "application/json"),
    ("no image field", 400, "no file field 'image'"),
    ("text field", 400, "is text, not a file"),
    ("too large", 413, "over the limit of 300000 bytes"),
    ("huge header", 400, "over the limit"),
    ("truncated png", 400, "truncated"),
    ("k=0", 400, "between 1 and"),
    ("k=x", 400, "whole number"),
    ("oversample=maybe", 400, "takes 1 or 0"),
    ("GET /predict", 405, "Method Not Allowed"),
    ("/../etc/passwd", 404, "Not Found"),
    ("bad multipart", 400, "multipart"),
])
def test_bad_requests_get_json_4xx_and_the_server_goes_on(tiny, tiny_server, case, status,
                                                          message):
    _, model, images = tiny
    url = tiny_server
    if case == "garbage":
        got = predict(url, b"this is not an image at all")
    elif case == "empty":
        got = predict(url, b"", form=False)
    elif case == "text/plain":
        got = http(f"{url}/predict", images[0], "text/plain")
    elif case == "json":
        got = http(f"{url}/predict", b'{"image": "/etc/passwd"}', "application/json")
    elif case == "no image field":
        got = http(f"{url}/predict", *multipart(images[0], field="picture"))
    elif case == "text field":
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n"
                f"/etc/passwd\r\n--{boundary}--\r\n").encode()
        got = http(f"{url}/predict", body, f"multipart/form-data; boundary={boundary}")
    elif case == "too large":
        got = predict(url, images[0] + b"\0" * 400000)
    elif case == "huge header":
        got = predict(url, png_header(100000, 100000) + b"\0" * 64)
    elif case == "truncated png":
        got = predict(url, images[0][:len(images[0]) // 2], form=False)
    elif case in ("k=0", "k=x", "oversample=maybe"):
        got = predict(url, images[0], "?" + case)
    elif case == "GET /predict":
        got = http(f"{url}/predict")
    elif case == "/../etc/passwd":
        got = http(f"{url}/static/..%2f..%2fetc%2fpasswd")
    else:
        got = http(f"{url}/predict", b"--x\r\nnot a form", "multipart/form-data; boundary=x")
    assert got[0] == status and isinstance(got[1], dict), got
    assert message in got[1]["error"], got
    ok, answer = predict(url, images[3], "?k=6")
    want = alone(model, images[3:4])[0]
    assert ok == 200 and [t["index"] for t in answer["top"]] == [i for i, _, _ in want]
    np.testing.assert_allclose([t["score"] for t in answer["top"]],
                               [s for _, s, _ in want], rtol=1e-5, atol=1e-7)


def test_an_oversized_body_is_refused_before_it_is_read(tiny_server):
    """A Content-Length over the limit is answered without reading the body."""
    import http.client
    host, port = tiny_server[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(10**12))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and b"over the limit" in response.read()
    conn.close()


def test_sigterm_drains_requests_in_flight_and_exits_0(tiny):
    flags, model, images = tiny
    # A long batching wait keeps the requests in flight when SIGTERM comes.
    with server(*flags, "--max-batch", "8", "--max-wait-ms", "3000") as (proc, url):
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            calls = [pool.submit(predict, url, images[i], "?k=6") for i in range(3)]
            deadline = time.monotonic() + 60
            while True:                 # every request at the server, some unanswered
                waiting = http(f"{url}/healthz")[1]["waiting"]
                if waiting and waiting + sum(c.done() for c in calls) == 3:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            answers = [c.result(60) for c in calls]
        assert proc.wait(60) == 0
        assert proc.stderr.read().count("error") == 0
    for (status, answer), want in zip(answers, alone(model, images[:3])):
        assert status == 200
        np.testing.assert_allclose([by_index(answer["top"])[i] for i, _, _ in want],
                                   [s for _, s, _ in want], rtol=1e-5, atol=1e-7)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/healthz", timeout=5)


@pytest.mark.parametrize("case", ["missing prototxt", "bad weights", "busy port"])
def test_a_model_that_fails_to_load_stops_startup_with_one_line(tiny, tmp_path, case):
    flags, _, _ = tiny
    if case == "missing prototxt":
        argv = ["--model", str(tmp_path / "nope.prototxt"), "--weights", flags[3]]
    elif case == "bad weights":
        (tmp_path / "bad.caffemodel").write_bytes(b"\x08\x96\x01 not protobuf")
        argv = flags[:2] + ["--weights", str(tmp_path / "bad.caffemodel")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if case == "busy port":
        import socket
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            done = subprocess.run([sys.executable, "-m", "protonet", "serve", *flags,
                                   "--port", str(taken.getsockname()[1])],
                                  capture_output=True, text=True, env=env, timeout=120)
    else:
        done = subprocess.run([sys.executable, "-m", "protonet", "serve", *argv],
                              capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert len(lines) == 1 and lines[0].startswith("protonet serve: error: "), lines


# -- open_nsfw: the same numbers as `protonet classify` ---------------------------------------
def test_open_nsfw_answers_equal_protonet_classify_on_the_cat(open_nsfw_files):
    cat = conformance.ROOT / "data" / "images" / "cat.jpg"
    if not cat.is_file():
        pytest.skip(f"{cat} not found")
    weights, _ = open_nsfw_files
    cache = str(weights.parent.parent)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    printed = subprocess.run(
        [sys.executable, "-m", "protonet", "classify", "--model", "open_nsfw", "--cache-dir",
         cache, str(cat), "--top-k", "2"], capture_output=True, text=True, env=env,
        timeout=300)
    assert printed.returncode == 0, printed.stderr
    rows = [re.fullmatch(r"\s+\d\. (\d\.\d{6})\s+(\d+)  (\S+)", line).groups()
            for line in printed.stdout.splitlines()[1:]]
    with server("--model", "open_nsfw", "--cache-dir", cache) as (proc, url):
        status, answer = predict(url, cat.read_bytes(), "?k=2", form=False)
        status10, answer10 = predict(url, cat.read_bytes(), "?k=2&oversample=1")
    assert status == 200 and answer["model"] == "open_nsfw"
    assert [(f"{t['score']:.6f}", str(t["index"]), t["label"]) for t in answer["top"]] == rows
    assert answer["top"][0]["label"] == "SFW" and answer["top"][0]["score"] > 0.99
    # Bit for bit, the numbers `protonet classify` ranks (one image per forward pass,
    # through the same Classifier).
    wants = in_a_fresh_process(f"""
import json
from protonet import classify
c = classify.Classifier(classify.zoo_model("open_nsfw", {str(weights)!r}))
image = classify.load_image({str(cat)!r})
print(json.dumps([c.top(c.scores([c.inputs(image, oversample)])[0], 2)
                  for oversample in (False, True)]))
""")
    for got, want in zip((answer, answer10), wants):
        assert [[t["index"], t["score"], t["label"]] for t in got["top"]] == want


# -- a real browser ----------------------------------------------------------------------------
def chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@contextmanager
def browser_at(url, tmp_path):
    """A headless Chromium (Debian's, through its chromedriver) on `url`, or a skip."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser, driver_path = chromium(), shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(f"{url}/")
        WebDriverWait(driver, 30).until(
            lambda d: "input data" in d.find_element(By.ID, "about").text)
        yield driver, By, WebDriverWait
    finally:
        driver.quit()


def upload(driver, By, WebDriverWait, path):
    """Choose the file in the page's file input and wait for the answer to be shown."""
    driver.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(driver, 60).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-done") == "1")
    assert driver.find_element(By.ID, "status").get_attribute("class") != "error"


def test_the_page_in_chromium_shows_the_top_class(tiny, tiny_server, tmp_path):
    _, model, images = tiny
    image = tmp_path / "upload.png"
    image.write_bytes(images[5])
    want = alone(model, images[5:6])[0][0]
    with browser_at(tiny_server, tmp_path) as (driver, By, WebDriverWait):
        assert "deploy.prototxt" in driver.find_element(By.ID, "about").text
        upload(driver, By, WebDriverWait, image)
        assert driver.find_element(By.ID, "top-label").text == want[2]
        rows = driver.find_elements(By.CSS_SELECTOR, "#results .row")
        assert len(rows) == 5                                    # the page asks for k=5
        score = float(rows[0].find_element(By.CLASS_NAME, "score").text)
        assert abs(score - want[1]) < 1e-4


def test_the_bench_runs(capsys):
    """bench/bench_serve.py on tiny settings (tests never judge timings)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_serve
    assert bench_serve.main(["--model", "small", "--clients", "3", "--requests", "6",
                             "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["3"] * 3, out
    assert "req/s" in out and "load average" in out


# -- a detector --------------------------------------------------------------------------------
@pytest.fixture
def tiny_ssd(tmp_path):
    """(serve flags, detect.Model, three image paths) of test_detect's tiny SSD."""
    from test_detect import TINY_SSD
    from protonet import detect
    protonet.set_random_seed(3)
    deploy, weights = tmp_path / "ssd.prototxt", tmp_path / "ssd.caffemodel"
    deploy.write_text(TINY_SSD)
    protonet.Net(str(deploy), protonet.TEST).save(str(weights))
    rng = np.random.default_rng(5)
    paths = []
    for i, size in enumerate([(40, 50), (32, 32), (60, 20)]):
        paths.append(tmp_path / f"img{i}.png")
        cv2.imwrite(str(paths[-1]), rng.integers(0, 256, size + (3,), dtype=np.uint8))
    model = detect.Model(str(deploy), str(weights), zoo.Preprocess(None, None, ()),
                         labels=["bg", "cat", "dog"], threshold=0.3)
    (tmp_path / "labels.txt").write_text("bg\ncat\ndog\n")
    flags = ["--model", str(deploy), "--weights", str(weights), "--labels",
             str(tmp_path / "labels.txt"), "--threshold", "0.3"]
    return flags, model, paths


def test_a_detector_answers_protonet_detects_boxes(tiny_ssd):
    flags, model, paths = tiny_ssd
    with server(*flags) as (proc, url):
        _, about = http(f"{url}/model")
        answers = [predict(url, p.read_bytes()) for p in paths]
        low = predict(url, paths[0].read_bytes(), "?threshold=0.1")
        bad = predict(url, paths[0].read_bytes(), "?threshold=2")
    assert about["kind"] == "detector" and about["threshold"] == 0.3
    wants = in_a_fresh_process(f"""
import json
from protonet import detect, zoo
model = detect.Model({model.deploy!r}, {model.weights!r}, zoo.Preprocess(None, None, ()),
                     labels={model.labels!r})
found = [detect.detect(model, [p], threshold=t)[0]
         for p, t in zip({[str(p) for p in paths] + [str(paths[0])]!r}, [0.3, 0.3, 0.3, 0.1])]
print(json.dumps([[f.width, f.height, [[d.label, d.name, d.score, d.box]
                                        for d in f.detections]] for f in found]))
""")
    found = 0
    for (status, answer), (width, height, want) in zip(answers, wants):
        assert status == 200 and "top" not in answer
        assert (answer["width"], answer["height"]) == (width, height)
        # The same forward as detect's, to float32 rounding (Net.forward runs the
        # inference plan once the server's net is warm).
        assert [[d["index"], d["label"]] for d in answer["detections"]] == \
            [w[:2] for w in want]
        for d, w in zip(answer["detections"], want):
            np.testing.assert_allclose([d["score"]] + d["box"], [w[2]] + w[3],
                                       rtol=1e-5, atol=1e-5)
        found += len(want)
    assert found > 0                                # the comparison compared boxes
    want_low = wants[3][2]
    assert len(low[1]["detections"]) == len(want_low) >= len(answers[0][1]["detections"])
    assert bad[0] == 400 and "between 0 and 1" in bad[1]["error"]


def test_the_page_in_chromium_draws_a_detectors_boxes(tiny_ssd, tmp_path):
    from protonet import detect
    flags, model, paths = tiny_ssd
    want = detect.detect(model, [str(paths[0])])[0].detections
    assert want
    with server(*flags) as (proc, url), browser_at(url, tmp_path) as (driver, By, Wait):
        upload(driver, By, Wait, paths[0])
        assert driver.find_element(By.ID, "top-label").text == want[0].name
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results .row")) == len(want)
        # The image and its boxes are on the canvas: box edges in the boxes' colours.
        drawn = driver.execute_script(
            "const c = document.getElementById('canvas');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 0; i < d.length; i += 4)"
            "  if (d[i] === 0xe6 && d[i + 1] === 0x19 && d[i + 2] === 0x4b) n++;"
            "return [c.width, c.height, n];")
        image = cv2.imread(str(paths[0]))
        assert drawn[:2] == [image.shape[1], image.shape[0]] and drawn[2] > 10


def test_res10_served_finds_the_faces_protonet_detect_finds(res10_weights, face_images):
    """The real res10 face detector by its zoo name: the server's boxes are `protonet
    detect`'s, bit for bit (one image per forward pass)."""
    from protonet import detect
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    photo = face_images["grace_hopper_pair"]
    printed = subprocess.run([sys.executable, "-m", "protonet", "detect", "--model",
                              "res10_ssd_face", photo, "--json"], capture_output=True,
                             text=True, env=env, timeout=300)
    assert printed.returncode == 0, printed.stderr
    want = json.loads(printed.stdout)[0]
    with server("--model", "res10_ssd_face") as (proc, url):
        _, about = http(f"{url}/model")
        status, answer = predict(url, Path(photo).read_bytes(), form=False)
    assert status == 200 and about["kind"] == "detector" and answer["model"] == "res10_ssd_face"
    assert (answer["width"], answer["height"]) == (want["width"], want["height"])
    assert [(d["index"], d["label"], d["score"], d["box"]) for d in answer["detections"]] == \
        [(d["label"], d["name"], d["score"], d["box"]) for d in want["detections"]]
    assert len(answer["detections"]) == 2 and {d["label"] for d in answer["detections"]} == \
        {"face"}
