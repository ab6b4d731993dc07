"""What a Hugging Face folder carries besides its weights, kept through a jds round trip.

A ``transformers`` folder holds more than jds models: ``config.json`` fields jds has no use
for (``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``use_cache``,
``transformers_version``, dropouts, ...), ``generation_config.json`` and the tokenizer files.
``hf-to-orbax`` (and ``deepspeed-to-orbax --model <HF dir>``) record the first two in the
checkpoint's meta under ``"hf"`` (``record``), with the folder's absolute path for the
tokenizer files, which can be megabytes and are not copied into the checkpoint.
``orbax-to-hf`` finds that origin (``find_origin``), starts ``config.json`` from the recorded
one and overwrites only what jds owns (``merged_config``), writes ``generation_config.json``
as recorded and copies the tokenizer files (``copy_tokenizer``) when the folder still
exists, so a Llama 3 folder comes back as it went in.

Where the origin comes from, first match wins: an explicit ``model`` HF directory; the
checkpoint's ``meta["hf"]``; an older converted checkpoint's ``meta["source"]`` path; a
training checkpoint's ``meta["config"]["train"]["model"]`` when that is an HF directory still
on disk. The last two are folders read now, not a record, so they are used only when their
``config.json`` describes the checkpoint's model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from jds.models.gpt2 import GPT2Config
from jds.models.hf import config_from_hf
from jds.models.llama import LlamaConfig

# Files ``transformers`` tokenizers are saved as (fast and slow, BPE, SentencePiece,
# WordPiece) plus the chat template; copied when present, never anything else.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# config.json keys whose value jds decides: everything ``hf_config`` writes (shapes,
# architecture, rope, norms, biases, dtype) and the architecture-specific keys that would
# contradict it if a source value were kept.
_OWNED_EXTRA = frozenset({
    "torch_dtype", "dtype", "rope_scaling", "rope_parameters", "rope_theta", "head_dim",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    "attention_bias", "mlp_bias", "pretraining_tp", "hidden_act",
})
# ... except these, which describe the tokenizer or HF's own training (jds has no dropout
# and writes 0), not the weights: the source's values stand.
_SOURCE_WINS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id",
    "attention_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop",
})
# Execution settings of a jds config, not part of the checkpoint, at neutral values.
_RUNTIME_FIELDS = {"remat": "none", "attention_impl": None}


@dataclasses.dataclass(frozen=True)
class HFOrigin:
    """The Hugging Face folder a checkpoint came from, as far as it is known.

    Attributes:
      config: its ``config.json`` (all fields), or None.
      generation_config: its ``generation_config.json``, or None.
      tokenizer_dir: where the tokenizer files are (an existing directory), or None.
      where: a description for messages.
    """

    config: dict | None = None
    generation_config: dict | None = None
    tokenizer_dir: Path | None = None
    where: str = "no Hugging Face origin"


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def is_hf_dir(path: Any) -> bool:
    """A directory with a ``config.json``."""
    return isinstance(path, str | os.PathLike) and (Path(path) / "config.json").is_file()


def record(path: str | os.PathLike) -> dict[str, Any]:
    """The meta entry (``meta["hf"]``) recording a Hugging Face folder.

    Args:
      path: the folder (its ``config.json`` must exist).

    Returns:
      ``{"path": absolute path, "config": config.json, "generation_config": ...}`` (the
      last only when the folder has one).
    """
    path = Path(path).resolve()
    out: dict[str, Any] = {"path": str(path), "config": _read_json(path / "config.json")}
    gen = _read_json(path / "generation_config.json")
    if gen is not None:
        out["generation_config"] = gen
    return out


def _origin_of_dir(path: Path, where: str) -> HFOrigin:
    rec = record(path)
    return HFOrigin(rec["config"], rec.get("generation_config"), Path(rec["path"]), where)


def same_model(a: LlamaConfig | GPT2Config, b: LlamaConfig | GPT2Config) -> bool:
    """Equal model configs, ignoring execution settings (``remat``, ``attention_impl``)."""
    if type(a) is not type(b):
        return False
    return (dataclasses.replace(a, **_RUNTIME_FIELDS)
            == dataclasses.replace(b, **_RUNTIME_FIELDS))


def _describes(raw: dict, config: LlamaConfig | GPT2Config) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. Mistral's sliding-window cap
            return same_model(config_from_hf(raw), config)
    except (ValueError, KeyError, TypeError):
        return False


def find_origin(
    meta: dict[str, Any],
    config: LlamaConfig | GPT2Config,
    *,
    model: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> HFOrigin:
    """The Hugging Face folder a checkpoint came from (see the module docstring's order).

    Args:
      meta: the checkpoint's meta.
      config: the checkpoint's model config.
      model: the ``model`` the conversion was given (an HF directory is the origin).
      tokenizer: a directory to take the tokenizer files from instead.

    Raises:
      FileNotFoundError: ``tokenizer`` is not a directory.
    """
    origin = HFOrigin()
    rec = meta.get("hf")
    source = meta.get("source") or {}
    train_model = ((meta.get("config") or {}).get("train") or {}).get("model")
    if is_hf_dir(model):
        origin = _origin_of_dir(Path(model), f"the model directory {model}")
    elif isinstance(rec, dict) and isinstance(rec.get("config"), dict):
        path = Path(rec.get("path", ""))
        origin = HFOrigin(rec["config"], rec.get("generation_config"),
                          path if rec.get("path") and path.is_dir() else None,
                          f"the checkpoint's record of {rec.get('path')}")
        if origin.tokenizer_dir is None and tokenizer is None:
            warnings.warn(
                f"tokenizer files not copied: the source folder {rec.get('path')} no longer "
                "exists; pass the tokenizer's directory (orbax_to_hf(..., tokenizer=DIR))",
                stacklevel=3)
    else:
        for path, where in ((source.get("path") if source.get("format") == "huggingface"
                             else None, "the checkpoint's source folder"),
                            (train_model, "the training run's --model folder")):
            if is_hf_dir(path):
                found = _origin_of_dir(Path(path), f"{where} {path}")
                if _describes(found.config, config):
                    origin = found
                    break
                warnings.warn(
                    f"{where} {path} no longer describes the checkpoint's model; its "
                    "config.json fields, generation config and tokenizer are not carried "
                    "over (pass model=/--model with the right folder)", stacklevel=3)
    if tokenizer is not None:
        tdir = Path(tokenizer)
        if not tdir.is_dir():
            raise FileNotFoundError(f"tokenizer directory {tdir} does not exist")
        origin = dataclasses.replace(origin, tokenizer_dir=tdir)
    return origin


def _set_dtype(out: dict, source: dict, dtype: str) -> None:
    """Write ``dtype`` under the key(s) the source uses (``torch_dtype`` before
    transformers 5), ``dtype`` when it has neither."""
    keys = [k for k in ("torch_dtype", "dtype") if k in source] or ["dtype"]
    for k in ("torch_dtype", "dtype"):
        out.pop(k, None)
    for k in keys:
        out[k] = dtype


def merged_config(
    generated: dict[str, Any], source: dict[str, Any] | None, config: LlamaConfig | GPT2Config
) -> dict[str, Any]:
    """``config.json`` from the source's, with jds's values where jds owns the field.

    When the source still describes the model (same architecture, and
    ``config_from_hf(source)`` gives ``config``), it is kept field for field and only the
    dtype is set: the round trip of an unchanged model. Otherwise (another architecture, a
    retrained shape, other rope settings) every field jds owns comes from ``generated`` and
    only the others (token ids, ``use_cache``, dropouts, ``transformers_version``, ...) from
    the source.

    Args:
      generated: ``hf_config``'s output for ``config``.
      source: the source ``config.json``, or None (then ``generated`` is returned).
      config: the model written.

    Raises:
      RuntimeError: the merged config would not load back as ``config`` (a bug).
    """
    if not source:
        return dict(generated)
    dtype = generated["dtype"]
    out = dict(source)
    if list(source.get("architectures") or []) != generated["architectures"] \
            or not _describes(source, config):
        owned = set(generated) | _OWNED_EXTRA
        out = {k: v for k, v in source.items() if k not in owned or k in _SOURCE_WINS}
        out.update({k: v for k, v in generated.items()
                    if not (k in _SOURCE_WINS and k in source)})
    _set_dtype(out, source, dtype)
    if not _describes(out, config):
        raise RuntimeError(
            "jds.checkpoint.convert.hf_origin: the config.json merged from the source's would "
            "not load back as the checkpoint's model; the owned-field list is out of date")
    return out


def copy_tokenizer(src: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files ``src`` has (``TOKENIZER_FILES``) into ``out``.

    Returns:
      The names copied.
    """
    src, out = Path(src), Path(out)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


__all__ = [
    "TOKENIZER_FILES",
    "HFOrigin",
    "copy_tokenizer",
    "find_origin",
    "is_hf_dir",
    "merged_config",
    "record",
    "same_model",
]
