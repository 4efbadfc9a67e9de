"""A tiny random-weight Florence-2 checkpoint in the published transformers-native layout
(``florence-community/Florence-2-base``): ``config.json``, ``model.safetensors`` and the
processor's files, all at the top of one directory.

The BART tokenizer is learned here from the built-in word list and the processor's task
prompts, with Florence-2's added tokens (``<loc_0>``…``<loc_999>``, the task and region
tokens, ``<image>``), so the processor's own prompting, decoding and post-processing run
unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from serve.training.tokenizer import BUILT_IN_WORDS, build_bart_tokenizer

IMAGE_SIZE = 64  # pixels per side (768 in the published model)
HIDDEN = 32  # BART width and the vision projection's (768 in Florence-2-base)
VISION_DIMS = (8, 16, 16, 32)  # per stage; four stages of strides 4, 2, 2, 2 -> a 2x2 grid at 64 px
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // 32) ** 2 + 1  # grid positions + one pooled (temporal) token
NUM_MERGES = 300
MAX_POSITIONS = 256  # BART's positions (1024 published): image tokens + prompt, and generated tokens
INIT_STD = 0.5  # BART's 0.02 makes a random tiny decoder repeat one token whatever the image; wider weights vary

LOCATION_TOKENS = tuple(f"<loc_{i}>" for i in range(1000))
TASK_TOKENS = (
    "<od>", "</od>", "<ocr>", "</ocr>", "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>",
    "<grounding>", "</grounding>", "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>",
    "<region_to_desciption>", "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>",
)  # as published, "desciption" included
IMAGE_TOKEN = "<image>"

POST_PROCESSOR_CONFIG = {
    "ocr": {
        "PATTERN": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
        "AREA_THRESHOLD": 0.0,
    },
    "phrase_grounding": {"banned_grounding_tokens": ["the image"]},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}
"""Every parse type the processor's post-processor is asked for (it refuses unlisted ones)."""


PROMPT_WORDS = tuple("""
what does is the text in image with regions describe detail shown a paragraph locate objects category name
their descriptions region proposals phrases caption polygon mask of
""".split())
"""The processor's task-prompt words, learned as whole words as the published vocabulary has them."""


def florence2_tokenizer():
    """Florence-2's BART tokenizer, learned locally (``image_token`` is ``<image>``)."""
    return build_bart_tokenizer(
        tuple(dict.fromkeys(BUILT_IN_WORDS + list(PROMPT_WORDS))), num_merges=NUM_MERGES,
        extra_tokens=LOCATION_TOKENS + TASK_TOKENS, image_token=IMAGE_TOKEN, max_length=MAX_POSITIONS,
    )


def florence2_processor(tokenizer):
    """``Florence2Processor``: ``CLIPImageProcessor`` at ``IMAGE_SIZE`` (published settings otherwise)."""
    from transformers import CLIPImageProcessor, Florence2Processor

    image_processor = CLIPImageProcessor(
        do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3, do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_rescale=True, do_normalize=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=None,
    )
    image_processor.image_seq_length = IMAGE_SEQ_LENGTH
    return Florence2Processor(image_processor, tokenizer, post_processor_config=POST_PROCESSOR_CONFIG)


def florence2_config(tokenizer):
    """A tiny ``Florence2Config``: a four-stage DaViT and a one-layer BART."""
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    vision = Florence2VisionConfig(
        depths=(1, 1, 1, 1), embed_dim=VISION_DIMS, num_heads=(1, 2, 2, 4), num_groups=(1, 2, 2, 4),
        window_size=2, drop_path_rate=0.0, projection_dim=HIDDEN, max_position_embeddings=8,
        max_temporal_embeddings=4,
    )
    text = BartConfig(
        vocab_size=len(tokenizer), d_model=HIDDEN, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id, forced_bos_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id, scale_embedding=False, init_std=INIT_STD,
    )
    return Florence2Config(text_config=text, vision_config=vision, image_token_id=tokenizer.image_token_id)


def make_tiny_florence2(out_dir: Path | str, seed: int = 0) -> Path:
    """Write a tiny Florence-2 checkpoint (model and processor) into ``out_dir``."""
    from transformers import Florence2ForConditionalGeneration

    from deployments.florence2 import check_florence2_layout

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = florence2_tokenizer()
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(florence2_config(tokenizer)).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    processor = florence2_processor(tokenizer)
    processor.save_pretrained(out_dir)
    # The published layout keeps the image processor in its own preprocessor_config.json.
    processor.image_processor.save_pretrained(out_dir)
    processor_config = out_dir / "processor_config.json"
    config = json.loads(processor_config.read_text())
    config.pop("image_processor", None)
    processor_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return check_florence2_layout(out_dir)
