"""Zoo entries: which model to build and where its weights come from.

A :class:`ZooEntry` names an architecture and one source of weights:

* a timm name, with weights through timm's normal ``pretrained=True`` path (which reads the local
  Hugging Face cache when offline), optionally pinned to a ``pretrained_tag`` such as ``a1_in1k``;
* a local checkpoint file (``weights=``): safetensors, or ``.pth``/``.pt``/``.bin`` read with
  ``torch.load(..., weights_only=True)`` only (nothing is ever unpickled);
* any ``nn.Module`` handed over through the Python API (:meth:`ZooEntry.from_module`);
* ``random_init=True``: the architecture with random weights, seeded from the entry name so a
  rebuild is bit-identical (structure-only work and tests).

:func:`resolve_zoo` turns the CLI's ``--zoo``/``--models``/``--weights``/``--random-init`` into
entries; :func:`build_model` turns an entry into an ``nn.Module`` in eval mode.

Provenance: the curated default zoo follows the spirit of DeRy's model zoo (Yang et al., "Deep
Model Reassembly", NeurIPS 2022: ResNets, RegNet, MobileNet, ViT/DeiT, Swin, ...) restricted to
names in timm's registry; checkpoint unwrapping ('state_dict'/'model' keys, 'module.' prefixes)
mirrors what timm's ``load_checkpoint`` and mergekit's loaders accept; the pydantic config style
follows mergekit. Written for this project; no code copied.

This module never imports :mod:`surgery`.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import os
import pickle
import re
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    RootModel,
    ValidationError,
    field_validator,
    model_validator,
)
from torch import nn

from zoo.errors import ZooError
from zoo.files import new_file_mode

__all__ = [
    "DEFAULT_TIMM_ZOO",
    "Zoo",
    "ZooEntry",
    "build_model",
    "data_config",
    "load_weights",
    "load_zoo_file",
    "resolve_zoo",
    "save_weights",
    "save_zoo_file",
]

# Names must be usable as folder names in a workspace, hence no '/' or whitespace.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Keys that would bypass the entry's own choice of weights (or unpickle through timm).
_RESERVED_KWARGS = ("pretrained", "checkpoint_path", "pretrained_cfg")
# Wrapper keys seen in training checkpoints (timm train.py, Lightning, DeiT/MAE, torchvision refs).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Prefixes left by DataParallel/DDP, torch.compile and Lightning modules.
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
_SHOW_KEYS = 4  # how many offending keys a one-line error lists


class ZooEntry(BaseModel):
    """One model of a zoo and the source of its weights.

    Exactly one weight source applies: ``weights`` (local file), ``random_init``, a module handed
    over with :meth:`from_module`, or else timm's pretrained weights (``pretrained_tag`` picks a
    tag). ``input_size`` only overrides the data config; to change the network's resolution pass
    ``img_size`` in ``model_kwargs``.
    """

    # Frozen: DEFAULT_TIMM_ZOO is shared, so entries are changed by copying (model_copy / _replace).
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Unique name of the entry (also a workspace folder name).")
    arch: str = Field("", description="timm architecture name; defaults to `name`.")
    weights: Path | None = Field(None, description="Local checkpoint (.safetensors, or .pth/.pt).")
    pretrained_tag: str | None = Field(None, description="timm pretrained tag, e.g. 'a1_in1k'.")
    random_init: bool = Field(False, description="Random weights seeded from `name`.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="timm.create_model kwargs.")
    input_size: tuple[int, int, int] | None = Field(None, description="(C, H, W) data-config override.")
    module_class: str | None = Field(
        None,
        description="Set by from_module: class path of a Python-provided module. Such an entry is "
        "rebuilt only by calling from_module again; its weights must be saved by the caller.",
    )

    # The live module of a from_module entry; never serialised.
    _module: nn.Module | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _default_arch(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and not data.get("arch") and isinstance(data.get("name"), str):
            data = {**data, "arch": data["name"]}
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a valid name (letters, digits, '_', '.', '-'; no spaces)")
        return value

    @field_validator("arch")
    @classmethod
    def _check_arch(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError(f"{value!r} is not a valid architecture name")
        return value

    @field_validator("pretrained_tag")
    @classmethod
    def _check_tag(cls, value: str | None) -> str | None:
        if value is not None and (not value or "." in value or any(c.isspace() for c in value)):
            raise ValueError(f"{value!r} is not a valid tag (the part after the '.', e.g. 'a1_in1k')")
        return value

    @field_validator("input_size")
    @classmethod
    def _check_input_size(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError(f"{value} must be three positive integers (C, H, W)")
        return value

    @field_validator("model_kwargs")
    @classmethod
    def _check_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in value if k in _RESERVED_KWARGS]
        if bad:
            raise ValueError(f"{bad[0]!r} is not allowed here; use the entry's weights/random_init fields")
        return value

    @model_validator(mode="after")
    def _one_weight_source(self) -> ZooEntry:
        sources = [
            n
            for n, on in (
                ("weights", self.weights is not None),
                ("random_init", self.random_init),
                ("pretrained_tag", self.pretrained_tag is not None),
            )
            if on
        ]
        if len(sources) > 1:
            raise ValueError(f"{' and '.join(sources)} are mutually exclusive: pick one source of weights")
        if self.pretrained_tag is not None and "." in self.arch:
            raise ValueError(f"arch {self.arch!r} already carries a tag; drop pretrained_tag")
        return self

    @classmethod
    def from_module(cls, name: str, module: nn.Module, *, weights: str | Path | None = None) -> ZooEntry:
        """Wraps a user-provided module as a zoo entry (Python API only).

        Args:
            name: Unique entry name.
            module: Any ``nn.Module``; :func:`build_model` returns this very object (not a copy).
            weights: Optional checkpoint loaded into ``module`` by :func:`build_model`.

        Returns:
            An entry whose ``to_dict`` records the module's class path; to write it to a zoo file,
            save its weights first (:func:`save_weights`) and pass them as ``weights``.
        """
        if not isinstance(module, nn.Module):
            raise ZooError(f"{name}: from_module needs an nn.Module, got {type(module).__name__}")
        path = f"{type(module).__module__}.{type(module).__qualname__}"
        entry = cls(name=name, arch=path, module_class=path, weights=weights)
        entry._module = module
        return entry

    @property
    def timm_name(self) -> str:
        """The name passed to ``timm.create_model`` (``arch`` plus ``.tag`` when a tag is set)."""
        return f"{self.arch}.{self.pretrained_tag}" if self.pretrained_tag else self.arch

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-ready dict of the fields that differ from their defaults."""
        # arch is left out when it only repeats the name, so files stay short.
        exclude = {"arch"} if self.arch == self.name else set()
        return self.model_dump(mode="json", exclude_defaults=True, exclude=exclude)


