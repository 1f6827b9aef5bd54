"""The everyday handle: ``blip2.load()`` and what it returns."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from .allocator import keep_freed_memory
from .chat import (
    INSTRUCT_CAPTION_PROMPT,
    INSTRUCT_QUESTION_TEMPLATE,
    QUESTION_TEMPLATE,
    Conversation,
    PrefixCache,
)
from .errors import CheckpointError, InputError
from .generate import GenerationConfig, PrefillCache, check_forced, generate_ids, stream_ids
from .models.blip2 import Blip2
from .models.checkpoint import resolve_checkpoint
from .models.config import Blip2Config
from .models.weights import empty_modules, load_into, read_tensors, resolve_dtype, weight_files

log = logging.getLogger(__name__)

PREFIX_CACHE_SIZE = 64  # images whose prefix is kept (LRU)
PREFILL_CACHE_SIZE = 8  # images whose language-model keys/values (prefix + BOS) are kept (LRU)
VISION_CACHE_SIZE = (
    8  # InstructBLIP: images whose vision-encoder output is kept (the prefix also depends on the prompt)
)


def build_model(folder: Path, dtype: torch.dtype | str | None = None) -> tuple[Blip2, Blip2Config]:
    """Read ``config.json`` and the weights of a checkpoint folder into a ready ``Blip2`` (on CPU, eval).

    A quantized checkpoint (``blip2.quantize.checkpoint``) gets its low-bit layers built packed and
    filled from the file's tensors as they are.
    """
    from .quantize.checkpoint import saved_quantization

    cfg = Blip2Config.from_file(folder / "config.json")
    dtype = resolve_dtype(dtype)
    files = weight_files(folder)
    saved = saved_quantization(folder)
    with empty_modules():
        model = Blip2(cfg)
        packed = saved.prepare(model, cfg) if saved else set()
    origins: dict[str, Path] = {}
    tensors = read_tensors(files, origins)
    if saved:
        saved.check(model, tensors, origins, cfg)
    load_into(model, tensors, cfg, dtype, packed)
    return model.eval(), cfg


class Pipeline:
    """A loaded BLIP-2: the ``model`` (an ``nn.Module``), its ``processor``, and the everyday methods."""

    def __init__(self, model: Blip2, processor, folder: Path, device: torch.device):
        self.model = model
        self.processor = processor
        self.folder = folder
        self.device = device
        self.prefix_cache = PrefixCache(PREFIX_CACHE_SIZE)
        self.prefill_cache = PrefillCache(PREFILL_CACHE_SIZE)  # OPT: image + BOS keys/values per image
        self.vision_cache = PrefixCache(VISION_CACHE_SIZE if model.cfg.instruction_aware else 0)
        self.generation_config = _generation_defaults(folder, model.cfg)
        self.decoder = None  # a fastdecode.StaticDecoder with blip2.load(..., compile=...)

    @property
    def config(self) -> Blip2Config:
        return self.model.cfg

    def clear_caches(self) -> None:
        """Forget what was computed per image (image prefixes, prefilled keys / values): needed after the
        model's weights change in place (``blip2.quantize.calibrate``, training)."""
        self.prefix_cache.clear()
        self.prefill_cache.clear()
        self.vision_cache.clear()

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the model as loaded to ``folder`` (hub layout): a quantized model's low-bit layers as their
        packed tensors (``blip2.load(folder)`` then maps them, quantizing nothing), the rest as the source
        checkpoint has it; tokenizer, processor and generation files copied."""
        from .quantize.checkpoint import save
        from .quantize.cuda import cuda_quantized

        if cuda_quantized(self.model):
            raise ValueError("CUDA int8 / int4 layers are not saved: save a CPU-quantized or float model")
        return save(self.model, self.folder, folder)

    def __repr__(self) -> str:
        kind = "retrieval" if self.config.retrieval else (self.config.text.kind if self.config.text else "?")
        dtype = self.model.vision.patch_embed.weight.dtype
        return f"Pipeline({str(self.folder)!r}, {kind}, device={self.device}, dtype={dtype})"

    # ---- generation: captioning, questions, chat -----------------------------------------------

    def generate(self, images, prompts, **gen) -> list[str]:
        """Continuation of each prompt for its image (one prompt for all images, or one per image).

        ``gen``: ``max_new_tokens``, ``min_new_tokens``, ``num_beams``, ``length_penalty``,
        ``early_stopping``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
        ``repetition_penalty``; defaults come from the checkpoint's ``generation_config.json``.
        """
        return [self.processor.decode(ids) for ids in self.generate_ids(images, prompts, **gen)]

    def generate_ids(self, images, prompts, **gen) -> list[list[int]]:
        """As :meth:`generate`, the new token ids (EOS included when produced)."""
        lm, embeds, mask, ids, ids_mask, cfg, shared = self._prepare(images, prompts, gen)
        with torch.inference_mode():
            return generate_ids(
                lm, embeds, mask, cfg, ids, ids_mask, self.prefill_cache, shared, decoder=self.decoder
            )

    def stream(self, image, prompt: str | None = None, **gen) -> Iterator[str]:
        """Yield the continuation of ``prompt`` for one image piece by piece, as it is produced."""
        yield from self._stream_text(self.generate_steps(image, prompt, **gen))

    def generate_steps(
        self, images, prompts, forced: list[list[int]] | None = None, **gen
    ) -> Iterator[list[int | None]]:
        """As :meth:`generate_ids`, step by step: each row's new token per step (None once the row is
        done). A batch streams as one (the server batches streaming requests with it). Beam search
        yields its finished result, one token per step, at the end. Bad input raises here, at the call.

        ``forced``: per row, token ids taken as its first new tokens instead of choosing them (they are
        yielded too). A run cut short resumes this way: greedy then goes on as the uncut run did.
        Greedy or sampling only."""
        lm, embeds, mask, ids, ids_mask, cfg, _ = self._prepare(images, prompts, gen)
        check_forced(forced, embeds.shape[0], cfg, lm.lm_head.out_features)
        return _steps(lm, embeds, mask, cfg, ids, ids_mask, forced, self.decoder)

    def caption(self, images, prompt: str | None = None, **gen) -> list[str]:
        """A caption per image; ``prompt`` (e.g. "a photo of") is continued. No prompt: image + BOS only
        (InstructBLIP: the instruction ``A short image description:``, its paper's captioning prompt)."""
        return self.generate(images, self.caption_prompt if prompt is None else prompt, **gen)

    @property
    def caption_prompt(self) -> str:
        """What ``caption`` continues by default: nothing (BLIP-2), ``A short image description:`` (InstructBLIP)."""
        return INSTRUCT_CAPTION_PROMPT if self.config.instruction_aware else ""

    @property
    def question_template(self) -> str:
        """How ``ask`` words a question: ``Question: {} Answer:`` (BLIP-2), the bare question (InstructBLIP)."""
        return INSTRUCT_QUESTION_TEMPLATE if self.config.instruction_aware else QUESTION_TEMPLATE

    def ask(self, image, question: str | Sequence[str], template: str | None = None, **gen):
        """The answer to ``question`` about one image (worded by :attr:`question_template` by default).

        Several questions (a list) are answered together, in one decode: the image is encoded and
        prefilled once, and each step reads the weights once for all of them. Returns a list then."""
        template = template or self.question_template
        if isinstance(question, str):
            return self.generate(image, template.format(question), **gen)[0]
        questions = list(question)
        if not questions or not all(isinstance(q, str) for q in questions):
            raise InputError("questions must be a non-empty list of strings")
        pixels = self._pixels([image])
        return self.generate(
            pixels.expand(len(questions), -1, -1, -1), [template.format(q) for q in questions], **gen
        )

    def chat(self, image, **gen) -> Conversation:
        """A conversation about one image: ``.say(text)`` returns the reply and keeps the history."""
        return Conversation(self, image, gen)

    # ---- generation internals -------------------------------------------------------------

    def image_prefix(self, pixel_values: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, Q, D_lm) prefix, through the cache keyed by pixel content.

        InstructBLIP: the prefix also depends on each row's prompt (``prompts``, one per row; none: empty
        instructions), which the Q-Former reads; the key names both, and the vision encoder's output is
        cached by pixels alone, so new prompts about an image cost only the Q-Former.
        """
        model = self.model
        dtype = model.vision.patch_embed.weight.dtype
        pixel_keys = [self.prefix_cache.key(p, dtype, self.device) for p in pixel_values]
        instructions: list[list[int]] | None = None
        keys = pixel_keys
        if model.cfg.instruction_aware:
            texts = list(prompts) if prompts is not None else [""] * len(pixel_keys)
            instructions = self.processor.qformer_tokenizer.encode(texts)
            keys = [f"{k}|{','.join(map(str, ids))}" for k, ids in zip(pixel_keys, instructions, strict=True)]
        # rows held locally: a batch larger than the cache must not lose rows it has just computed
        rows: dict[str, torch.Tensor] = {}
        missing = []
        for i, k in enumerate(keys):
            if k not in rows:
                rows[k] = self.prefix_cache.get(k)
                if rows[k] is None:
                    missing.append(i)
        if missing:
            with torch.inference_mode():
                if instructions is None:
                    computed = model.image_prefix(pixel_values[missing].to(self.device))
                else:
                    computed = self._instructed_prefix(pixel_values, pixel_keys, instructions, missing)
            for i, row in zip(missing, computed, strict=True):
                rows[keys[i]] = row
                self.prefix_cache.put(keys[i], row)
        return torch.stack([rows[k] for k in keys])

    def _instructed_prefix(
        self, pixel_values, pixel_keys, instructions, rows: list[int]
    ) -> list[torch.Tensor]:
        """InstructBLIP prefixes of ``rows``: each distinct image through the vision encoder once (or from
        the cache), then the Q-Former over rows grouped by instruction length, so that no row is padded
        and each equals its run alone."""
        model = self.model
        vision: dict[str, torch.Tensor] = {}
        todo = []
        for i in rows:
            k = pixel_keys[i]
            if k not in vision:
                vision[k] = self.vision_cache.get(k)
                if vision[k] is None:
                    todo.append(i)
        if todo:
            for i, out in zip(todo, model.vision(pixel_values[todo].to(self.device)), strict=True):
                vision[pixel_keys[i]] = out
                self.vision_cache.put(pixel_keys[i], out)
        by_length: dict[int, list[int]] = {}
        for i in rows:
            by_length.setdefault(len(instructions[i]), []).append(i)
        out: dict[int, torch.Tensor] = {}
        for group in by_length.values():
            ids = torch.tensor([instructions[i] for i in group], dtype=torch.long, device=self.device)
            feats = torch.stack([vision[pixel_keys[i]] for i in group])
            for i, prefix in zip(group, model.query_features(feats, ids).prefix, strict=True):
                out[i] = prefix
        return [out[i] for i in rows]

    def _pixels(self, images) -> torch.Tensor:
        return self.processor.image_processor(images)

    def _prepare(self, images, prompts, gen: dict):
        """Pixels -> prefix, prompts -> padded ids, merged into the language model's inputs."""
        lm = self.model._lm()
        cfg = self.generation_config.updated(**gen)
        pixels = images if isinstance(images, torch.Tensor) and images.dim() == 4 else self._pixels(images)
        batch = pixels.shape[0]
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts or ""] * batch
        elif isinstance(prompts, list | tuple):
            if not prompts:
                raise InputError("the list of prompts is empty: give one prompt per image, or one for all")
            prompts = ["" if p is None else p for p in prompts]
            if len(prompts) == 1 and batch > 1:
                prompts = prompts * batch
        else:
            raise InputError(f"prompts must be a string or a list of strings, not {type(prompts).__name__}")
        if len(prompts) != batch:
            raise InputError(f"{len(prompts)} prompts for {batch} images: give one per image, or one for all")
        prefix = self.image_prefix(pixels, prompts)
        ids, ids_mask, cfg, head = self._prompt_ids(prompts, cfg)
        ids, ids_mask = ids.to(self.device), ids_mask.to(self.device)
        with torch.inference_mode():
            embeds, mask = self.model.merge_prefix(prefix, ids, ids_mask)
        # OPT: leading positions every row has unpadded (a prefix put in front, then the ids before the
        # padding), which the runner prefills once when all rows share them
        shared = embeds.shape[1] - ids.shape[1] + head if self.model.cfg.is_decoder_only else 0
        return lm, embeds, mask, ids, ids_mask, cfg, shared

    def _prompt_ids(self, prompts: list[str], cfg: GenerationConfig):
        """Token ids with ``<image>`` slots (when the config has them), padded, and how many leading ids
        every row has unpadded. OPT / LLaMA: padding after the image slots and BOS; T5: right (its encoder)."""
        model_cfg = self.model.cfg
        tokenizer = self.processor.tokenizer
        q = model_cfg.num_query_tokens
        ids = tokenizer.encode(prompts)
        slots = [model_cfg.image_token_index] * q if model_cfg.image_token_index is not None else []
        ids = [slots + seq for seq in ids]
        text = model_cfg.text
        if model_cfg.is_decoder_only:
            limit = text.max_position_embeddings
            longest = max(len(seq) for seq in ids) + (0 if slots else q)
            if longest > limit:
                raise InputError(
                    f"the prompt is {longest} tokens long (image tokens included); "
                    f"the model's context holds {limit}"
                )
            if longest + cfg.max_new_tokens > limit:
                room = limit - longest
                if room < 1:
                    raise InputError(
                        f"the prompt fills the model's context ({longest} of {limit} tokens): no room to generate"
                    )
                log.warning(
                    "max_new_tokens=%d clipped to %d: the prompt takes %d of the model's %d positions",
                    cfg.max_new_tokens,
                    room,
                    longest,
                    limit,
                )
                cfg = cfg.updated(max_new_tokens=room)
        if not model_cfg.is_decoder_only:
            input_ids, mask = tokenizer.pad(ids, padding_side="right")  # T5's encoder
            return input_ids, mask, cfg, 0
        # OPT: padding goes after the image slots and BOS, which every row has, so those positions line
        # up across rows (prefilled once when the rows share an image); positions come from the mask, so
        # each row still equals its run alone
        keep = len(slots)
        bos = tokenizer.bos_token_id
        # a row that is only image + BOS cannot take padding after them (a row must end on a real token):
        # then BOS stays with the prompts, unless every row is just that and none needs padding
        only_head = [len(seq) == keep + 1 for seq in ids]
        if all(len(seq) > keep and seq[keep] == bos for seq in ids) and (
            all(only_head) or not any(only_head)
        ):
            keep += 1
        rests, rests_mask = tokenizer.pad([seq[keep:] for seq in ids], padding_side="left")
        head = torch.tensor([seq[:keep] for seq in ids], dtype=torch.long).view(len(ids), keep)
        input_ids = torch.cat([head, rests], dim=1)
        mask = torch.cat([torch.ones_like(head), rests_mask], dim=1)
        return input_ids, mask, cfg, keep

    def _stream_text(self, steps) -> Iterator[str]:
        """Token steps of one row -> text pieces, held back while the text is not settled (a character
        cut between tokens)."""
        tokens: list[int] = []
        sent = ""
        for row in steps:
            token = row[0]
            if token is None:
                break
            tokens.append(token)
            text = self.processor.decode_settled(tokens)
            if text is None:
                continue
            if len(text) > len(sent) and text.startswith(sent):
                yield text[len(sent) :]
                sent = text
        text = self.processor.decode(tokens)
        if len(text) > len(sent) and text.startswith(sent):
            yield text[len(sent) :]

    # ---- retrieval (blip2.retrieval, blip2.index) ---------------------------------------------------

    def itm(self, images, texts, batch_size: int = 32) -> torch.Tensor:
        """(n,) match probability of each (image, text) pair (retrieval checkpoints)."""
        from .retrieval import itm

        return itm(self, images, texts, batch_size)

    def itc(self, images, texts, batch_size: int = 32) -> torch.Tensor:
        """(I, T) max-over-queries cosine similarity of every image with every text."""
        from .retrieval import itc

        return itc(self, images, texts, batch_size)

    def embed_images(self, images, batch_size: int = 32) -> torch.Tensor:
        """(I, Q, E) normalised query embeddings; (I, Q, D) Q-Former features on generation checkpoints."""
        from .retrieval import embed_images

        return embed_images(self, images, batch_size)

    def embed_texts(self, texts, batch_size: int = 256) -> torch.Tensor:
        """(T, E) normalised [CLS] embeddings (retrieval checkpoints)."""
        from .retrieval import embed_texts

        return embed_texts(self, texts, batch_size)

    def rank(self, text: str, images=None, *, image_embeds=None, top: int | None = 10, rerank: int = 0,
             batch_size: int = 32):  # fmt: skip
        """Rank a gallery for ``text`` by ITC, re-ranking the best ``rerank`` by ITM: list of ``Match``."""
        from .retrieval import rank

        return rank(self, text, images, image_embeds=image_embeds, top=top, rerank=rerank,
                    batch_size=batch_size)  # fmt: skip

    def search(self, query, index, top: int = 10, rerank: int = 0, nprobe: int = 32):
        """Search an index folder (``blip2 index``) by text or by image: list of ``Hit``, best first."""
        from .index import Index
        from .indexing import search_index

        if not isinstance(index, Index):
            index = Index.open(index)
        return search_index(self, index, query, top=top, rerank=rerank, nprobe=nprobe)


