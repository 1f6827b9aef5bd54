"""Tokenization and the whole processor, equal to the reference's BLIP-2 processor.

- :class:`~blip2.images.ImageProcessor` (in ``images.py``, re-exported here) gives the pixels.
- :class:`TextTokenizer` runs ``tokenizer.json`` through the ``tokenizers`` library, with the pipeline the
  reference rebuilds for the tokenizer class named in ``tokenizer_config.json`` (GPT-2/OPT byte-level BPE,
  T5 Unigram, BERT WordPiece, LLaMA byte-fallback BPE): the reference does not use every part of
  ``tokenizer.json`` as written.
- :class:`Processor` puts them together: ``<image>`` × ``num_query_tokens`` before the (padded) prompt
  tokens, as the reference's ``Blip2Processor`` does; for InstructBLIP also the prompt in the Q-Former's
  own BERT vocabulary (``qformer_tokenizer/``), as ``InstructBlipProcessor`` does.

Shapes: ``B`` batch, ``T`` text tokens, ``Q`` query (image) tokens.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors

from blip2.errors import CheckpointError, InputError
from blip2.images import ImageProcessor

if TYPE_CHECKING:  # imported where used: reading the files needs no torch (see blip2.bulk)
    import torch

__all__ = ["IMAGE_TOKEN", "ImageProcessor", "Processor", "TextTokenizer"]

IMAGE_TOKEN = "<image>"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
_BYTE_TOKEN = re.compile(
    r"<0x[0-9A-Fa-f]{2}>"
)  # byte-fallback pieces (LLaMA)  # InstructBLIP's second tokenizer, in a folder of its own


# ============================================================================ text

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The reference's defaults for named special tokens, per tokenizer family (used when the config has none).
_FAMILY_DEFAULTS: dict[str, dict[str, str]] = {
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "t5": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "bert": {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    },
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "other": {},
}
# Where the reference's class pads when tokenizer_config.json does not say.
_FAMILY_PADDING_SIDE = {"llama": "left"}


def _family(tokenizer_class: str | None) -> str:
    """Which of the reference's rebuilt pipelines a ``tokenizer_class`` gets ("other": the file as is)."""
    name = (tokenizer_class or "").removesuffix("Fast").removesuffix("Tokenizer").lower()
    return {"gpt2": "gpt2", "opt": "gpt2", "t5": "t5", "bert": "bert", "llama": "llama"}.get(name, "other")


def _content(token: Any) -> str | None:
    """A special-token entry of a tokenizer config (a string or an AddedToken dict) as its text."""
    if token is None:
        return None
    if isinstance(token, Mapping):
        return token.get("content")
    return str(token)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e