class Zoo(RootModel[list[ZooEntry]]):
    """A list of entries with unique names."""

    @model_validator(mode="after")
    def _unique_names(self) -> Zoo:
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.root):
            if entry.name in seen:
                raise ZooError(
                    f"entry {i}: field 'name': duplicate name {entry.name!r} (also entry {seen[entry.name]})"
                )
            seen[entry.name] = i
        return self


def _default_zoo() -> tuple[ZooEntry, ...]:
    names = (
        "resnet18",
        "resnet50",
        "resnet101",
        "resnext50_32x4d",
        "mobilenetv3_large_100",
        "regnety_016",
        "vit_tiny_patch16_224",
        "vit_small_patch16_224",
        "vit_base_patch16_224",
        "deit_small_patch16_224",
        "swin_tiny_patch4_window7_224",
        "swin_small_patch4_window7_224",
        "convnext_tiny",
        "efficientnet_b0",
    )
    return tuple(ZooEntry(name=n) for n in names)


#: Curated default zoo (``--zoo timm``): CNNs, ViTs and hierarchical transformers of 2-90 M
#: params, all ImageNet-pretrained in timm, like DeRy's zoo. Entries are frozen: copy them
#: (``model_copy``) to change a field.
DEFAULT_TIMM_ZOO: tuple[ZooEntry, ...] = _default_zoo()


# ----------------------------------------------------------------------------------------------
# Resolving --zoo / --models
# ----------------------------------------------------------------------------------------------