def load(
    name_or_path: str | os.PathLike,
    device: str | torch.device | Mapping = "cpu",
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    exact: bool = False,
    group_size: int | None = None,
    compile: bool | str = False,
    max_memory: Mapping | None = None,
) -> Pipeline:
    """Load a BLIP-2 checkpoint from a local folder or a hub id (``Salesforce/blip2-opt-2.7b``).

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``"auto"``: split over the GPUs (the image
    encoder, Q-Former and embeddings on the first, the language model's layers in order after them),
    the CPU as the last resort, within ``max_memory`` (device -> bytes or ``"20GiB"``) when given; or a
    map ``{"vision": "cuda:0", "language_model.layers.0-15": "cuda:0", "": "cuda:1"}`` (see
    ``blip2.placement``).
    ``dtype``: float32 (default), bfloat16 or float16 for the vision encoder and the language model;
    the Q-Former and its queries stay float32, as in the reference.
    ``quantize="int8"``: weight-only 8-bit linear layers in the vision encoder, the Q-Former and the
    language model; ``"int4"``: the vision encoder's and the language model's 4-bit with a scale and
    minimum per ``group_size`` inputs (128 by default on the CPU), the Q-Former's 8-bit. On the CPU
    these are ``blip2.quantize``'s native kernels; on CUDA ``blip2.quantize.cuda``'s layers
    (``"int8:bnb"``, ``"int4:tinygemm"``... pick a kernel; int4 groups of 128, else 64 or 32). A
    checkpoint written by ``blip2 quantize`` / :meth:`Pipeline.save` loads quantized as it was saved,
    with nothing to pass (a CPU format).
    ``exact=True``: float32 on CPU runs its matmuls through the reference's kernel (MKL ``sgemm``)
    and decode steps' attention through PyTorch's fused kernel, instead of the native kernel and
    plain batched products: OPT's logits then equal the reference's bit for bit (T5's to ~1e-6), at
    up to ~4x the time per decode step of several rows. The default differs by float32 rounding
    only (see ``layers.Linear``), and gives a row the same bits alone or in any batch; it can flip a
    greedy choice only where two tokens tie to that rounding. It is a float32 path: not with ``quantize`` or a quantized checkpoint.
    ``compile=True`` (CUDA): decode steps on a static KV cache, captured once per shape as a CUDA graph
    and replayed; ``"inductor"``: the step compiled by ``torch.compile`` first; ``"static"``: the
    static-shape step without capture, on any device (see ``blip2.fastdecode``).
    """
    from .quantize.checkpoint import method_of
    from .quantize.int4 import check_group_size

    t0 = time.perf_counter()
    bits, kernel = _quantize_spec(quantize)
    if compile not in (False, True, "graphs", "inductor", "static"):
        raise ValueError(f"compile must be False, True, 'graphs', 'inductor' or 'static', not {compile!r}")
    if group_size is not None and bits != 4:
        raise ValueError("group_size is for quantize='int4'")
    if group_size is not None:
        check_group_size(group_size)  # before the checkpoint is read
    if quantize and exact:
        raise ValueError("exact=True is the reference's float32 arithmetic: it does not go with quantize")
    placed = isinstance(device, Mapping) or device == "auto"
    if not placed:
        device = torch.device(device)
        if bits and device.type not in ("cpu", "cuda"):
            raise ValueError(f"quantize={quantize!r} runs on the CPU or CUDA, not {device.type}")
        if kernel and device.type == "cpu":
            raise ValueError(
                f"quantize={quantize!r}: kernels are chosen for CUDA layers; on the CPU pass "
                f"quantize='int{bits}' (blip2.quantize's native kernels)"
            )
    if group_size is not None and (placed or device.type != "cpu"):
        raise ValueError("group_size is for the CPU's int4 layers; CUDA's take groups of 128 (else 64 or 32)")
    folder = resolve_checkpoint(name_or_path)
    model, cfg = build_model(folder, dtype)
    saved, saved_group = method_of(model)
    if saved:
        if exact:
            raise ValueError(f"{folder} is quantized ({saved}): exact=True needs a float32 checkpoint")
        if placed or device.type != "cpu":
            raise ValueError(f"{folder} is quantized ({saved}), a CPU format; load its float source on a GPU")
        if quantize and (quantize, group_size or saved_group) != (saved, saved_group):
            raise ValueError(
                f"{folder} is already quantized ({saved}{f', group size {saved_group}' if saved_group else ''}); "
                "load it without quantize=, or quantize its float source"
            )
        bits = None  # nothing left to quantize
    if exact:
        for module in model.modules():
            if hasattr(module, "fast_kernels"):  # the linear layers, and attention's decode steps
                module.fast_kernels = False
    device = _place(model, device, bits, kernel, group_size, max_memory)
    if any(p.device.type == "cpu" for p in model.parameters()):
        keep_freed_memory()  # from here on; what loading freed has gone back already
    processor = _load_processor(folder, cfg)
    log.info("loaded %s in %.1f s", folder, time.perf_counter() - t0)
    pipe = Pipeline(model, processor, folder, device)
    if compile and model.language_model is not None:
        from .fastdecode import StaticDecoder

        mode = "graphs" if compile is True else compile
        if mode != "static" and device.type != "cuda":
            log.warning("compile=%r runs on CUDA only: decoding the plain way on %s", compile, device)
        else:
            pipe.decoder = StaticDecoder(mode)
    return pipe