class TextTokenizer:
    """Token ids and text for a checkpoint's tokenizer, equal to the reference's fast tokenizer."""

    def __init__(
        self,
        backend: Tokenizer,
        *,
        special_tokens: Mapping[str, str | None],
        padding_side: str = "right",
        clean_up_tokenization_spaces: bool = False,
        image_token: str = IMAGE_TOKEN,
        truncation_side: str = "right",
    ) -> None:
        if padding_side not in ("left", "right"):
            raise CheckpointError(f"tokenizer: padding_side must be 'left' or 'right', not {padding_side!r}")
        self.backend = backend
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.image_token = image_token
        self._lock = threading.Lock()  # the backend's truncation setting is shared state
        self._byte_tokens: frozenset[int] | None = None  # found on first use (decode_settled)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TextTokenizer:
        """Read ``tokenizer.json`` with ``tokenizer_config.json`` (and legacy ``special_tokens_map.json``)."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{path}: no tokenizer.json (the tokenizers-library file is required)")
        tokenizer_json = _read_json(file)
        config = (
            _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        )
        special_map = path / "special_tokens_map.json"
        if "added_tokens_decoder" not in config and special_map.is_file():
            # As the reference: the legacy map overrides the config's entries of the same name.
            config = {**config, **_read_json(special_map)}
        family = _family(config.get("tokenizer_class"))
        backend = _build_backend(tokenizer_json, config, family)

        special = dict(_FAMILY_DEFAULTS[family])
        for name in _SPECIAL_NAMES:
            if name in config:
                special[name] = _content(config[name])
        special = {k: v for k, v in special.items() if v is not None}
        # The reference registers every named and extra special token (adding those the vocab lacks).
        extra = _extra_special_tokens(config, family)
        to_add = [tok for tok in [*special.values(), *extra] if tok]
        backend.add_special_tokens(
            [AddedToken(tok, special=True, normalized=False) for tok in dict.fromkeys(to_add)]
        )
        _set_template(backend, family, special)

        image_token = _content(config.get("image_token"))
        extra_map = config.get("extra_special_tokens")
        if image_token is None and isinstance(extra_map, Mapping):
            image_token = _content(extra_map.get("image_token"))
        return cls(
            backend,
            special_tokens=special,
            padding_side=config.get("padding_side", _FAMILY_PADDING_SIDE.get(family, "right")),
            truncation_side=config.get("truncation_side", "right"),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            image_token=image_token or IMAGE_TOKEN,
        )

    # ------------------------------------------------------------------ special tokens

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("eos_token"))

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("pad_token"))

    @property
    def unk_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("unk_token"))

    @property
    def image_token_id(self) -> int | None:
        """Id of ``<image>``, or None when the tokenizer lacks it (see :meth:`add_image_token`)."""
        return self.token_to_id(self.image_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the reference's ``len(tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def add_image_token(self) -> int:
        """Add ``<image>`` as a special token if missing (as the reference processor does); its id."""
        if self.image_token_id is None:
            self.backend.add_special_tokens([AddedToken(self.image_token, special=True, normalized=False)])
        token_id = self.image_token_id
        assert token_id is not None
        return token_id

    # ------------------------------------------------------------------ encode / decode

    def encode(
        self, texts: str | Sequence[str], add_special_tokens: bool = True, max_length: int | None = None
    ) -> list[list[int]]:
        """Token ids per text, unpadded. ``max_length`` truncates (keeping the special tokens)."""
        texts = _check_texts(texts)
        with self._lock:
            if max_length is not None:
                if max_length < 1:
                    raise InputError(f"max_length must be positive, not {max_length}")
                self.backend.enable_truncation(max_length, direction=self.truncation_side)
            else:
                self.backend.no_truncation()
            try:
                encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            except Exception as e:  # the Rust side reports e.g. a max_length below the special tokens
                raise InputError(f"cannot tokenize the prompts: {e}") from e
            finally:
                self.backend.no_truncation()
        return [enc.ids for enc in encodings]

    def pad(
        self, ids: Sequence[Sequence[int]], padding_side: str | None = None, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to the longest (or ``length``); ``(input_ids, attention_mask)`` as ``(B, T)`` int64."""
        import torch

        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', not {side!r}")
        longest = max(len(seq) for seq in ids)
        target = longest if length is None else max(length, longest)
        pad_id = self.pad_token_id
        if pad_id is None and any(len(seq) != target for seq in ids):
            raise InputError("prompts of different lengths need padding, but the tokenizer has no pad token")
        input_ids = torch.full((len(ids), target), pad_id if pad_id is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(ids), target), dtype=torch.long)
        for row, seq in enumerate(ids):
            n = len(seq)
            cols = slice(target - n, target) if side == "left" else slice(0, n)
            input_ids[row, cols] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, cols] = 1
        return input_ids, mask

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):  # a tensor or array
            ids = ids.tolist()
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        # The reference skips this cleanup for BPE models, where it would eat real spaces.
        if self.clean_up_tokenization_spaces and self.backend.model.__class__.__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        if hasattr(sequences, "tolist"):  # a tensor or array
            sequences = sequences.tolist()
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def decode_settled(self, ids: Sequence[int]) -> str | None:
        """The text of ``ids`` if no later token can change it, else None (streaming: wait for more).

        Unsettled: a character cut between tokens (the text ends in U+FFFD), or, with byte fallback
        (LLaMA), a run of byte tokens, which decode together: one invalid byte more turns every byte
        of the run into U+FFFD."""
        if ids and ids[-1] in self._byte_token_ids():
            return None
        text = self.decode(ids)
        return None if text.endswith("\ufffd") else text

    def _byte_token_ids(self) -> frozenset[int]:
        if self._byte_tokens is None:
            byte_fallback = getattr(self.backend.model, "byte_fallback", False)
            vocab = self.backend.get_vocab() if byte_fallback else {}
            self._byte_tokens = frozenset(i for tok, i in vocab.items() if _BYTE_TOKEN.fullmatch(tok))
        return self._byte_tokens

    def __len__(self) -> int:
        return self.vocab_size


def _clean_up_tokenization(text: str) -> str:
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


def _extra_special_tokens(config: Mapping[str, Any], family: str) -> list[str]:
    extra = config.get("extra_special_tokens")
    if not isinstance(extra, list) or not extra:
        extra = config.get("additional_special_tokens") or []
    tokens = [t for t in (_content(x) for x in extra) if t]
    if family == "t5" and not any("<extra_id_" in t for t in tokens):
        tokens += [f"<extra_id_{i}>" for i in range(int(config.get("extra_ids", 100)))]
    return tokens


