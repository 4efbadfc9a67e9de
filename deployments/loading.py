"""Checkpoint layout checks and offline, safetensors-only loading.

The layouts are those of the published repositories ``kandinsky-2-2-prior`` and
``kandinsky-2-2-decoder``. Every component goes through its library's own
``from_pretrained`` with hub access off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Hub access is switched off before transformers/diffusers read their environment.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_WEIGHTS = ("config.json", "*.safetensors")
PRIOR_LAYOUT: dict[str, tuple[str, ...]] = {
    "prior": _WEIGHTS,
    "text_encoder": _WEIGHTS,
    "tokenizer": ("tokenizer_config.json", "vocab.json|tokenizer.json"),
    "image_encoder": _WEIGHTS,
    "image_processor": ("preprocessor_config.json",),
    "scheduler": ("scheduler_config.json",),
}
DECODER_LAYOUT: dict[str, tuple[str, ...]] = {
    "unet": _WEIGHTS,
    "movq": _WEIGHTS,
    "scheduler": ("scheduler_config.json",),
}
DECODER_21_LAYOUT: dict[str, tuple[str, ...]] = {
    **DECODER_LAYOUT,
    "text_encoder": _WEIGHTS,  # MultilingualCLIP
    "tokenizer": ("tokenizer_config.json", "tokenizer.json|sentencepiece.bpe.model"),
}
"""``kandinsky-2-1`` and ``kandinsky-2-1-inpaint``: the decoder carries its own text encoder."""
FLORENCE2_LAYOUT: dict[str, tuple[str, ...]] = {
    "": ("config.json", "*.safetensors", "preprocessor_config.json", "tokenizer_config.json",
         "vocab.json|tokenizer.json"),
}
"""``florence-community/Florence-2-base`` (transformers-native): one flat directory."""


class CheckpointError(RuntimeError):
    """A model directory that is missing, incomplete or not safetensors."""


def _present(folder: Path, pattern: str) -> bool:
    return any(
        any(folder.glob(option)) if "*" in option else (folder / option).is_file()
        for option in pattern.split("|")
    )


def check_layout(
    root: Path | str, layout: dict[str, tuple[str, ...]], what: str, parts: tuple[str, ...] | None = None,
    published: str | None = None,
) -> Path:
    """Raise :class:`CheckpointError` naming ``root`` and everything missing from it
    (a layout's ``""`` part is ``root`` itself; ``published`` names the expected repository)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{what} checkpoint directory {root} does not exist")
    missing = []
    for sub in parts or tuple(layout):
        folder = root / sub
        prefix = f"{sub}/" if sub else ""
        if not folder.is_dir():
            missing.append(f"{sub}/")
            continue
        for pattern in layout[sub]:
            if not _present(folder, pattern):
                hint = " (only .safetensors weights are loaded)" if pattern == "*.safetensors" and any(folder.glob("*.bin")) else ""
                missing.append(f"{prefix}{pattern.replace('|', ' or ')}{hint}")
    if missing:
        raise CheckpointError(
            f"{what} checkpoint directory {root} is incomplete: missing {', '.join(missing)} "
            f"(expected the layout of {published or f'kandinsky-2-2-{what}'})"
        )
    return root


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def load_pretrained(cls: Any, root: Path, subfolder: str, device: str | None = None, dtype: torch.dtype | None = None,
                    **extra: Any) -> Any:
    """``cls.from_pretrained`` for one component: local files, safetensors only, eval mode;
    ``extra`` goes to ``from_pretrained`` (e.g. transformers' ``attn_implementation``)."""
    kwargs: dict[str, Any] = {"subfolder": subfolder, "local_files_only": True, **extra}
    if hasattr(cls, "save_pretrained") and issubclass(cls, torch.nn.Module):
        kwargs["use_safetensors"] = True
        if dtype is not None:
            kwargs["torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"] = dtype
    try:
        component = cls.from_pretrained(str(root), **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        raise CheckpointError(f"could not load {subfolder}/ from {root}: {error}") from error
    if isinstance(component, torch.nn.Module):
        component = component.to(device or "cpu").eval().requires_grad_(False)
    return component
