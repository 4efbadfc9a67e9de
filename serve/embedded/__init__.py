"""The embedded default model: a tiny Kandinsky 2.2 trained on synthetic scenes, shipped as package data.

``prior/`` and ``decoder/`` are in the layouts of ``kandinsky-2-2-prior`` and
``kandinsky-2-2-decoder`` (safetensors, with ``model_index.json``), written by
``kandinsky-serve train tiny --out serve/embedded`` (see ``training_summary.json``
for the settings, the time each stage took and the last losses). The service
serves them when no checkpoint paths are configured; ``kandinsky-serve make-tiny``
still writes random-weight checkpoints for tests that need a given architecture.
"""

from __future__ import annotations

from pathlib import Path

from deployments.loading import DECODER_LAYOUT, PRIOR_LAYOUT, check_layout

EMBEDDED_DIR = Path(__file__).resolve().parent


def trained_checkpoint() -> tuple[Path, Path]:
    """(prior_dir, decoder_dir) of the shipped trained model, checked."""
    return (
        check_layout(EMBEDDED_DIR / "prior", PRIOR_LAYOUT, "prior"),
        check_layout(EMBEDDED_DIR / "decoder", DECODER_LAYOUT, "decoder"),
    )
