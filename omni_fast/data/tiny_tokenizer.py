"""A tiny Qwen2.5-Omni processor directory, built offline and deterministically (no download, no torch).

Tests and the trainer's embedded demo need a real tokenizer + processor configuration but cannot fetch the hub's.
This writes one that behaves like the hub's in every way that matters for parity:

* a byte-level BPE with Qwen2's pre-tokenizer split regex and NFC normalisation, trained here on generated text to
  exactly 1000 ids, then the 14 Qwen special tokens appended in the hub's order, so that
  **tiny id = hub id - 150643** (``<|endoftext|>`` 1000, ``<|im_start|>`` 1001, ``<|im_end|>`` 1002, ``<|AUDIO|>``
  1003, ``<|audio_bos|>`` 1004, ``<|audio_eos|>`` 1005, ``<|vision_bos|>`` 1009, ``<|vision_eos|>`` 1010,
  ``<|IMAGE|>`` 1012, ``<|VIDEO|>`` 1013), matching ``tests/tiny_omni.py``'s ``TINY_IDS``;
* saved through ``Qwen2TokenizerFast`` with eos ``<|im_end|>``, pad ``<|endoftext|>`` and the seven media tokens as
  extra special tokens (the attributes ``Qwen2_5OmniProcessor`` reads);
* ``preprocessor_config.json`` holding the image-processor and Whisper feature-extractor settings merged in one
  file, as the hub ships it (``processor.save_pretrained`` would let the feature extractor's dict overwrite the
  image settings), and the hub's ``chat_template.json``.

The training corpus is generated (fixed English sentences plus syllable words), so the vocabulary does not depend
on which files some installed package happens to ship.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

__all__ = [
    "HUB_SPECIAL_TOKENS",
    "QWEN2_5_OMNI_CHAT_TEMPLATE",
    "TINY_BASE_VOCAB",
    "build_tiny_processor_dir",
]

# The hub's added tokens 151643..151656, in id order.
HUB_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|vision_pad|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
)
TINY_BASE_VOCAB = 1000  # ordinary ids; the specials follow, so tiny id = hub id - 150643

# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2 / Qwen2.5 checkpoint).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The hub's Qwen2.5-Omni chat template (also the one transformers' processor tests use).
QWEN2_5_OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Image processor (Qwen2VLImageProcessor) and feature extractor (WhisperFeatureExtractor) settings of the hub's
# Qwen2.5-Omni preprocessor_config.json: 300-s audio chunk (4,800,000 samples, 30000 mel frames), 128 mel bins.
HUB_PREPROCESSOR_CONFIG = {
    "chunk_length": 300,
    "dither": 0.0,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "hop_length": 160,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_pixels": 12845056,
    "merge_size": 2,
    "min_pixels": 3136,
    "n_fft": 400,
    "n_samples": 4800000,
    "nb_max_frames": 30000,
    "padding_side": "right",
    "padding_value": 0.0,
    "patch_size": 14,
    "processor_class": "Qwen2_5OmniProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "return_attention_mask": True,
    "sampling_rate": 16000,
    "temporal_patch_size": 2,
}

_SENTENCES = (
    "You are a helpful assistant.",
    "Describe the image and the sound.",
    "What is the video describing? What does the person say? What can you hear?",
    "A girl is drawing a picture of a guitar, and she feels nervous.",
    "They are celebrating on the soccer field; he is sliding on his knees.",
    "The red circle, the green square and the blue triangle are on a white background.",
    "It is the sound of glass shattering. A woman is coughing. The tone rises and falls.",
    "Please answer the question in one short sentence: who, what, where, when and why?",
)


def _training_text() -> str:
    """English sentences plus syllable words: enough distinct pairs for 744 merges, no randomness."""
    onsets = ("", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "th", "st", "pr", "gr")
    vowels = ("a", "e", "i", "o", "u", "ea", "ou")
    codas = ("", "n", "r", "s", "t", "ng", "ll")
    syllables = ["".join(p) for p in itertools.product(onsets, vowels, codas)]
    words = [a + b for a, b in itertools.product(syllables[::7], syllables[::11])]
    return "\n".join(_SENTENCES * 20) + "\n" + " ".join(words)


def _train_tokenizer():
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BASE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([_training_text()], trainer)
    if tok.get_vocab_size() != TINY_BASE_VOCAB:
        raise RuntimeError(f"tiny BPE has {tok.get_vocab_size()} ids, expected {TINY_BASE_VOCAB}")
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in HUB_SPECIAL_TOKENS]
    )
    return tok


def build_tiny_processor_dir(out_dir: str | Path) -> Path:
    """Write the tiny tokenizer and the hub's processor settings into ``out_dir`` (created); returns it.

    The directory loads with ``AutoTokenizer`` / ``Qwen2VLImageProcessor`` / ``WhisperFeatureExtractor`` (and
    ``AutoProcessor`` where torchvision is importable) and with :meth:`omni_fast.data.OmniProcessor.from_pretrained`.
    """
    from transformers import Qwen2TokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        extra_special_tokens={
            "image_token": "<|IMAGE|>",
            "audio_token": "<|AUDIO|>",
            "video_token": "<|VIDEO|>",
            "vision_bos_token": "<|vision_bos|>",
            "vision_eos_token": "<|vision_eos|>",
            "audio_bos_token": "<|audio_bos|>",
            "audio_eos_token": "<|audio_eos|>",
        },
    )
    tokenizer.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR_CONFIG, indent=2, sort_keys=True))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_5_OMNI_CHAT_TEMPLATE}, indent=2))
    return out
