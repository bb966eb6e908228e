"""A CLIP-format BPE tokenizer built offline from a word list.

Pretrained CLIP tokenizers come from a model hub, which these machines cannot reach. This writes a
`vocab.json` and `merges.txt` in CLIP's format, with BPE merges learned on a generated list of imaging
words and, optionally, the words of a dataset's prompts, so each of those words is one token. Any other
text still tokenizes: unknown words fall back to sub-word and byte tokens.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

IMAGING_WORDS = """
a an the of in on with without and or no not left right upper lower middle central peripheral bilateral
image images scan view slice patch photo x-ray xray radiograph chest lung lungs heart breast ultrasound
sonogram mammogram ct mri mr pet dermoscopy skin histopathology pathology tissue cell cells retina fundus
brain liver kidney bone spine knee abdomen pelvis thyroid prostate colon polyp endoscopy
pa ap lateral supine axial coronal sagittal frontal
lesion lesions mass nodule tumor tumour cyst benign malignant normal abnormal healthy disease finding
findings covid-19 covid pneumonia viral bacterial fungal ards tuberculosis effusion consolidation opacity
opacities ground-glass edema cardiomegaly atelectasis pneumothorax fracture calcification infiltrate
round irregular oval lobulated spiculated circumscribed smooth sharp blurred margin margins shadowing
enhancement hypoechoic hyperechoic isoechoic anechoic heterogeneous homogeneous small large tiny
phantom synthetic medical clinical patient male female adult child old young
""".split()

_WORD_PATTERN = re.compile(r"[^\W\d_]+|\d|[^\s\w]+", re.UNICODE)


def byte_symbols() -> dict[int, str]:
    """Map each byte to a printable unicode symbol, as GPT-2/CLIP byte-level BPE does."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return dict(sorted(symbols.items()))


def words_of(texts: Iterable[str]) -> Counter:
    """Lower-cased words of texts, split as CLIP's pre-tokenizer splits them."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(_WORD_PATTERN.findall(str(text).lower()))
    return counts


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-level BPE merges learned on `words` until each of them is one token.

    Plain BPE training (merge the most frequent adjacent pair, repeat), so encoding a listed word replays
    the training merges and yields exactly one whole-word token.
    """
    symbols = byte_symbols()
    pending = []
    for word in dict.fromkeys(words):
        pieces = [symbols[byte] for byte in word.encode("utf-8")]
        pieces[-1] += END_OF_WORD
        if len(pieces) > 1:
            pending.append(pieces)
    merges: list[tuple[str, str]] = []
    while pending:
        counts = Counter(pair for pieces in pending for pair in zip(pieces, pieces[1:]))
        best = max(counts.items(), key=lambda item: item[1])[0]  # first of equals: deterministic
        merges.append(best)
        pending = [merged for merged in (_merge_pair(pieces, best) for pieces in pending) if len(merged) > 1]
    return merges


def _merge_pair(pieces: list[str], pair: tuple[str, str]) -> list[str]:
    merged, position = [], 0
    while position < len(pieces):
        if position + 1 < len(pieces) and (pieces[position], pieces[position + 1]) == pair:
            merged.append(pieces[position] + pieces[position + 1])
            position += 2
        else:
            merged.append(pieces[position])
            position += 1
    return merged


def build_vocabulary(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-format vocabulary: every byte alone and word-final, one token per merge, then the specials."""
    base = list(byte_symbols().values())
    merges = learn_merges(words)
    tokens = base + [symbol + END_OF_WORD for symbol in base] + [left + right for left, right in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, merges


def write_tokenizer_files(output_dir: str | Path, extra_texts: Iterable[str] = ()) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config into `output_dir` and return it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    words = list(dict.fromkeys(IMAGING_WORDS))
    known = set(words)
    words += [word for word, _ in words_of(extra_texts).most_common() if word not in known]
    vocab, merges = build_vocabulary(words)
    (output_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (output_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return output_dir


def build_tokenizer(output_dir: str | Path, extra_texts: Iterable[str] = ()):
    """Write tokenizer files and return a `CLIPTokenizer` loaded from them, saved in transformers' layout."""
    from transformers import CLIPTokenizer

    output_dir = write_tokenizer_files(output_dir, extra_texts)
    # Loading by folder reads vocab.json and merges.txt under transformers 4 and 5 alike.
    tokenizer = CLIPTokenizer.from_pretrained(
        output_dir,
        model_max_length=MODEL_MAX_LENGTH,
        bos_token=START_TOKEN,
        eos_token=END_TOKEN,
        unk_token=END_TOKEN,
        pad_token=END_TOKEN,
    )
    tokenizer.save_pretrained(output_dir)
    return tokenizer
