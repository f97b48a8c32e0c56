"""Weights named by URL: downloaded once into DOWNLOAD_CACHE by a real HTTP transfer (a local http.server),
reused without a request, never left half-written, and refused with a named error when unreachable or corrupt."""

from __future__ import annotations

import hashlib
import os
import pickle
import socket

import numpy as np
import pytest
import torch
from torch import nn
from weights_server import WeightsServer

import pydetectron.engine.inference_model as inference_model
from pydetectron.config import get_cfg
from pydetectron.engine.training import TrainOptions, load_weights
from pydetectron.weights.download import (
    WeightsChecksumError,
    WeightsDownloadError,
    cache_path_of,
    cached_weights_path,
    published_hash,
)


class TinyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def detectron_weight_mapping(self):
        return {"conv.weight": "conv1_w", "conv.bias": "conv1_b"}


@pytest.fixture
def server():
    serving = WeightsServer()
    yield serving
    serving.close()


def _pickle_of(model: nn.Module, padding: int = 0) -> bytes:
    mapping = model.detectron_weight_mapping()
    blobs = {mapping[k]: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if padding:  # a body big enough to arrive in several reads
        blobs["padding_w"] = np.zeros(padding, np.float32)
    return pickle.dumps({"blobs": blobs})


def _leftovers(folder) -> list[str]:
    return [name for _, _, names in os.walk(folder) for name in names]


def test_first_load_downloads_and_second_reuses_the_cache(server, tmp_path, monkeypatch):
    source = TinyHead()
    server.files["/models/w.pkl"] = _pickle_of(source)
    monkeypatch.setattr(inference_model, "build_detector", lambda cfg: TinyHead())
    cfg = get_cfg()
    cfg.DOWNLOAD_CACHE = str(tmp_path / "cache")
    url = server.url("/models/w.pkl")
    model = inference_model.build_inference_model(cfg, load_detectron=url)  # strict: every blob used
    torch.testing.assert_close(model.conv.weight, source.conv.weight, rtol=0, atol=0)
    assert server.requests == ["/models/w.pkl"]
    cached = tmp_path / "cache" / f"127.0.0.1:{server.httpd.server_address[1]}" / "models" / "w.pkl"
    assert cached.read_bytes() == server.files["/models/w.pkl"]

    target = TinyHead()
    options = TrainOptions(load_detectron=url)
    load_weights(target, cfg, options, print_fn=lambda line: None)  # training loads leniently
    assert server.requests == ["/models/w.pkl"]  # the second load made no request
    torch.testing.assert_close(target.conv.weight, source.conv.weight, rtol=0, atol=0)


def test_train_weights_url_loads_through_the_cache(server, tmp_path):
    source = TinyHead()
    server.files["/detectron/R-50.pkl"] = _pickle_of(source)
    cfg = get_cfg()
    cfg.DOWNLOAD_CACHE = str(tmp_path / "cache")
    cfg.TRAIN.WEIGHTS = server.url("/detectron/R-50.pkl")
    for _ in range(2):
        target = TinyHead()
        load_weights(target, cfg, TrainOptions(), print_fn=lambda line: None)
        torch.testing.assert_close(target.conv.weight, source.conv.weight, rtol=0, atol=0)
    assert server.requests == ["/detectron/R-50.pkl"]


def test_download_killed_halfway_leaves_no_file(server, tmp_path):
    server.files["/w.pkl"] = _pickle_of(TinyHead(), padding=600_000)
    server.truncated.add("/w.pkl")
    url = server.url("/w.pkl")
    destination = cache_path_of(url, str(tmp_path))
    with pytest.raises(WeightsDownloadError) as err:
        cached_weights_path(url, str(tmp_path), "TRAIN.WEIGHTS")
    text = str(err.value)
    assert url in text and destination in text and "short of the promised size" in text
    assert _leftovers(tmp_path) == []  # neither the destination nor a partial file
    server.truncated.clear()  # the next run retries and completes
    assert cached_weights_path(url, str(tmp_path), "TRAIN.WEIGHTS") == destination
    assert open(destination, "rb").read() == server.files["/w.pkl"]


def test_404_names_url_cache_path_and_remedy(server, tmp_path):
    url = server.url("/missing/R-50.pkl")
    with pytest.raises(WeightsDownloadError) as err:
        cached_weights_path(url, str(tmp_path), "RESNETS.IMAGENET_PRETRAINED_WEIGHTS")
    text = str(err.value)
    assert "RESNETS.IMAGENET_PRETRAINED_WEIGHTS" in text and url in text and "404" in text
    assert cache_path_of(url, str(tmp_path)) in text and "download it by hand" in text
    assert _leftovers(tmp_path) == []


def test_refused_connection_names_url_and_cache_path(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/R-50.pkl"
    with pytest.raises(WeightsDownloadError) as err:
        cached_weights_path(url, str(tmp_path), "--load_detectron")
    text = str(err.value)
    assert url in text and cache_path_of(url, str(tmp_path)) in text and "refused" in text.lower()


def test_timeout_names_url(server, tmp_path):
    server.files["/slow.pkl"] = b"x"
    server.slow.add("/slow.pkl")
    url = server.url("/slow.pkl")
    with pytest.raises(WeightsDownloadError) as err:
        cached_weights_path(url, str(tmp_path), "TEST.WEIGHTS", timeout=0.3)
    assert url in str(err.value) and "timed out" in str(err.value)


def test_torchvision_hash_is_checked(server, tmp_path):
    body = b"not the published resnet" * 100
    digest = hashlib.sha256(body).hexdigest()
    wrong = "0123abcd" if not digest.startswith("0123abcd") else "4567ef01"
    server.files[f"/models/resnet18-{wrong}.pth"] = body
    server.files[f"/models/resnet18-{digest[:10]}.pth"] = body
    bad_url = server.url(f"/models/resnet18-{wrong}.pth")
    with pytest.raises(WeightsChecksumError) as err:
        cached_weights_path(bad_url, str(tmp_path), "RESNETS.IMAGENET_PRETRAINED_WEIGHTS")
    assert bad_url in str(err.value) and wrong in str(err.value) and digest in str(err.value)
    assert _leftovers(tmp_path) == []
    good = cached_weights_path(server.url(f"/models/resnet18-{digest[:10]}.pth"), str(tmp_path), "x")
    assert open(good, "rb").read() == body
    # a file put into the cache by hand under a hash-bearing name is checked as well
    by_hand = cache_path_of(bad_url, str(tmp_path))
    os.makedirs(os.path.dirname(by_hand), exist_ok=True)
    with open(by_hand, "wb") as f:
        f.write(body)
    with pytest.raises(WeightsChecksumError, match="delete"):
        cached_weights_path(bad_url, str(tmp_path), "x")
    assert server.requests.count(f"/models/resnet18-{wrong}.pth") == 1


def test_cache_layout_follows_detectron():
    url = "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/MSRA/R-50.pkl"
    assert cache_path_of(url, "/cache") == "/cache/ImageNetPretrained/MSRA/R-50.pkl"  # Detectron's cache_url
    assert cache_path_of("https://download.pytorch.org/models/resnet50-0676ba61.pth", "/cache") == \
        "/cache/download.pytorch.org/models/resnet50-0676ba61.pth"
    assert published_hash("https://download.pytorch.org/models/resnet50-0676ba61.pth") == "0676ba61"
    assert published_hash(url) is None  # "-50." is no hash: at least 8 hex digits are needed
    assert published_hash("https://x/detectron/X-101-64x4d.pkl") is None
    for bad in ("https://host/models/", "https://host/../etc/passwd"):
        with pytest.raises(ValueError, match="does not name a file"):
            cache_path_of(bad, "/cache")


def test_local_path_passes_through_or_is_named(tmp_path):
    path = tmp_path / "w.pkl"
    path.write_bytes(b"x")
    assert cached_weights_path(str(path), str(tmp_path / "cache"), "TRAIN.WEIGHTS") == str(path)
    with pytest.raises(FileNotFoundError, match="TRAIN.WEIGHTS 'nowhere.pkl' does not exist"):
        cached_weights_path("nowhere.pkl", str(tmp_path / "cache"), "TRAIN.WEIGHTS")


def test_progress_bar_on_a_terminal_only(server, tmp_path, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    server.files["/a.pkl"] = server.files["/b.pkl"] = b"x" * 3_000_000
    terminal, pipe = Terminal(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    cached_weights_path(server.url("/a.pkl"), str(tmp_path), "TRAIN.WEIGHTS")
    monkeypatch.setattr(sys, "stderr", pipe)
    cached_weights_path(server.url("/b.pkl"), str(tmp_path), "TRAIN.WEIGHTS")
    assert "a.pkl [" in terminal.getvalue() and "100.0% of 2.9 MB" in terminal.getvalue()
    assert "%" not in pipe.getvalue() and "Downloading TRAIN.WEIGHTS" in pipe.getvalue()  # a log keeps one line
