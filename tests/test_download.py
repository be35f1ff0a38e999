"""``download-data``: IDX from a mirror -> verified -> the LIBSVM files, against a server on 127.0.0.1.

The served IDX files are built from the bundled sample (real MNIST rows), so converting them back
must reproduce the sample's bytes exactly. Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import socket
import struct
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_svmlight_file

from sparkml_mnist.cli.commands import EXIT_RUN_FAILED, EXIT_USAGE, main
from sparkml_mnist.config import load_data_spec
from sparkml_mnist.data import download as download_module
from sparkml_mnist.data.download import DownloadError, download_mnist, load_download_spec
from sparkml_mnist.data.paths import sample_paths
from sparkml_mnist.errors import ConfigError, SparkMnistError

LOCALHOST = "127.0.0.1"
MIRROR_PATH = "/mnist"  # the served folder; anything else is a 404
EMPTY_PATH = "/nothing"
HANDLER_TIMEOUT_S = 10
SERVER_JOIN_S = 10
SHUTDOWN_POLL_S = 0.05  # how often serve_forever looks for shutdown()
TEST_TIMEOUT_S = 10
SMALL_CHUNK_ROWS = 1_000  # several chunks per split: chunked compression must equal one stream
IDX_UBYTE = 0x08
FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9]
SAMPLE_ROWS = {"train": 6_000, "test": 1_000}
CANONICAL_FILES = {
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
}
CANONICAL_TRAIN_IMAGES_SHA256 = "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"


def _idx_gz(array: np.ndarray, magic_type: int = IDX_UBYTE, dims: tuple[int, ...] | None = None) -> bytes:
    """An IDX file written independently of the code under test (header, big-endian dims, bytes)."""
    dims = array.shape if dims is None else dims
    header = bytes([0, 0, magic_type, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def sample() -> dict:
    """The bundled sample as IDX .gz files (by canonical name), their sha256, and the sample bytes."""
    spec = load_download_spec()
    data_spec = load_data_spec()
    height, width = data_spec.image_shape[0], data_spec.image_shape[1]
    files, expected = {}, {}
    for split, names in spec.splits.items():
        path = getattr(sample_paths(), split)
        features, labels = load_svmlight_file(path, n_features=data_spec.num_features)
        images = features.toarray().astype(np.uint8).reshape(-1, height, width)
        files[names.images] = _idx_gz(images)
        files[names.labels] = _idx_gz(labels.astype(np.uint8))
        expected[split] = Path(path).read_bytes()
    return {"files": files, "checksums": {n: _sha256(b) for n, b in files.items()}, "expected": expected}


class Mirror:
    """A static file server on 127.0.0.1 that counts the requests it gets."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.requests: list[str] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            timeout = HANDLER_TIMEOUT_S

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                mirror.requests.append(self.path)
                folder, _, name = self.path.rpartition("/")
                body = mirror.files.get(name) if folder == MIRROR_PATH else None
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(SHUTDOWN_POLL_S,), daemon=True)
        self.thread.start()
        self.url = f"http://{LOCALHOST}:{self.server.server_address[1]}{MIRROR_PATH}/"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(SERVER_JOIN_S)


@pytest.fixture
def mirror(sample):
    server = Mirror(sample["files"])
    yield server
    server.stop()


@pytest.fixture
def test_spec(sample):
    """The shipped config with the test files' checksums, a short timeout and small chunks."""
    spec = load_download_spec().with_checksums(sample["checksums"])
    return replace(spec, timeout_s=TEST_TIMEOUT_S, rows_per_chunk=SMALL_CHUNK_ROWS)