def _build_backend(tokenizer_json: dict[str, Any], config: Mapping[str, Any], family: str) -> Tokenizer:
    """The ``tokenizers`` pipeline the reference runs for this tokenizer class.

    For GPT-2/OPT, T5 and BERT classes the reference keeps the vocabulary, merges, added tokens (and for
    GPT-2 the post-processor) of ``tokenizer.json`` but sets the normalizer, pre-tokenizer, decoder and
    model options itself; other classes use the file as written.
    """
    data = dict(tokenizer_json)
    model = dict(data.get("model") or {})
    data["model"] = model
    if family == "gpt2" and model.get("type") == "BPE":
        model.update(
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    elif family == "t5" and model.get("type") == "Unigram":
        model.update(unk_id=2, byte_fallback=False)
    elif family == "bert" and model.get("type") == "WordPiece":
        model.update(unk_token=_content(config.get("unk_token")) or "[UNK]", continuing_subword_prefix="##")
    elif family == "llama" and model.get("type") == "BPE":
        model.update(fuse_unk=True, byte_fallback=True, dropout=None)
    else:
        family = "other"
    try:
        backend = Tokenizer.from_str(json.dumps(data))
    except Exception as e:
        raise CheckpointError(f"tokenizer.json cannot be read by the tokenizers library: {e}") from e

    if family == "gpt2":
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=bool(config.get("add_prefix_space", False))
        )
        backend.decoder = decoders.ByteLevel()
        # The post-processor stays the file's (add_bos_token/add_eos_token are ignored beside a tokenizer.json).
    elif family == "t5":
        charsmap = _precompiled_charsmap(tokenizer_json.get("normalizer"))
        backend.normalizer = normalizers.Precompiled(charsmap) if charsmap is not None else None
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            ]
        )
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    elif family == "bert":
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
            strip_accents=config.get("strip_accents"),
            lowercase=bool(config.get("do_lower_case", True)),
        )
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
    elif family == "llama":
        # The reference's LLaMA class: a leading "▁" on the first word only ("always" in its legacy mode,
        # none without a prefix space), bytes for unknown characters; the post-processor stays the file's.
        add_prefix_space = config.get("add_prefix_space")
        add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1))
        backend.decoder = decoders.Sequence(steps)
    return backend


def _set_template(backend: Tokenizer, family: str, special: Mapping[str, str]) -> None:
    """The post-processors the reference's T5 and BERT classes always install."""
    if family == "t5":
        eos = special.get("eos_token", "</s>")
        eos_id = backend.token_to_id(eos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:0 {eos}:0", special_tokens=[(eos, eos_id)]
        )
    elif family == "bert":
        cls_token, sep = special.get("cls_token", "[CLS]"), special.get("sep_token", "[SEP]")
        cls_id, sep_id = backend.token_to_id(cls_token), backend.token_to_id(sep)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls_token}:0 $A:0 {sep}:0",
            pair=f"{cls_token}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[
                (cls_token, 2 if cls_id is None else cls_id),
                (sep, 3 if sep_id is None else sep_id),
            ],
        )


def _precompiled_charsmap(normalizer: Any) -> str | None:
    if not isinstance(normalizer, Mapping):
        return None
    parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for part in parts:
        if isinstance(part, Mapping) and part.get("type") == "Precompiled" and "precompiled_charsmap" in part:
            return part["precompiled_charsmap"]
    return None


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, list | tuple):
        raise InputError(f"text must be a string or a list of strings, not {type(texts).__name__}")
    if not texts:
        raise InputError("text is an empty list: give at least one prompt")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"text[{i}] is a {type(t).__name__}, not a string")
    return list(texts)


# ============================================================================ both


