"""Adapters named by Hugging Face Hub path (``user/repo[/subfolder]``, as PEFT's create_arrow_model
takes them), fetched through the Hub cache. No network: the cache is filled here and the Hub is
offline, which is also how a machine without network reads adapters it fetched before."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hub_constants

from lag_triton import AdapterError, Library
from lag_triton.library import add_adapters

from factories import make_adapter, tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """(cache folder, publish(folder, repo_id, subfolder=None)): an offline Hub whose cache holds what is published."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def publish(folder, repo_id, subfolder=None):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        target = repo / "snapshots" / COMMIT / (subfolder or "")
        shutil.copytree(folder, target, dirs_exist_ok=True)

    return cache, publish


@pytest.fixture(scope="module")
def local_adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    model = tiny_model("llama")
    return [make_adapter(model, tmp / f"a{i}", seed=20 + i, r=2 + i) for i in range(3)]


def _same_library(got: Library, want: Library) -> None:
    assert got.names == want.names and set(got.modules) == set(want.modules)
    for name, m in want.modules.items():
        for field in ("a_star", "b_star", "prototypes", "adapter_ids"):
            assert torch.equal(getattr(got.modules[name], field), getattr(m, field)), (name, field)


def test_hub_paths_build_the_library_their_folders_build(hub, local_adapters, tmp_path, monkeypatch):
    _, publish = hub
    publish(local_adapters[0], "user/one")
    publish(local_adapters[1], "user/experts", "ts_expert_0")
    publish(local_adapters[2], "user/experts", "deeper/ts_expert_1")
    sources = ["user/one", "user/experts/ts_expert_0", "user/experts/deeper/ts_expert_1"]
    want = Library.from_peft(local_adapters, names=sources, progress=False)
    fetches = []
    fetch = huggingface_hub.snapshot_download
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo, **kw: fetches.append(repo) or fetch(repo, **kw)
    )
    _same_library(Library.from_peft(sources, progress=False), want)  # names: the Hub paths as written
    assert sorted(fetches) == ["user/experts", "user/one"]  # one snapshot per repo, whatever its subfolders
    streamed = Library.from_peft(sources, progress=False, output=tmp_path / "lib.safetensors", workers=0)
    _same_library(streamed, want)
    grown = tmp_path / "grown.safetensors"
    Library.from_peft(local_adapters[:1], names=sources[:1], progress=False).save(grown)
    add_adapters(grown, sources[1:], workers=0, progress=False)
    _same_library(Library.load(grown), want)


def test_a_local_folder_is_read_where_it_is_even_when_it_looks_like_a_hub_path(hub, local_adapters, monkeypatch):
    cache, publish = hub
    publish(local_adapters[1], "adapters", "a0")  # would be "adapters/a0" on the Hub: never consulted
    monkeypatch.chdir(local_adapters[0].parent)
    got = Library.from_peft(["a0"], progress=False)
    _same_library(got, Library.from_peft(local_adapters[:1], progress=False))
    with pytest.raises(AdapterError, match=r"adapter 'nested/missing': is not a directory"):
        Library.from_peft([Path("nested/missing")], progress=False)  # a Path is always local
    with pytest.raises(AdapterError, match=r"adapter 'user/one/../x': is not a directory"):
        Library.from_peft(["user/one/../x"], progress=False)  # no Hub path climbs out of its repo


@pytest.mark.parametrize(
    "source, message",
    [
        ("user/absent", r"adapter 'user/absent': no such local folder, and fetching it from the Hugging Face "
                        r"Hub \(repo 'user/absent'\) failed: \w+"),
        ("user/experts/nope", r"adapter 'user/experts/nope': the Hugging Face Hub repo 'user/experts' has no "
                              r"nope/adapter_config.json"),
    ],
)  # fmt: skip
def test_hub_paths_that_cannot_be_read_are_refused_by_name(hub, local_adapters, source, message):
    _, publish = hub
    publish(local_adapters[0], "user/experts", "ts_expert_0")
    with pytest.raises(AdapterError, match=message):
        Library.from_peft(["user/experts/ts_expert_0", source], progress=False)


def test_the_command_line_builds_from_hub_paths(hub, local_adapters, tmp_path, capsys):
    from lag_triton.__main__ import EXIT_FAILED, main

    _, publish = hub
    publish(local_adapters[0], "user/one")
    publish(local_adapters[1], "user/experts", "ts_expert_0")
    out = tmp_path / "lib.safetensors"
    assert main(["build", "user/one", "user/experts/ts_expert_0", "-o", str(out), "-q", "--workers", "0"]) == 0
    assert Library.load(out).names == ["user/one", "user/experts/ts_expert_0"]
    capsys.readouterr()
    assert main(["build", "user/absent", "-o", str(tmp_path / "x.safetensors"), "-q"]) == EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adapter 'user/absent': no such local folder" in err[0], err