@pytest.fixture
def closed_port_url():
    """A port on 127.0.0.1 that is bound but not listening: connecting is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        yield f"http://{LOCALHOST}:{sock.getsockname()[1]}{MIRROR_PATH}/"


def _download(target: Path, url: str, spec, messages: list[str] | None = None, **options):
    say = messages.append if messages is not None else (lambda message: None)
    return download_mnist(target, url, spec=spec, say=say, **options)


def _folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------
# Success, and the cache
# --------------------------------------------------------------------------------------------


def test_round_trip_reproduces_the_bundled_sample_byte_for_byte(tmp_path, mirror, test_spec, sample):
    target = tmp_path / "new" / "mnist"  # created, parents too
    paths = _download(target, mirror.url, test_spec)

    assert sorted(mirror.requests) == sorted(f"{MIRROR_PATH}/{name}" for name in CANONICAL_FILES)
    assert Path(paths.train) == target / "mnist-digits-train.txt.bz2"
    assert Path(paths.test) == target / "mnist-digits-test.txt.bz2"
    for split in ("train", "test"):
        written = Path(getattr(paths, split)).read_bytes()
        expected = sample["expected"][split]
        # Lines first, for a readable failure; then the compressed bytes (same bzip2 -9 stream).
        got_lines = bz2.decompress(written).decode("ascii").split("\n")
        want_lines = bz2.decompress(expected).decode("ascii").split("\n")
        assert len(got_lines) == len(want_lines) == SAMPLE_ROWS[split] + 1  # + the empty piece after the last \n
        for number, (got, want) in enumerate(zip(got_lines, want_lines), start=1):
            assert got == want, f"{split} line {number} differs"
        assert written == expected
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["mnist-digits-train.txt.bz2", "mnist-digits-test.txt.bz2", test_spec.manifest_file]
    )


def test_the_output_reads_with_spark(spark, tmp_path, mirror, test_spec):
    from sparkml_mnist.data.libsvm import load_libsvm

    paths = _download(tmp_path, mirror.url, test_spec)
    train = load_libsvm(spark, paths.train)
    test = load_libsvm(spark, paths.test)
    assert (train.num_rows, test.num_rows) == (SAMPLE_ROWS["train"], SAMPLE_ROWS["test"])
    first = train.frame.orderBy("row").limit(len(FIRST_TRAIN_LABELS)).collect()
    assert [int(row["label"]) for row in first] == FIRST_TRAIN_LABELS


def test_a_second_call_makes_no_request_and_touches_nothing(tmp_path, mirror, test_spec):
    _download(tmp_path, mirror.url, test_spec)
    before, requests = _folder_state(tmp_path), len(mirror.requests)

    messages: list[str] = []
    paths = _download(tmp_path, mirror.url, test_spec, messages)

    assert len(mirror.requests) == requests
    assert _folder_state(tmp_path) == before
    assert Path(paths.train).exists() and Path(paths.test).exists()
    assert any("nothing to do" in message for message in messages), messages


def test_a_changed_output_or_force_downloads_again(tmp_path, mirror, test_spec, sample):
    paths = _download(tmp_path, mirror.url, test_spec)
    Path(paths.test).write_bytes(b"not the file the manifest vouches for")

    messages: list[str] = []
    _download(tmp_path, mirror.url, test_spec, messages)
    assert len(mirror.requests) == 2 * len(CANONICAL_FILES)
    assert "mnist-digits-test.txt.bz2 does not match" in messages[0]
    assert Path(paths.test).read_bytes() == sample["expected"]["test"]

    _download(tmp_path, mirror.url, test_spec, force=True)
    assert len(mirror.requests) == 3 * len(CANONICAL_FILES)


# --------------------------------------------------------------------------------------------
# Failures: clear errors, and the folder left as it was
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CANONICAL_FILES))
def test_a_corrupted_file_fails_its_checksum_and_leaves_nothing(tmp_path, mirror, test_spec, sample, name):
    corrupted = bytearray(sample["files"][name])
    corrupted[len(corrupted) // 2] ^= 0xFF
    mirror.files[name] = bytes(corrupted)
    target = tmp_path / "mnist"
    target.mkdir()

    with pytest.raises(DownloadError) as caught:
        _download(target, mirror.url, test_spec)

    message = str(caught.value)
    assert f"{name} from {mirror.url}{name}: sha256 checksum mismatch" in message
    assert f"expected {sample['checksums'][name]}, got {_sha256(bytes(corrupted))}" in message
    assert "--mirror" in message
    assert list(target.iterdir()) == []


def test_a_failed_force_keeps_the_previous_complete_files(tmp_path, mirror, test_spec, sample):
    _download(tmp_path, mirror.url, test_spec)
    before = _folder_state(tmp_path)
    mirror.files["t10k-labels-idx1-ubyte.gz"] = b"broken"

    with pytest.raises(DownloadError, match="t10k-labels-idx1-ubyte.gz .*checksum mismatch"):
        _download(tmp_path, mirror.url, test_spec, force=True)
    assert _folder_state(tmp_path) == before


def test_a_write_failure_removes_the_temporary_files(tmp_path, mirror, test_spec, monkeypatch):
    _download(tmp_path, mirror.url, test_spec)
    before = _folder_state(tmp_path)
    real_chunks = download_module._compressed_chunks
    calls = []

    def failing_on_the_second_split(*args, **kwargs):
        calls.append(1)
        for number, chunk in enumerate(real_chunks(*args, **kwargs)):
            if len(calls) == 2 and number == 1:  # the train output is complete, the test one half written
                raise OSError(errno.ENOSPC, "No space left on device")
            yield chunk

    monkeypatch.setattr(download_module, "_compressed_chunks", failing_on_the_second_split)
    with pytest.raises(DownloadError, match=r"cannot write the MNIST files in .* \(No space left on device\)"):
        _download(tmp_path, mirror.url, test_spec, force=True)
    assert len(calls) == 2
    assert _folder_state(tmp_path) == before  # no temporary file, and the earlier outputs untouched


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: gzip.compress(b"\x08\x03\x00\x00" + bytes(100), mtime=0), "not an IDX file (magic number 08030000)"),
        (lambda: _idx_gz(np.zeros((2, 28, 28)), magic_type=0x0D), "IDX data type 0x0d is not unsigned bytes"),
        (lambda: _idx_gz(np.zeros((2, 28, 28)), dims=(3, 28, 28)), "declares shape (3, 28, 28)"),
        (lambda: _idx_gz(np.zeros((2, 28, 27))), "expected images of shape (N, 28, 28), got (2, 28, 27)"),
        (lambda: _idx_gz(np.zeros((2, 28, 28)))[:-10], "not a complete gzip file"),
        (lambda: _idx_gz(np.zeros((2, 28, 28))), "holds 2 images but train-labels-idx1-ubyte.gz holds 6,000"),
    ],
    ids=["magic", "type", "truncated", "shape", "gzip", "count"],
)
def test_a_malformed_idx_file_is_named(tmp_path, mirror, test_spec, make, words):
    name = "train-images-idx3-ubyte.gz"
    mirror.files[name] = make()
    spec = test_spec.with_checksums({name: _sha256(mirror.files[name])})

    with pytest.raises(DownloadError) as caught:
        _download(tmp_path / "mnist", mirror.url, spec)
    assert name in str(caught.value) and words in str(caught.value)
    assert not (tmp_path / "mnist").exists()


def test_an_unreachable_mirror_names_the_url(tmp_path, closed_port_url, test_spec):
    with pytest.raises(DownloadError) as caught:
        _download(tmp_path / "mnist", closed_port_url, test_spec)
    message = str(caught.value)
    assert message.startswith(f"cannot reach {closed_port_url}train-images-idx3-ubyte.gz (")
    assert "refused" in message.lower() and "--mirror URL" in message
    assert not (tmp_path / "mnist").exists()


def test_a_missing_file_is_an_http_404(tmp_path, mirror, test_spec):
    url = mirror.url.replace(MIRROR_PATH, EMPTY_PATH)
    with pytest.raises(DownloadError) as caught:
        _download(tmp_path / "mnist", url, test_spec)
    assert str(caught.value).startswith(f"{url}train-images-idx3-ubyte.gz: HTTP 404")
    assert "--mirror" in str(caught.value)
    assert len(mirror.requests) == 1  # the first failure stops the download


@pytest.mark.parametrize("url", ["ftp://example.invalid/mnist/", "not a url", "http:///mnist/"])
def test_a_mirror_that_is_not_a_url_is_refused_before_any_request(tmp_path, test_spec, url):
    with pytest.raises(ConfigError, match="is not an http://, https:// or file:// URL"):
        _download(tmp_path / "mnist", url, test_spec)


def test_a_file_where_the_folder_should_be_is_refused(tmp_path, mirror, test_spec):
    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        _download(target, mirror.url, test_spec)
    assert mirror.requests == []


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def test_the_shipped_config_names_the_canonical_files_and_checksums():
    spec = load_download_spec()
    assert set(spec.file_names()) == CANONICAL_FILES
    assert spec.checksums["train-images-idx3-ubyte.gz"].sha256 == CANONICAL_TRAIN_IMAGES_SHA256
    assert all([name for name, _ in sums.items()] == ["sha256", "md5"] for sums in spec.checksums.values())
    assert spec.mirror_url.startswith("https://")


@pytest.mark.parametrize(
    "checksums,words",
    [({"other.gz": "0" * 64}, "unknown file(s) other.gz"), ({"train-images-idx3-ubyte.gz": "abc"}, "64 hex digits")],
)
def test_bad_injected_checksums_are_config_errors(checksums, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_download_spec().with_checksums(checksums)


def test_a_config_without_a_required_checksum_is_refused(tmp_path):
    text = Path(download_module.default_conf_file("download.yaml")).read_text()
    broken = tmp_path / "download.yaml"
    broken.write_text(text.replace("    sha256: 440fcabf", "    sha1: 440fcabf"))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) checksums.train-images-idx3-ubyte.gz.sha1"):
        load_download_spec(broken)
    broken.write_text(text.replace("    sha256: 440fcabf", "    # no sha256: 440fcabf"))
    with pytest.raises(ConfigError, match="missing required field 'checksums.train-images-idx3-ubyte.gz.sha256'"):
        load_download_spec(broken)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def test_cli_downloads_then_reports_the_cache(tmp_path, mirror, test_spec, sample, monkeypatch, capsys):
    monkeypatch.setattr(download_module, "load_download_spec", lambda path=None: test_spec)
    target = tmp_path / "mnist"

    assert main(["download-data", str(target), "--mirror", mirror.url]) == 0
    out = capsys.readouterr().out
    assert f"wrote {target / 'mnist-digits-train.txt.bz2'} (6,000 rows" in out
    assert (target / "mnist-digits-test.txt.bz2").read_bytes() == sample["expected"]["test"]

    assert main(["download-data", str(target), "--mirror", mirror.url]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(mirror.requests) == len(CANONICAL_FILES)

    assert main(["download-data", str(target), "--mirror", mirror.url, "--force"]) == 0
    assert len(mirror.requests) == 2 * len(CANONICAL_FILES)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sparkml-mnist: error: ")
    return err


def test_cli_checksum_error_exits_1_in_one_line(tmp_path, mirror, capsys):
    # The shipped config expects the canonical files; the test server's are not.
    assert main(["download-data", str(tmp_path / "mnist"), "--mirror", mirror.url]) == EXIT_RUN_FAILED
    err = _one_line_error(capsys)
    assert f"expected {CANONICAL_TRAIN_IMAGES_SHA256}, got " in err
    assert not (tmp_path / "mnist").exists()


def test_cli_unreachable_mirror_exits_1_in_one_line(tmp_path, closed_port_url, capsys):
    assert main(["download-data", str(tmp_path / "mnist"), "--mirror", closed_port_url]) == EXIT_RUN_FAILED
    assert f"cannot reach {closed_port_url}" in _one_line_error(capsys)


def test_cli_bad_mirror_exits_2_in_one_line(tmp_path, capsys):
    assert main(["download-data", str(tmp_path), "--mirror", "ftp://example.invalid/"]) == EXIT_USAGE
    assert "is not an http://, https:// or file:// URL" in _one_line_error(capsys)


def test_download_error_is_in_the_package_family():
    assert issubclass(DownloadError, SparkMnistError)


def test_the_full_test_split_reproduces_the_shared_file(full_data_dir, tmp_path, mirror, test_spec):
    """All 10,000 t10k rows (needs SPARKML_MNIST_DATA): the output equals the shared file byte for byte."""
    shared = full_data_dir / "mnist-digits-test.txt.bz2"
    data_spec = load_data_spec()
    features, labels = load_svmlight_file(str(shared), n_features=data_spec.num_features)
    images = features.toarray().astype(np.uint8).reshape(-1, data_spec.image_shape[0], data_spec.image_shape[1])
    names = test_spec.splits["test"]
    mirror.files[names.images] = _idx_gz(images)
    mirror.files[names.labels] = _idx_gz(labels.astype(np.uint8))
    spec = test_spec.with_checksums({name: _sha256(mirror.files[name]) for name in (names.images, names.labels)})

    paths = _download(tmp_path, mirror.url, spec)
    assert Path(paths.test).read_bytes() == shared.read_bytes()


# --------------------------------------------------------------------------------------------
# A mirror that sends too much, or too slowly: a size cap and a deadline per file
# --------------------------------------------------------------------------------------------

SMALL_CAP_BYTES = 4_096  # the test's max_file_bytes: far below what the misbehaving mirror sends
OVERSIZE_BYTES = 4 * SMALL_CAP_BYTES
DRIP_BYTES = 200  # announced and sent one at a time, DRIP_PAUSE_S apart: 4 s in all, each byte well within timeout_s
DRIP_PAUSE_S = 0.02
SHORT_DEADLINE_S = 0.5
DEADLINE_SLACK_S = 2.5  # the deadline is checked between reads: a download ends well before the drip does


class Misbehaving:
    """A server on 127.0.0.1 whose every GET runs ``send(handler)``: too many bytes, or a drip."""

    def __init__(self, send) -> None:
        class Handler(BaseHTTPRequestHandler):
            timeout = HANDLER_TIMEOUT_S

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                try:
                    send(self)
                except OSError:  # the client gave up, as it should
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(SHUTDOWN_POLL_S,), daemon=True)
        self.thread.start()
        self.url = f"http://{LOCALHOST}:{self.server.server_address[1]}{MIRROR_PATH}/"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(SERVER_JOIN_S)


def _send_oversize(announce: bool):
    def send(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        if announce:
            handler.send_header("Content-Length", str(OVERSIZE_BYTES))
        handler.end_headers()  # without a length, HTTP/1.0: the body ends when the server closes
        handler.wfile.write(b"\0" * OVERSIZE_BYTES)

    return send


def _send_drip(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(DRIP_BYTES))
    handler.end_headers()
    for _ in range(DRIP_BYTES):
        handler.wfile.write(b"\0")
        handler.wfile.flush()
        time.sleep(DRIP_PAUSE_S)


@pytest.mark.parametrize("announce", [True, False], ids=["announced", "unannounced"])
def test_a_file_larger_than_the_cap_is_refused_naming_the_url_and_the_limit(tmp_path, test_spec, announce):
    server = Misbehaving(_send_oversize(announce))
    try:
        with pytest.raises(DownloadError) as caught:
            _download(tmp_path / "mnist", server.url, replace(test_spec, max_file_bytes=SMALL_CAP_BYTES))
    finally:
        server.stop()
    message = str(caught.value)
    assert message.startswith(f"{server.url}train-images-idx3-ubyte.gz is larger than {SMALL_CAP_BYTES:,} bytes")
    assert "max_file_bytes" in message and "--mirror" in message
    assert not (tmp_path / "mnist").exists()


def test_a_dripping_mirror_hits_the_deadline_not_the_per_read_timeout(tmp_path, test_spec):
    server = Misbehaving(_send_drip)
    started = time.monotonic()
    try:
        with pytest.raises(DownloadError) as caught:
            _download(tmp_path / "mnist", server.url, replace(test_spec, deadline_s=SHORT_DEADLINE_S))
    finally:
        server.stop()
    assert time.monotonic() - started < SHORT_DEADLINE_S + DEADLINE_SLACK_S
    message = str(caught.value)
    assert message.startswith(f"download of {server.url}train-images-idx3-ubyte.gz did not finish within "
                              f"{SHORT_DEADLINE_S:g} s")
    assert "deadline_s" in message and "--mirror" in message


def test_the_default_cap_and_deadline_leave_room_for_mnist():
    spec = load_download_spec()
    largest_mnist_file_bytes = 9_912_422  # train-images-idx3-ubyte.gz
    assert spec.max_file_bytes >= 10 * largest_mnist_file_bytes
    assert spec.deadline_s >= 10 * spec.timeout_s
