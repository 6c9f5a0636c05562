"""A trained run's weights as a Hugging Face ``save_pretrained`` directory (config + safetensors).

Under ``strategy="bigmac"`` no process holds the whole model, so the export reads the run's
checkpoint into one process, as :func:`~lightning_bigmac.checkpoint.consolidate` does but only the
model's entries (``model.<HF name>`` for :class:`~lightning_bigmac.hf.HFVLMModule`; no optimizer
state). They become the tensors of a transformers model built on the meta device (taken as they
are, nothing is copied or initialised), and ``save_pretrained`` writes it: checkpoint names as
transformers saves them, tied parameters stored once. A LightningModule that holds the whole model
in memory (after ``strategy="auto"``) is saved directly. ``bigmac export-hf CKPT OUT`` is the
command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from lightning_bigmac.checkpoint import files, sharded

from .weights import meta_model, rebuild_unsaved_buffers

__all__ = ["export_pretrained"]


def _config(config: PretrainedConfig | str | Path | None, hparams: Mapping[str, Any]) -> PretrainedConfig:
    """``config`` as a config; without it, one the module's hyper-parameters name: a config object,
    or a directory with ``config.json`` (e.g. the ``pretrained`` directory the run started from)."""
    if isinstance(config, PretrainedConfig):
        return config
    if config is not None:
        return AutoConfig.from_pretrained(config)
    for value in hparams.values():
        if isinstance(value, PretrainedConfig):
            return value
        if isinstance(value, str | Path) and (Path(value) / "config.json").is_file():
            return AutoConfig.from_pretrained(value)
    raise ValueError(
        "the checkpoint's hyper-parameters name no transformers config (a config object or a directory "
        f"with config.json; found {sorted(hparams)}): pass config= (--config), e.g. the directory the run "
        "was loaded from"
    )


def _read(checkpoint: Path, prefix: str) -> dict[str, Any]:
    """A checkpoint's hyper-parameters and state dict: of a BigMac checkpoint directory only the
    entries under ``prefix`` are read (no optimizer state), from whichever rank's file holds them."""
    if not files.is_sharded(checkpoint):
        return torch.load(checkpoint, map_location="cpu", weights_only=False)
    names = [k for k in files.read_meta(checkpoint)["bigmac"]["state_dict_keys"] if k.startswith(prefix)]
    return sharded.read_held(checkpoint, names, [])


def _from_state_dict(
    state: Mapping[str, torch.Tensor], config: PretrainedConfig, prefix: str
) -> PreTrainedModel:
    """The model of ``config`` holding ``state``'s entries under ``prefix`` (the tensors themselves)."""
    model = meta_model(config, dtype=torch.get_default_dtype())
    rebuild_unsaved_buffers(model)  # first: it initialises those submodules' parameters too
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    for target, source in tied.items():
        if target in weights and source in weights and not torch.equal(weights[target], weights[source]):
            raise ValueError(
                f"{prefix}{target} and {prefix}{source} differ, but the config ties them: the export would "
                "keep only one (pass a config with tie_word_embeddings=False if the run untied them)"
            )
    loaded = model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in loaded.missing_keys if k not in tied]
    if missing or loaded.unexpected_keys:
        raise KeyError(
            f"the checkpoint's {prefix!r} entries do not match a {type(model).__name__} of this config: "
            f"missing {missing[:5]}, unexpected {loaded.unexpected_keys[:5]}; check prefix and config"
        )
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(
            f"{left[:5]} have no values after loading the checkpoint: the export would lose them"
        )
    return model


def export_pretrained(
    source: str | Path | nn.Module,
    out: str | Path,
    *,
    config: PretrainedConfig | str | Path | None = None,
    prefix: str = "model.",
    max_shard_size: int | str = "5GB",
) -> PreTrainedModel:
    """Write ``source``'s transformers model to ``out`` with ``save_pretrained``; return the model.

    ``source``: a checkpoint (a BigMac checkpoint directory, or a one-file Lightning checkpoint), or
    a module holding the whole model in memory. ``prefix``: where the transformers model sits in the
    LightningModule's names (``"model."`` for :class:`~lightning_bigmac.hf.HFVLMModule`; ``""``: the
    module is the transformers model). ``config``: the model's config, or a directory with
    ``config.json``; by default read from the checkpoint's hyper-parameters. ``from_pretrained(out)``
    then loads the same weights in one process.
    """
    if isinstance(source, nn.Module):
        model = source.get_submodule(prefix.rstrip(".")) if prefix else source
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"{prefix or 'the module'} is a {type(model).__name__}, not a transformers model")
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise ValueError(
                "the module does not hold the whole model (a pipeline rank frees the stages it does not "
                "own): export from the run's checkpoint directory instead"
            )
        if config is not None:
            raise ValueError("config applies to checkpoints: an in-memory model is saved with its own config")
    else:
        checkpoint = _read(Path(source), prefix)
        cfg = _config(config, checkpoint.get("hyper_parameters") or {})
        model = _from_state_dict(checkpoint["state_dict"], cfg, prefix)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return model
