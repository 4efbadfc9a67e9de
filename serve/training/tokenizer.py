"""A CLIP tokenizer learned here: byte-level BPE merges from a built-in word list (or a
caption corpus), deterministic, so no tokenizer is ever downloaded."""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

BUILT_IN_WORDS = """
a an the of and with on in at to from by for is are this that photo picture painting drawing image render
red green blue yellow orange purple pink black white gray grey brown cyan magenta gold silver colorful
circle square triangle star heart cross ring dot line stripe shape shapes small big large tiny huge
cat dog horse bird fish tree flower house car boat city mountain river sea sky sun moon cloud night day
portrait landscape forest street beach snow rain fire water stone glass metal wood paper cartoon anime
realistic detailed beautiful ugly bright dark soft sharp blurry quality high low best worst 4k hd
left right top bottom center middle background foreground above below near far one two three many
""".split()


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-unicode table (a fixed, public mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _learn_merges(words: Counter[tuple[str, ...]], num_merges: int) -> list[tuple[str, str]]:
    """Up to ``num_merges`` BPE merges, most frequent pair first, over words as symbol tuples."""
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        # Ties broken lexicographically so the vocabulary never depends on dict order.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def build_clip_vocab(
    num_merges: int, corpus: tuple[str, ...] | None = None
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a CLIP-style byte-level BPE vocabulary from a word list (default: the built-in one).

    Words are learned in their byte-level form (UTF-8 bytes through the byte-to-unicode
    table, as CLIP's tokenizer sees them), so non-Latin scripts merge like any other.
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocab_tokens = byte_chars + [c + "</w>" for c in byte_chars]
    table = _bytes_to_unicode()
    byte_words = ["".join(table[b] for b in w.encode("utf-8")) for w in (corpus if corpus is not None else BUILT_IN_WORDS)]
    merges = _learn_merges(Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in byte_words), num_merges)
    vocab_tokens += [a + b for a, b in merges]
    vocab_tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(vocab_tokens)}, merges


def build_tokenizer(corpus: tuple[str, ...] | None = None, *, num_merges: int, max_length: int):
    """A ``CLIPTokenizer`` learned from ``corpus`` (default: the built-in word list)."""
    from transformers import CLIPTokenizer

    vocab, merges = build_clip_vocab(num_merges, corpus)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_xlm_roberta_tokenizer(corpus: tuple[str, ...] | None = None, *, max_length: int = 512):
    """An ``XLMRobertaTokenizer`` (a SentencePiece unigram model, the 2.1 decoder's tokenizer
    kind) over ``corpus`` (default: the built-in word list): a piece per word, then single
    characters, deterministic scores; the special tokens at XLM-R's ids (``<s>`` 0, ``<pad>`` 1,
    ``</s>`` 2, ``<unk>`` 3, ``<mask>`` last)."""
    import math
    import string

    from transformers import XLMRobertaTokenizer

    words = corpus if corpus is not None else tuple(BUILT_IN_WORDS)
    characters = sorted({c for word in words for c in word} | set(string.ascii_letters + string.digits + string.punctuation))
    pieces = list(dict.fromkeys(["\u2581" + word for word in words] + ["\u2581"] + characters
                                + ["\u2581" + c for c in characters]))
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -math.log(2.0 + index)) for index, piece in enumerate(pieces)]  # earlier = likelier
    vocab.append(("<mask>", 0.0))
    tokenizer = XLMRobertaTokenizer(vocab=vocab)
    tokenizer.model_max_length = max_length
    return tokenizer


def build_bart_tokenizer(
    corpus: tuple[str, ...] | None = None, *, num_merges: int, max_length: int = 1024, extra_tokens: tuple[str, ...] = (),
    **named_tokens: str,
):
    """A ``BartTokenizer`` (GPT-2 byte-level BPE, no end-of-word marker; words after a space
    start with ``Ġ``) learned from ``corpus`` (default: the built-in word list), BART's
    special tokens at its ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>``
    last), then ``extra_tokens`` and ``named_tokens`` (e.g. ``image_token="<image>"``) as
    added special tokens."""
    from transformers import BartTokenizer

    table = _bytes_to_unicode()
    words = corpus if corpus is not None else tuple(BUILT_IN_WORDS)
    byte_words = ["".join(table[b] for b in (prefix + w).encode("utf-8")) for w in words for prefix in ("", " ")]
    merges = _learn_merges(Counter(tuple(w) for w in byte_words), num_merges)
    tokens = ["<s>", "<pad>", "</s>", "<unk>"] + list(table.values()) + [a + b for a, b in merges] + ["<mask>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, **named_tokens)
    tokenizer.add_special_tokens({"extra_special_tokens": list(extra_tokens) + list(named_tokens.values())})
    return tokenizer