@dataclass
class Processor:
    """Images and prompts to model inputs, as the reference's ``Blip2Processor``.

    With images and ``num_query_tokens`` set (generation checkpoints), each prompt is preceded by
    ``num_query_tokens`` image tokens, placed before the BOS token and outside the padding.
    """

    image_processor: ImageProcessor
    tokenizer: TextTokenizer
    num_query_tokens: int | None = None
    image_token_id: int | None = field(default=None)
    qformer_tokenizer: TextTokenizer | None = None  # InstructBLIP: the prompt for the Q-Former

    def __post_init__(self) -> None:
        # The reference adds `<image>` to every BLIP-2 tokenizer lacking it, whatever id is used.
        token_id = self.tokenizer.add_image_token()
        if self.image_token_id is None:
            self.image_token_id = token_id

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: Any = None,
        *,
        num_query_tokens: int | None = None,
        image_token_id: int | None = None,
    ) -> Processor:
        """Read a checkpoint directory's processor, preprocessor and tokenizer files.

        ``processor_config.json`` (written by the current reference, with an ``image_processor`` section
        and ``num_query_tokens``) wins over ``preprocessor_config.json`` (released checkpoints). Explicit
        ``num_query_tokens`` / ``image_token_id`` override the files. ``config`` (the model's) is only
        consulted for the image size when the checkpoint has no image-processor settings at all.
        """
        path = Path(path)
        processor_file, preprocessor_file = path / "processor_config.json", path / "preprocessor_config.json"
        processor_cfg = _read_json(processor_file) if processor_file.is_file() else {}
        preprocessor_cfg = _read_json(preprocessor_file) if preprocessor_file.is_file() else {}

        image_cfg = processor_cfg.get("image_processor")
        if not isinstance(image_cfg, Mapping):
            image_cfg = preprocessor_cfg
        if not image_cfg:
            image_size = getattr(getattr(config, "vision", None), "image_size", None)
            image_cfg = {"size": {"height": image_size, "width": image_size}} if image_size else {}
        image_processor = ImageProcessor.from_dict(image_cfg)

        if num_query_tokens is None:
            num_query_tokens = processor_cfg.get("num_query_tokens", preprocessor_cfg.get("num_query_tokens"))
        tokenizer = TextTokenizer.from_pretrained(path)
        qformer_tokenizer = None
        if getattr(config, "instruction_aware", False):
            if not (path / QFORMER_TOKENIZER_DIR / "tokenizer.json").is_file():
                raise CheckpointError(
                    f"{path}: an InstructBLIP checkpoint needs the Q-Former's tokenizer in {QFORMER_TOKENIZER_DIR}/"
                )
            qformer_tokenizer = TextTokenizer.from_pretrained(path / QFORMER_TOKENIZER_DIR)
        return cls(image_processor, tokenizer, num_query_tokens, image_token_id, qformer_tokenizer)

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """``pixel_values`` ``(B, 3, H, W)`` and/or ``input_ids``, ``attention_mask`` ``(B, T)`` (and for
        InstructBLIP ``qformer_input_ids``, ``qformer_attention_mask``).

        ``padding``: True/"longest" pads to the longest prompt, "max_length" to ``max_length``, False
        requires equal lengths. ``max_length`` counts the image tokens, as in the reference.
        """
        import torch

        if images is None and text is None:
            raise InputError("give images, text or both")
        out: dict[str, torch.Tensor] = {}
        if text is not None:
            texts = _check_texts(text)
            prefix = self.num_query_tokens if images is not None and self.num_query_tokens else 0
            text_max = None
            if max_length is not None:
                text_max = max_length - (self.num_query_tokens or 0)
                if text_max < 1:
                    raise InputError(
                        f"max_length={max_length} leaves no room for text after {self.num_query_tokens} image tokens"
                    )
            ids = self.tokenizer.encode(texts, max_length=text_max)
            if padding is False or padding == "do_not_pad":
                if len({len(seq) for seq in ids}) > 1:
                    raise InputError("prompts tokenize to different lengths: use padding=True")
                length = None
            elif padding is True or padding == "longest":
                length = None
            elif padding == "max_length":
                if text_max is None:
                    raise InputError("padding='max_length' needs max_length")
                length = text_max
            else:
                raise InputError(f"padding must be True, False, 'longest' or 'max_length', not {padding!r}")
            input_ids, mask = self.tokenizer.pad(ids, padding_side=padding_side, length=length)
            if prefix:
                assert self.image_token_id is not None
                batch = input_ids.shape[0]
                image_ids = torch.full((batch, prefix), self.image_token_id, dtype=torch.long)
                input_ids = torch.cat([image_ids, input_ids], dim=1)  # (B, Q + T)
                mask = torch.cat([torch.ones((batch, prefix), dtype=torch.long), mask], dim=1)
            out["input_ids"], out["attention_mask"] = input_ids, mask
            if self.qformer_tokenizer is not None:
                out["qformer_input_ids"], out["qformer_attention_mask"] = self.qformer_ids(texts)
        if images is not None:
            out["pixel_values"] = self.image_processor(images)
        return out

    def qformer_ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """InstructBLIP: the prompts in the Q-Former's vocabulary, right-padded: ids and mask (B, T)."""
        if self.qformer_tokenizer is None:
            raise InputError("this model's Q-Former reads no prompt (not an InstructBLIP checkpoint)")
        ids = self.qformer_tokenizer.encode(texts)
        return self.qformer_tokenizer.pad(ids, padding_side="right")

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_settled(self, ids: Sequence[int]) -> str | None:
        return self.tokenizer.decode_settled(ids)

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)