def _suggest(word: str, candidates: Iterable[str]) -> str:
    pool = sorted(set(candidates))
    close = difflib.get_close_matches(word.replace("*", "").replace("?", ""), pool, n=5, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _timm_matches(pattern: str) -> list[ZooEntry]:
    """timm models matching ``pattern``; tagged names ('resnet50.a1_in1k') select a pretrained tag."""
    if "." in pattern:
        found = timm.list_pretrained(pattern)
        out = []
        for tagged in found:
            arch, tag = tagged.split(".", 1)
            out.append(ZooEntry(name=tagged, arch=arch, pretrained_tag=tag))
        return out
    return [ZooEntry(name=n) for n in timm.list_models(pattern)]


def _select(entries: Sequence[ZooEntry], models: str | None, *, from_timm: bool, where: str) -> list[ZooEntry]:
    if models is None:
        return list(entries)
    patterns = [p.strip() for p in models.split(",") if p.strip()]
    if not patterns:
        raise ZooError(f"--models {models!r} names no model")
    selected: dict[str, ZooEntry] = {}
    for pattern in patterns:
        hits = [e for e in entries if fnmatch.fnmatchcase(e.name, pattern)]
        if not hits and from_timm:
            hits = _timm_matches(pattern)
        if not hits:
            pool = [e.name for e in entries] + (timm.list_models() if from_timm else [])
            raise ZooError(f"{pattern!r} matches no model in {where}{_suggest(pattern, pool)}")
        for entry in hits:
            selected.setdefault(entry.name, entry)
    return list(selected.values())


def _check_timm_arch(entry: ZooEntry) -> None:
    if entry.module_class is not None:
        return
    if not timm.is_model(entry.arch.split(".", 1)[0]):
        raise ZooError(
            f"{entry.name}: unknown timm architecture {entry.arch!r}{_suggest(entry.arch, timm.list_models())}"
        )


def resolve_zoo(
    zoo: str,
    models: str | None = None,
    *,
    random_init: bool = False,
    weights: str | Path | None = None,
) -> list[ZooEntry]:
    """Turns the CLI's zoo options into a list of entries.

    Args:
        zoo: ``"timm"`` for :data:`DEFAULT_TIMM_ZOO`, or a path to a zoo YAML file.
        models: Comma-separated names or wildcards (``fnmatch``), e.g. ``"resnet*,vit_small*"``;
            ``None`` selects the whole zoo. With ``zoo="timm"`` each pattern selects from the default
            zoo first and, only when it matches nothing there, from ``timm.list_models(pattern)``
            (so ``"test_vit*"`` or ``"resnet34"`` reach any timm model; ``"resnet50.a1_in1k"``
            selects a pretrained tag). With a zoo file, patterns select from that file only.
        random_init: Give every selected entry random (name-seeded) weights instead of its own.
        weights: Local checkpoint for the single selected model (``--weights FILE``).

    Returns:
        The selected entries, in pattern order, without duplicates.

    Raises:
        ZooError: Unknown zoo, a pattern that matches nothing (with close names), a bad zoo file,
            or ``weights`` given while more than one model is selected.
    """
    if zoo == "timm":
        entries = _select(DEFAULT_TIMM_ZOO, models, from_timm=True, where="the default timm zoo or timm")
    elif zoo.endswith((".yaml", ".yml")) or os.path.isfile(zoo):
        entries = _select(load_zoo_file(zoo), models, from_timm=False, where=zoo)
    else:
        raise ZooError(f"unknown zoo {zoo!r}: use 'timm' or the path of a zoo YAML file")
    for entry in entries:
        _check_timm_arch(entry)

    if weights is not None:
        if random_init:
            raise ZooError("--weights and --random-init are mutually exclusive")
        if len(entries) != 1:
            names = ", ".join(e.name for e in entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ZooError(f"--weights applies to a single model, but {len(entries)} are selected ({names})")
        entries = [_replace(entries[0], weights=Path(weights), random_init=False, pretrained_tag=None)]
    elif random_init:
        entries = [_replace(e, random_init=True, weights=None, pretrained_tag=None) for e in entries]
    return entries


def _replace(entry: ZooEntry, **changes: Any) -> ZooEntry:
    # model_copy skips validation; re-validate so the result is still a consistent entry.
    new = ZooEntry.model_validate({**entry.model_dump(), **changes})
    new._module = entry._module
    return new


# ----------------------------------------------------------------------------------------------
# Zoo files
# ----------------------------------------------------------------------------------------------


def _format_validation_error(path: str | Path, err: ValidationError, entries: list[Any]) -> str:
    first = err.errors()[0]
    loc = list(first.get("loc", ()))
    where = str(path)
    index = None
    if loc and isinstance(loc[0], int):
        index = loc.pop(0)
        name = entries[index].get("name") if isinstance(entries[index], Mapping) else None
        where += f": entry {index}" + (f" ({name!r})" if name else "")
    msg = first.get("msg", "invalid")
    if first.get("type") == "extra_forbidden":
        msg = f"unknown field (allowed: {', '.join(ZooEntry.model_fields)})"
    if not loc:  # a check across fields (model validator): its message names the fields
        return f"{where}: {msg}"
    field, inner = loc[0], "".join(f"[{p}]" for p in loc[1:])
    # Show the offending value of the field itself (pydantic's own input may be a missing item).
    entry = entries[index] if index is not None and isinstance(entries[index], Mapping) else {}
    got = f" (got {entry[field]!r})" if isinstance(entry, Mapping) and field in entry else ""
    return f"{where}: field {field!r}{inner}: {msg}{got}"


def load_zoo_file(path: str | Path) -> list[ZooEntry]:
    """Reads a zoo YAML file: a list of entries, or a mapping ``{models: [...]}``.

    Relative ``weights`` paths are resolved against the file's folder.

    Args:
        path: The YAML file.

    Returns:
        The validated entries.

    Raises:
        ZooError: Unreadable file, or an invalid entry (one line naming file, entry index, field).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ZooError(f"{path}: cannot read zoo file ({err.strerror or err})") from err
    except yaml.YAMLError as err:
        raise ZooError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if isinstance(data, Mapping) and set(data) == {"models"}:
        data = data["models"]
    if not isinstance(data, list):
        raise ZooError(f"{path}: a zoo file is a YAML list of entries or a mapping {{models: [...]}}")
    try:
        entries = Zoo.model_validate(data).root
    except ValidationError as err:
        raise ZooError(_format_validation_error(path, err, data)) from err
    except ZooError as err:  # duplicate names
        raise ZooError(f"{path}: {err}") from err
    for i, entry in enumerate(entries):
        if entry.weights is not None and not entry.weights.is_absolute():
            entries[i] = _replace(entry, weights=(path.parent / entry.weights).resolve())
    return entries


def _atomic_write(path: Path, write: Any) -> None:
    """Calls ``write(tmp_path)`` then renames onto ``path``, so a crash leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, new_file_mode(path))  # the mode a plain write gives, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_zoo_file(entries: Iterable[ZooEntry], path: str | Path) -> None:
    """Writes entries as a zoo YAML file (``{models: [...]}``) that :func:`load_zoo_file` reads back.

    Weights under the file's folder are written relative to it, so the folder can be moved.

    Args:
        entries: The entries; names must be unique.
        path: Destination; written atomically.

    Raises:
        ZooError: Duplicate names, or a :meth:`ZooEntry.from_module` entry whose weights were not
            saved (its module cannot be written to YAML).
    """
    path = Path(path)
    entries = Zoo(list(entries)).root
    records = []
    for entry in entries:
        if entry.module_class is not None and entry.weights is None:
            raise ZooError(
                f"{entry.name}: wraps a Python module ({entry.module_class}) that YAML cannot hold; "
                "save its weights with save_weights() and pass weights= to from_module first"
            )
        record = entry.to_dict()
        if entry.weights is not None:
            weights = entry.weights.resolve()
            try:
                record["weights"] = str(weights.relative_to(path.parent.resolve()))
            except ValueError:
                record["weights"] = str(weights)
        records.append(record)
    try:
        text = yaml.safe_dump({"models": records}, sort_keys=False)
    except yaml.YAMLError as err:
        raise ZooError(f"{path}: model_kwargs must hold plain YAML values ({err})") from err
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def _unwrap_checkpoint(obj: Any, source: str) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {'state_dict': {'model': {...}}}
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, Mapping) else type(obj).__name__
    raise ZooError(f"{source}: no state dict of tensors found (top level: {keys})")


