import hashlib

from serve.training.tiny import MAX_TOKENS, NUM_MERGES, make_tiny
from serve.training.tokenizer import build_clip_vocab, build_tokenizer


def _digest(root):
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_vocab_is_deterministic_and_clip_shaped():
    vocab, merges = build_clip_vocab(NUM_MERGES)
    assert (vocab, merges) == build_clip_vocab(NUM_MERGES)
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and "<|startoftext|>" in vocab
    assert len(set(vocab.values())) == len(vocab)


def test_tokenizer_round_trips_words_and_pads_to_context():
    tokenizer = build_tokenizer(num_merges=NUM_MERGES, max_length=MAX_TOKENS)
    ids = tokenizer("a red circle", padding="max_length", max_length=MAX_TOKENS).input_ids
    assert len(ids) == MAX_TOKENS
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a red circle"
    # Learned merges make common words single tokens; unknown scripts still encode (bytes).
    assert len(tokenizer("circle").input_ids) == 3
    assert len(tokenizer("красный круг").input_ids) > 3


def test_make_tiny_is_deterministic(tiny_checkpoint, tmp_path):
    again = make_tiny(tmp_path, seed=0)
    for mine, theirs in zip(again, tiny_checkpoint, strict=True):
        assert _digest(mine) == _digest(theirs)


def test_make_tiny_seed_changes_weights(tiny_checkpoint, tmp_path):
    other = _digest(make_tiny(tmp_path, seed=1).decoder)
    assert other["unet/diffusion_pytorch_model.safetensors"] != _digest(tiny_checkpoint[1])["unet/diffusion_pytorch_model.safetensors"]


def test_variants_share_the_decoders_movq_and_have_their_unets(tiny_checkpoint):
    import json

    movq = _digest(tiny_checkpoint.decoder / "movq")
    for variant, in_channels, addition in (
        (tiny_checkpoint.inpaint_decoder, 9, "image"),
        (tiny_checkpoint.controlnet_decoder, 8, "image_hint"),
    ):
        assert _digest(variant / "movq") == movq
        config = json.loads((variant / "unet" / "config.json").read_text())
        assert (config["in_channels"], config["addition_embed_type"]) == (in_channels, addition)
