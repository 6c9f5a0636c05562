"""Hugging Face ``save_pretrained`` weights read per pipeline stage: a rank reads only what it holds.

``from_pretrained`` reads every tensor into one process; under a pipeline most of them belong to
other ranks. Here the transformers model is built on the meta device (:func:`meta_model`, e.g. in
the LightningModule's ``configure_model``), so building it costs no memory, and
:class:`PretrainedWeights` is given to the parts as ``PipelineParts(fill_part=weights.fill)``: when
the strategy places the stages, each part a rank owns is allocated on its device and filled from
the directory, and the parts it frees never get storage. A rank opens only the safetensors files
that hold one of its tensors and reads only those tensors (``safe_open`` + ``get_tensor``), so its
peak host memory is its stages plus the replicated encoder, not the whole model.

The tensors are the ones ``from_pretrained`` would load, bit for bit: checkpoint names go through
transformers' own renamings (old Llava checkpoints say ``language_model.model.layers.0...`` for
``model.language_model.layers.0...``), a tied parameter missing from the files (``lm_head.weight``
with ``tie_word_embeddings``) is read from the key it is tied to, and buffers the files do not hold
(non-persistent ones such as rotary ``inv_freq`` or CLIP ``position_ids``) are rebuilt by the
owning model's ``_init_weights``, as ``from_pretrained`` rebuilds them. Under ``strategy="auto"``
(nothing places stages) :meth:`PretrainedWeights.materialise` fills the whole model in one process.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from lightning_bigmac.runtime.aliases import parameter_aliases, retie

__all__ = ["PretrainedWeights", "meta_model", "rebuild_unsaved_buffers"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def meta_model(
    config: PretrainedConfig | str | Path,
    model_class: type[PreTrainedModel] | None = None,
    dtype: torch.dtype | str = "auto",
) -> PreTrainedModel:
    """The transformers model of ``config`` (a config, or a directory with ``config.json``) built on the
    meta device: no storage, and its initialisation writes nothing.

    ``model_class`` defaults to ``config.architectures[0]`` (what ``save_pretrained`` records), else
    the image-text-to-text class of the config's type. ``dtype="auto"`` is ``from_pretrained``'s
    default: ``config.dtype`` (else float32), so loaded tensors keep the checkpoint's precision.
    """
    config = (
        copy.deepcopy(config) if isinstance(config, PretrainedConfig) else AutoConfig.from_pretrained(config)
    )
    if model_class is None:
        names = config.architectures or []
        model_class = getattr(transformers, names[0], None) if names else None
        model_class = model_class or MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING.get(type(config), None)
        if model_class is None:
            raise ValueError(
                f"the {type(config).__name__} names no transformers model class (architectures={names}): "
                "pass model_class"
            )
    if dtype == "auto":
        dtype = config.dtype or torch.float32
    with torch.device("meta"):
        return model_class._from_config(config, dtype=dtype)


def _owners(model: PreTrainedModel) -> dict[int, PreTrainedModel]:
    """Each submodule's nearest enclosing ``PreTrainedModel`` (itself for one): whose ``_init_weights``
    initialises it, as ``initialize_weights`` dispatches it."""
    owners: dict[int, PreTrainedModel] = {}

    def walk(module: nn.Module, owner: PreTrainedModel) -> None:
        owner = module if isinstance(module, PreTrainedModel) else owner
        owners.setdefault(id(module), owner)
        for child in module.children():
            walk(child, owner)

    walk(model, model)
    return owners


def _unsaved_buffers(module: nn.Module) -> Iterator[nn.Module]:
    """Submodules of ``module`` with non-persistent buffers (not in any state dict, so never in a file)."""
    for sub in module.modules():
        if any(sub._buffers.get(name) is not None for name in sub._non_persistent_buffers_set):
            yield sub


def rebuild_unsaved_buffers(model: PreTrainedModel, device: torch.device | str = "cpu") -> None:
    """Compute the non-persistent buffers of ``model`` with the owning model's ``_init_weights``, as
    ``from_pretrained`` does; submodules holding them that are still on the meta device are first
    allocated on ``device``.

    ``_init_weights`` also initialises the parameters of those submodules (few: rotary and position
    embeddings): call it before the parameters get their real values.
    """
    modules = list(_unsaved_buffers(model))
    for sub in modules:
        if any(t.is_meta for t in (*sub.parameters(), *sub.buffers())):
            sub.to_empty(device=device)
    _initialise(_owners(model), modules)


def _initialise(owners: dict[int, PreTrainedModel], modules: list[nn.Module]) -> None:
    with torch.no_grad(), hf_init.guard_torch_init_functions():
        for sub in modules:
            owners[id(sub)]._init_weights(sub)


def _weight_map(directory: Path) -> dict[str, str]:
    """Checkpoint key -> safetensors file name, from the index (sharded) or the single file's header."""
    if (directory / _INDEX).is_file():
        return dict(json.loads((directory / _INDEX).read_text())["weight_map"])
    if (directory / _SINGLE).is_file():
        with safe_open(directory / _SINGLE, framework="pt") as f:
            return dict.fromkeys(f.keys(), _SINGLE)
    raise FileNotFoundError(
        f"{directory} has neither {_INDEX} nor {_SINGLE}: give a directory written by save_pretrained "
        "with safetensors (the default)"
    )