def _quantize_spec(quantize: str | None) -> tuple[int | None, str | None]:
    """``"int8"`` -> (8, None); ``"int4:bnb"`` -> (4, "bnb")."""
    if quantize is None:
        return None, None
    from .quantize.cuda import KERNELS, bits_of

    name, _, kernel = str(quantize).partition(":")
    bits = bits_of(name)
    if kernel and kernel not in KERNELS[bits]:
        raise ValueError(f"{name} kernel must be one of {KERNELS[bits]}, not {kernel!r}")
    return bits, kernel or None


def _place(
    model: Blip2, device, bits: int | None, kernel: str | None, group_size: int | None, max_memory
) -> torch.device:
    """Quantize and move the model as asked; returns the device the pipeline feeds (the main one)."""
    if isinstance(device, Mapping) or device == "auto":
        from .placement import device_budgets, model_units, place, plan_auto, plan_from_map

        units = model_units(model, bits=bits, kernel=kernel)
        if isinstance(device, Mapping):
            plan = plan_from_map(units, device)
        else:
            plan = plan_auto(units, device_budgets(max_memory))
        if isinstance(device, Mapping) or any(d.type != "cpu" for d in plan.devices.values()):
            return place(model, plan, bits, kernel).main
        device = "cpu"
    device = torch.device(device)
    if device.type == "cpu":  # blip2.quantize's layers and kernels
        if bits:
            from .quantize import DEFAULT_GROUP_SIZE, quantize_model_

            quantize_model_(model, f"int{bits}", group_size or DEFAULT_GROUP_SIZE)
        return device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={str(device)!r}: this PyTorch ({torch.__version__}) sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if bits:
        from .quantize.cuda import check_kernel, layer_kernel, quantize_model_

        check_kernel(bits, layer_kernel(bits, device, kernel))
        quantize_model_(model, bits, lambda _: device, kernel)
    model.to(device)
    return device


def _load_processor(folder: Path, cfg: Blip2Config):
    from .processor import Processor

    num_query_tokens = (
        cfg.num_query_tokens if (cfg.image_token_index is not None and not cfg.retrieval) else None
    )
    try:
        return Processor.from_pretrained(
            folder, cfg, num_query_tokens=num_query_tokens, image_token_id=cfg.image_token_index
        )
    except CheckpointError:
        raise
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder}: tokenizer or processor files missing ({e})") from None


@torch.inference_mode()
def _steps(lm, embeds, mask, cfg, ids, ids_mask, forced=None, decoder=None) -> Iterator[list[int | None]]:
    # The decorator (unlike a `with` inside) leaves inference mode between steps: the caller's is untouched.
    yield from stream_ids(lm, embeds, mask, cfg, ids, ids_mask, forced, decoder)


def _generation_defaults(folder: Path, cfg: Blip2Config) -> GenerationConfig:
    """``generation_config.json`` over the language model's own EOS / pad ids."""
    text = cfg.text
    if text is None:
        return GenerationConfig()
    return GenerationConfig.from_file(
        folder / "generation_config.json", eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    )
