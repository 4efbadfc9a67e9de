"""A tiny random-weight Kosmos-2 checkpoint in the layout of ``microsoft/kosmos-2-patch14-224``.

The tokenizer is the built-in XLM-RoBERTa one (Kosmos-2's kind); ``Kosmos2Processor`` adds
its tag and ``<patch_index_NNNN>`` location tokens to it, as the published tokenizer has
them. The model keeps the published token layout (64 latent queries, a 32x32 location
grid) and shrinks only widths, depths and the image size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from serve.training.tokenizer import build_xlm_roberta_tokenizer

IMAGE_SIZE = 56  # 4x4 patches of 14 px (224 px, 16x16 patches in the real model)
PATCH_SIZE = 14
LATENT_QUERIES = 64  # the published latent_query_num: the processor's default image-token count
MAX_TOKENS = 256  # text positions (2048 in the real model)


def _processor():
    from transformers import CLIPImageProcessor, Kosmos2Processor

    # Squashed to a square, not cropped, as Kosmos-2's own demo feeds images.
    image_processor = CLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
    )
    return Kosmos2Processor(image_processor, build_xlm_roberta_tokenizer(max_length=MAX_TOKENS))


def _model(vocab_size: int, seed: int):
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    torch.manual_seed(seed)
    config = Kosmos2Config(
        text_config={"vocab_size": vocab_size, "embed_dim": 32, "layers": 2, "ffn_dim": 64, "attention_heads": 4,
                     "max_position_embeddings": MAX_TOKENS},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
        latent_query_num=LATENT_QUERIES,
    )
    return Kosmos2ForConditionalGeneration(config).eval()


def make_tiny_kosmos2(out_dir: Path | str, seed: int = 0) -> Path:
    """Write ``kosmos-2-patch14-224`` (model, image processor, tokenizer) under ``out_dir``; its path."""
    from deployments.kosmos2 import check_kosmos2_layout

    path = Path(out_dir) / "kosmos-2-patch14-224"
    processor = _processor()
    _model(len(processor.tokenizer), seed).save_pretrained(path, safe_serialization=True)
    processor.tokenizer.save_pretrained(path)
    # The published files: the image processor in preprocessor_config.json, naming the processor class.
    processor.image_processor.save_pretrained(path)
    preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    preprocessor["processor_class"] = "Kosmos2Processor"
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")
    (path / "processor_config.json").write_text(json.dumps(
        {"num_patch_index_tokens": processor.num_patch_index_tokens, "processor_class": "Kosmos2Processor"}, indent=2) + "\n")
    return check_kosmos2_layout(path)