def _strip_prefixes(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    # Strip a wrapper prefix only when every checkpoint key has it and no model key does, so a
    # model whose own modules are called 'model.*' is left alone.
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in model_keys):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _read_checkpoint(path: Path, source: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ZooError(f"{source}: checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ZooError(f"{source}: cannot read {path} as safetensors ({err})") from err
    if path.suffix not in _TORCH_SUFFIXES:
        raise ZooError(f"{source}: {path.name}: expected .safetensors or one of {', '.join(_TORCH_SUFFIXES)}")
    try:
        # weights_only=True: a checkpoint is data, never code; anything else is refused.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Name the offending class only; torch's full message is a paragraph of allow-list advice.
        found = re.search(r"GLOBAL (\S+)", str(err))
        detail = f" (found {found.group(1)})" if found else ""
        raise ZooError(
            f"{source}: {path.name} holds pickled Python objects{detail}, refused by torch.load(weights_only=True); "
            "re-save it as a plain state_dict or as safetensors"
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise ZooError(f"{source}: cannot read {path} ({str(err).splitlines()[0] if str(err) else err!r})") from err
    return _unwrap_checkpoint(obj, f"{source}: {path.name}")


def _alias_groups(state: Mapping[str, torch.Tensor]) -> list[set[str]]:
    """Names in a model's state_dict that are one tensor (tied weights)."""
    groups: dict[tuple, set[str]] = {}
    for name, t in state.items():
        if t.device.type == "meta" or t.numel() == 0:
            continue
        groups.setdefault((t.device, t.data_ptr(), tuple(t.shape), t.stride()), set()).add(name)
    return [g for g in groups.values() if len(g) > 1]


def _few(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_SHOW_KEYS]) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW_KEYS else "")


def load_weights(model: nn.Module, path: str | Path, *, source: str | None = None) -> nn.Module:
    """Loads a checkpoint into ``model``, strictly.

    Accepts safetensors (as written by :func:`save_weights`) and ``.pth``/``.pt`` files read with
    ``weights_only=True``; unwraps ``{'state_dict': ...}``/``{'model': ...}`` and strips
    ``module.``/``_orig_mod.``/``model.`` prefixes; tied tensors need only one of their names.

    Args:
        model: Target module (weights are copied in place, converted to its dtypes).
        path: Checkpoint file.
        source: Name used in error messages (defaults to the file name).

    Returns:
        ``model``.

    Raises:
        ZooError: Unreadable or pickled-object file, or keys/shapes that do not match (one line
            listing a few missing/unexpected keys).
    """
    path = Path(path)
    source = source or path.name
    own = model.state_dict()
    state = _strip_prefixes(_read_checkpoint(path, source), set(own))
    missing = set(own) - set(state)
    for group in _alias_groups(own):
        if group & set(state):
            missing -= group
    unexpected = set(state) - set(own)
    wrong = [k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong:
        k = sorted(wrong)[0]
        problems.append(
            f"shape mismatch in {len(wrong)} tensor(s), e.g. {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        )
    if problems:
        raise ZooError(f"{source}: {path.name} does not fit {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)  # strictness checked above, with tied names allowed
    return model


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Saves ``model``'s weights as safetensors, atomically; tied tensors are stored once.

    Args:
        model: Module with real (non-meta) tensors.
        path: Destination ``.safetensors`` file.

    Raises:
        ZooError: The model lives on the meta device (nothing to save).
    """
    from safetensors.torch import save_model

    if any(t.is_meta for t in model.state_dict().values()):
        raise ZooError(f"{type(model).__name__}: a structure-only (meta) model has no weights to save")
    _atomic_write(Path(path), lambda tmp: save_model(model, str(tmp), force_contiguous=True))


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


def _name_seed(name: str) -> int:
    # crc32 is stable across processes and Python versions (hash() is salted per process).
    return zlib.crc32(name.encode("utf-8"))


def _meta_copy(module: nn.Module) -> nn.Module:
    # Pre-fill deepcopy's memo with meta twins of every parameter and buffer, so the copy never
    # duplicates the real storage (a big user model would otherwise be held twice).
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _offline_error(entry: ZooEntry, err: BaseException) -> ZooError:
    from huggingface_hub import errors as hf_errors

    offline = (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)
    if isinstance(err, offline) or "connection" in str(err).lower():
        what = "pretrained weights not in the local Hugging Face cache and no network"
    else:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        what = f"cannot fetch pretrained weights ({type(err).__name__}: {first[:160]})"
    return ZooError(f"{entry.name}: {what}; pass --weights FILE, use --random-init, or populate the cache (HF_HOME)")


def _create_pretrained(entry: ZooEntry) -> nn.Module:
    from huggingface_hub import errors as hf_errors

    # timm silently returns random weights when a model has no pretrained config; refuse instead.
    if not timm.list_pretrained(entry.timm_name if "." in entry.timm_name else f"{entry.arch}.*"):
        tags = timm.list_pretrained(f"{entry.arch.split('.', 1)[0]}.*")
        hint = f" (known: {', '.join(t.split('.', 1)[1] for t in tags[:5])})" if tags else ""
        raise ZooError(
            f"{entry.name}: timm has no pretrained weights for {entry.timm_name!r}{hint}; "
            "pass --weights FILE or use --random-init"
        )
    fetch_errors: tuple[type[BaseException], ...] = (OSError, hf_errors.HfHubHTTPError, hf_errors.OfflineModeIsEnabled)
    try:
        import httpx  # huggingface_hub >= 1.0 talks httpx; its connect errors are not OSErrors

        fetch_errors += (httpx.HTTPError,)
    except ImportError:
        pass
    try:
        return timm.create_model(entry.timm_name, pretrained=True, **entry.model_kwargs)
    except fetch_errors as err:
        raise _offline_error(entry, err) from err


def build_model(entry: ZooEntry, *, device: str | torch.device = "cpu", structure_only: bool = False) -> nn.Module:
    """Builds an entry's model in eval mode.

    Args:
        entry: What to build.
        device: Where the weights go (ignored with ``structure_only``).
        structure_only: Build on the ``meta`` device: right modules and shapes, no weights in memory
            (instant even for big models). For a :meth:`ZooEntry.from_module` entry this is a meta
            copy; the user's module is untouched.

    Returns:
        The model, in eval mode. For a ``from_module`` entry, the user's module itself.

    Raises:
        ZooError: Unknown architecture (with close names), unreadable or mismatched checkpoint,
            or pretrained weights that are neither cached nor downloadable.
    """
    if entry.module_class is not None:
        module = entry._module
        if module is None:
            raise ZooError(
                f"{entry.name}: entry wraps a Python module ({entry.module_class}); re-create it with "
                "ZooEntry.from_module(name, module, weights=...)"
            )
        if structure_only:
            return _meta_copy(module).eval()
        if entry.random_init:
            raise ZooError(f"{entry.name}: random_init is not supported for a module from from_module")
        if entry.weights is not None:
            load_weights(module, entry.weights, source=entry.name)
        return module.to(device).eval()

    _check_timm_arch(entry)
    kwargs = entry.model_kwargs
    try:
        if structure_only:
            with torch.device("meta"):
                model = timm.create_model(entry.timm_name, pretrained=False, **kwargs)
            return model.eval()
        if entry.random_init:
            # Seed only the CPU generator inside fork_rng: the caller's RNG state is restored and
            # CUDA generators are never touched (torch.manual_seed would reseed them).
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(_name_seed(entry.name))
                model = timm.create_model(entry.timm_name, pretrained=False, **kwargs)
        elif entry.weights is not None:
            model = timm.create_model(entry.timm_name, pretrained=False, **kwargs)
            load_weights(model, entry.weights, source=entry.name)
        else:
            model = _create_pretrained(entry)
    except (TypeError, RuntimeError) as err:  # bad model_kwargs, invalid tag
        raise ZooError(f"{entry.name}: timm cannot build {entry.timm_name!r}: {str(err).splitlines()[0]}") from err
    return model.to(device).eval()


def data_config(entry: ZooEntry, model: nn.Module) -> dict[str, Any]:
    """Preprocessing the model expects: input_size, mean, std, interpolation, crop_pct, crop_mode.

    From timm's ``resolve_data_config`` (the model's pretrained config, or ImageNet defaults for a
    non-timm module), corrected for ``in_chans``/``img_size`` in ``model_kwargs`` (timm keeps the
    pretrained config's values) and then for the entry's ``input_size`` override.

    Args:
        entry: The entry the model was built from.
        model: The built model (a meta model is fine).

    Returns:
        A plain dict.
    """
    from timm.data import resolve_data_config

    cfg = dict(resolve_data_config({}, model=model))
    chans, height, width = cfg["input_size"]
    chans = int(entry.model_kwargs.get("in_chans", chans))
    img_size = entry.model_kwargs.get("img_size")
    if isinstance(img_size, int):
        height = width = img_size
    elif isinstance(img_size, (list, tuple)) and len(img_size) == 2:
        height, width = (int(v) for v in img_size)
    cfg["input_size"] = tuple(entry.input_size) if entry.input_size else (chans, height, width)
    if len(cfg["mean"]) != cfg["input_size"][0]:
        # e.g. in_chans=1 on an RGB-pretrained config: average the per-channel statistics.
        n = cfg["input_size"][0]
        cfg["mean"] = (sum(cfg["mean"]) / len(cfg["mean"]),) * n
        cfg["std"] = (sum(cfg["std"]) / len(cfg["std"]),) * n
    return cfg