class PretrainedWeights:
    """The weights of the ``save_pretrained`` directory ``directory``, read into parts of ``model``.

    ``model`` is the transformers model the parts are made of (typically built by :func:`meta_model`);
    a part may be any module whose tensors belong to ``model``'s submodules (wrappers around them
    included). ``strict``: a tensor the files do not hold raises ``KeyError``; with ``strict=False`` it
    is initialised by the model's ``_init_weights``, as ``from_pretrained`` does for missing keys.

    :attr:`read` and :attr:`opened` record what this process read: the checkpoint keys, in order, and
    the files opened.
    """

    def __init__(self, directory: str | Path, model: PreTrainedModel, *, strict: bool = True) -> None:
        self.directory = Path(directory)
        self.model = model
        self.strict = strict
        self.read: list[str] = []
        """Checkpoint keys read by this process, in order."""
        self.opened: list[str] = []
        """Safetensors files opened by this process to read tensors, in order."""
        self._files = _weight_map(self.directory)
        self._names: dict[int, str] = {}
        for name, sub in model.named_modules(remove_duplicate=False):
            self._names.setdefault(id(sub), name)
        self._owners = _owners(model)
        self._sources, self._converted = self._checkpoint_names()
        self._tied = dict(getattr(model, "all_tied_weights_keys", None) or {})

    def _checkpoint_names(self) -> tuple[dict[str, str], list[str]]:
        """Model state-dict name -> checkpoint key, by the renamings ``from_pretrained`` applies; and the
        checkpoint keys that need a tensor conversion (fusing, splitting), which are not read here."""
        model = self.model
        wanted = dict.fromkeys(model.state_dict(), True)
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        sources: dict[str, str] = {}
        converted: list[str] = []
        for key in sorted(self._files, key=dot_natural_key):  # the order from_pretrained renames in
            name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, wanted)
            if name not in wanted and key in wanted:
                name, converter = rename_source_key(key, [], [], model.base_model_prefix, wanted)
            if converter is not None:
                converted.append(key)
            elif name in wanted:
                sources[name] = key
        return sources, converted

    def _source(self, name: str) -> str | None:
        """The checkpoint key holding model tensor ``name``, through a tie if the files store it once."""
        if name in self._sources:
            return self._sources[name]
        partner = self._tied.get(name) or next((t for t, s in self._tied.items() if s == name), None)
        return self._sources.get(partner) if partner is not None else None

    def _entries(self, module: nn.Module) -> dict[str, tuple[nn.Module, torch.Tensor]]:
        """``module``'s file-backed tensors (parameters, persistent buffers) by model name, with their
        submodule; each tensor once."""
        entries: dict[str, tuple[nn.Module, torch.Tensor]] = {}
        seen: set[int] = set()  # a tied parameter is read once, under its first name
        for sub in module.modules():
            held = [(n, t) for n, t in (*sub._parameters.items(), *sub._buffers.items()) if t is not None]
            if not held:
                continue
            prefix = self._names.get(id(sub))
            if prefix is None:
                raise ValueError(
                    f"{type(sub).__name__} holds tensors {[n for n, _ in held][:3]} but is not a submodule "
                    f"of the {type(self.model).__name__} these weights were opened for: parts must be made "
                    "of that model's modules"
                )
            for n, t in held:
                if n not in sub._non_persistent_buffers_set and id(t) not in seen:
                    seen.add(id(t))
                    entries[f"{prefix}.{n}" if prefix else n] = (sub, t)
        return entries

    def fill(self, module: nn.Module) -> None:
        """Give every tensor of ``module`` (allocated, e.g. by ``to_empty``) its value from the directory
        and rebuild its unsaved buffers. Reads only ``module``'s tensors, opening only their files.

        This is ``PipelineParts.fill_part``: the strategy calls it on each part the rank owns.
        """
        entries = self._entries(module)
        keys = {name: self._source(name) for name in entries}
        missing = sorted(name for name, key in keys.items() if key is None)
        if missing and self.strict:
            converted = (
                f"; {len(self._converted)} checkpoint keys need a tensor conversion this loader does not "
                f"do, e.g. {self._converted[:3]}"
                if self._converted
                else ""
            )
            raise KeyError(
                f"{self.directory} holds no tensor for {len(missing)} entries of this part, e.g. "
                f"{missing[:5]}{converted}: check it was saved from a {type(self.model).__name__}, or pass "
                "strict=False to initialise them as from_pretrained does"
            )
        initialise = {id(entries[name][0]): entries[name][0] for name in missing}
        initialise.update((id(sub), sub) for sub in _unsaved_buffers(module))
        _initialise(self._owners, list(initialise.values()))  # before the reads: it also writes parameters
        by_file: dict[str, list[tuple[str, torch.Tensor]]] = defaultdict(list)
        for name, key in keys.items():
            if key is not None:
                by_file[self._files[key]].append((key, entries[name][1]))
        with torch.no_grad():
            for file in sorted(by_file):
                self.opened.append(file)
                with safe_open(self.directory / file, framework="pt", device="cpu") as f:
                    for key, target in by_file[file]:
                        value = f.get_tensor(key)
                        if value.shape != target.shape:
                            raise ValueError(
                                f"{file}: {key} has shape {list(value.shape)} but the model's tensor has "
                                f"{list(target.shape)}: the config does not match the weights"
                            )
                        target.copy_(value)
                        self.read.append(key)

    def materialise(self, module: nn.Module, device: torch.device | str = "cpu") -> None:
        """Allocate ``module`` (built on the meta device) on ``device`` and :meth:`fill` all of it: the
        whole model in one process, where no strategy places stages (``strategy="auto"``).

        Shared parameters (tied embeddings) stay shared; a module already off the meta device is
        only filled.
        """
        if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            aliases = parameter_aliases(module)
            module.to_empty(device=device)
            retie(module, aliases)
        self.fill(module)
